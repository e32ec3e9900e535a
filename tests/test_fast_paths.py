"""The fast CPU paths (channels-last oneDNN convs with packed weights, skipped zero taps, the
fused norm) against diffusers, in float32 and bfloat16; their caches under weight changes."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch

from helpers import assert_bf16_close, random_encoder, random_video, rel_err, to_model_video
from streamvae import WAN21, StreamEncoder, WanEncoder, narrow
from streamvae.bench.peers import DiffusersPeer
from streamvae.model import encoder as encoder_module
from streamvae.model import kernels
from streamvae.model.kernels import (
    PackedConv,
    onednn_available,
    onednn_bf16_available,
    rms_silu_into,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CHANNELS_LAST = torch.channels_last_3d
TOLERANCE = 1e-5
# oneDNN's bfloat16 convolutions need AVX-512 (AVX2-only CPUs, e.g. many AMD EPYCs, lack them):
# there bfloat16 runs PyTorch's reference convolutions, and the tests check that instead.
NO_ONEDNN_BF16 = "oneDNN bfloat16 convolutions need AVX-512; this CPU has AVX2 only"


def streamed(stream: StreamEncoder, frames: torch.Tensor) -> torch.Tensor:
    out = [latent for frame in frames[0] for latent in stream.push(frame.numpy())]
    out += stream.flush()
    return torch.stack([latent.data for latent in out], dim=1)[None]


@pytest.mark.parametrize("mode", ["frame", "group"])
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_channels_last_stream_matches_diffusers(narrow_encoder, mode, frames):
    video = random_video(frames, 24, 32, seed=frames)
    expected = DiffusersPeer(narrow_encoder).batch(to_model_video(video))
    stream = StreamEncoder(narrow_encoder, mode=mode, normalize=False, memory_format=CHANNELS_LAST)
    assert rel_err(streamed(stream, video), expected) <= TOLERANCE


def test_full_config_channels_last_float32_and_bfloat16(wan21_encoder):
    video = random_video(9, 32, 48, seed=3)
    expected = DiffusersPeer(wan21_encoder).batch(to_model_video(video))
    stream = StreamEncoder(wan21_encoder, normalize=False, memory_format=CHANNELS_LAST)
    assert rel_err(streamed(stream, video), expected) <= TOLERANCE
    low = copy.deepcopy(wan21_encoder).to(torch.bfloat16)
    stream = StreamEncoder(low, normalize=False, memory_format=CHANNELS_LAST)
    assert_bf16_close(streamed(stream, video), expected)


@pytest.mark.parametrize("chunk_frames", [1, 3, 4])
def test_channels_last_batch_encode_any_chunking(narrow_encoder, chunk_frames):
    video = to_model_video(random_video(9, 16, 24, seed=5))
    expected = narrow_encoder.encode(video, normalize=False)
    state = narrow_encoder.new_state(16, 24, capacity=chunk_frames, memory_format=CHANNELS_LAST)
    got = narrow_encoder.step(video, state)
    assert got is not None
    assert rel_err(got, expected) <= TOLERANCE


def test_reset_restarts_the_skipped_zero_taps(narrow_encoder):
    frames = random_video(5, 16, 16, seed=6)
    stream = StreamEncoder(narrow_encoder, normalize=False, memory_format=CHANNELS_LAST)
    first = streamed(stream, frames)
    stream.reset()
    assert rel_err(streamed(stream, frames), first) == 0.0


def test_new_weights_are_repacked():
    config = narrow(8)
    a, b = random_encoder(config, seed=10), random_encoder(config, seed=11)
    video = random_video(5, 16, 16, seed=7)
    stream = StreamEncoder(a, normalize=False, memory_format=CHANNELS_LAST)
    streamed(stream, video)  # packs a's weights
    a.load_state_dict(b.state_dict())  # in place: same storage, new version
    expected = DiffusersPeer(b).batch(to_model_video(video))
    stream.reset()
    assert rel_err(streamed(stream, video), expected) <= TOLERANCE


def test_deepcopy_and_cast_after_use(narrow_encoder):
    video = random_video(5, 16, 16, seed=8)
    used = copy.deepcopy(narrow_encoder)
    streamed(StreamEncoder(used, memory_format=CHANNELS_LAST), video)
    clone = copy.deepcopy(used)  # packed oneDNN weights are not copied, rebuilt on use
    low = copy.deepcopy(used).to(torch.bfloat16)
    expected = streamed(StreamEncoder(narrow_encoder), video)
    assert (
        rel_err(streamed(StreamEncoder(clone, memory_format=CHANNELS_LAST), video), expected)
        <= TOLERANCE
    )
    assert_bf16_close(streamed(StreamEncoder(low, memory_format=CHANNELS_LAST), video), expected)


@pytest.mark.skipif(not onednn_available(), reason="PyTorch without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_conv_equals_conv3d(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, 4, 12, 20, generator=generator).to(dtype, memory_format=CHANNELS_LAST)
    weight = (torch.randn(16, 24, 3, 3, 3, generator=generator) * 0.1).to(dtype)
    bias = torch.randn(16, generator=generator).to(dtype)
    conv = PackedConv(stride=(1, 1, 1), padding=(0, 1, 1))
    # bfloat16 on an AVX2-only CPU: F.conv3d (oneDNN would raise "bf16 path needs avx512").
    assert conv.applies(x, weight) == (dtype == torch.float32 or onednn_bf16_available())
    expected = torch.nn.functional.conv3d(
        x.float(), weight.float(), bias.float(), padding=(0, 1, 1)
    )
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(conv(x, weight, bias), expected) <= bound
    assert rel_err(conv(x, weight, bias), expected) <= bound  # from the cache
    assert not conv.applies(x.contiguous(), weight)  # contiguous input: plain F.conv3d
    assert rel_err(conv(x.contiguous(), weight, bias), expected) <= bound


def test_rms_silu_into_matches_the_textbook_chain():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, 1, 8, 8, generator=generator)
    gamma = 1 + 0.1 * torch.randn(32, 1, 1, 1, generator=generator)
    x[..., 0, 0] = 0.0  # an all-zero channel vector: normalised to zero, not NaN
    expected = torch.nn.functional.silu(torch.nn.functional.normalize(x, dim=1) * 32**0.5 * gamma)
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        out = torch.empty_like(x, dtype=dtype)
        rms_silu_into(x.to(dtype), gamma.to(dtype), 32**0.5, out)
        assert torch.isfinite(out.float()).all()
        assert rel_err(out, expected) <= bound


def test_fused_rms_silu_matches_the_textbook_chain():
    """The fused norm (the CUDA default for channels-last) run on the CPU, into a window slot."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 32, 1, 8, 8, generator=generator).to(memory_format=CHANNELS_LAST)
    gamma = 1 + 0.1 * torch.randn(32, 1, 1, 1, generator=generator)
    x[..., 0, 0] = 0.0  # an all-zero channel vector: normalised to zero, not NaN
    x[..., 0, 1] *= 1e-9  # tiny, but far above where the two formulas part
    expected = torch.nn.functional.silu(torch.nn.functional.normalize(x, dim=1) * 32**0.5 * gamma)
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        window = torch.full((1, 32, 3, 8, 8), 7.0, dtype=dtype).to(memory_format=CHANNELS_LAST)
        slot, low = window[:, :, 2:3], x.to(dtype)
        assert kernels._fused_norm_applies(low, 32**0.5, slot)
        rms_silu_into(low, gamma.to(dtype), 32**0.5, slot, fused=True)
        assert torch.isfinite(slot.float()).all()
        assert rel_err(slot, expected) <= bound
        assert (window[:, :, :2] == 7.0).all()  # the remembered frames untouched
        assert rel_err(slot[..., 0, 1], expected[..., 0, 1]) <= bound
    # Where it would need copies or computes another function, the eager path runs instead.
    contiguous = x.contiguous()
    assert not kernels._fused_norm_applies(contiguous, 32**0.5, torch.empty_like(contiguous))
    assert not kernels._fused_norm_applies(x, 2.0, torch.empty_like(x))


# -- ring windows (the CUDA default for frame-at-a-time streams), run on the CPU ----


@pytest.fixture
def ring_on_cpu(monkeypatch):
    monkeypatch.setattr(encoder_module, "RING_DEVICES", frozenset({"cpu"}))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
@pytest.mark.parametrize("frames", [1, 2, 5, 9, 14])
def test_ring_stream_matches_diffusers(ring_on_cpu, narrow_encoder, memory_format, frames):
    video = random_video(frames, 24, 32, seed=20 + frames)
    expected = DiffusersPeer(narrow_encoder).batch(to_model_video(video))
    stream = StreamEncoder(narrow_encoder, normalize=False, memory_format=memory_format)
    got = streamed(stream, video)
    assert stream._state is not None and stream._state.conv_in.ring
    assert rel_err(got, expected) <= TOLERANCE


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, TOLERANCE), (torch.bfloat16, 3e-2)])
def test_cuda_defaults_emulated_on_the_cpu(monkeypatch, wan21_encoder, dtype, bound, ring):
    """Full config with what the CUDA defaults change: fused norms, channels-last state, and
    with or without ring windows."""
    monkeypatch.setattr(kernels, "FUSED_NORM_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(encoder_module, "RING_DEVICES", frozenset({"cpu"} if ring else ()))
    video = random_video(9, 32, 48, seed=21)
    expected = DiffusersPeer(wan21_encoder).batch(to_model_video(video))
    encoder = copy.deepcopy(wan21_encoder).to(dtype)
    stream = StreamEncoder(encoder, normalize=False, memory_format=CHANNELS_LAST)
    got = streamed(stream, video)
    if dtype == torch.bfloat16:
        assert_bf16_close(got, expected)
    assert rel_err(got, expected) <= bound


def test_ring_step_writes_one_frame_and_copies_none(narrow_encoder):
    """Each conv window changes in exactly one frame per step (the new one): nothing shifts."""
    state = narrow_encoder.new_state(16, 16, capacity=1, ring=True)
    convs = state._convs
    video = to_model_video(random_video(9, 16, 16, seed=22))
    for i in range(9):
        before = [conv.window.frames.clone() for conv in convs]
        pointers = [conv.window.frames.data_ptr() for conv in convs]
        narrow_encoder.step(video[:, :, i : i + 1], state)
        for conv, old, pointer in zip(convs, before, pointers):
            assert conv.window.frames.data_ptr() == pointer
            changed = [
                t for t in range(3) if not torch.equal(conv.window.frames[:, :, t], old[:, :, t])
            ]
            assert len(changed) <= 1  # 0 for the layers that did not step this frame


def test_ring_reset_and_in_place_weight_changes(narrow_encoder):
    encoder = copy.deepcopy(narrow_encoder)
    video = to_model_video(random_video(9, 16, 16, seed=23))
    state = encoder.new_state(16, 16, capacity=1, ring=True)
    first = encoder.step(video, state)
    state.reset()
    assert torch.equal(encoder.step(video, state), first)
    # New values loaded in place (same addresses): the rotated copies must follow.
    other = random_encoder(narrow(8), seed=24)
    encoder.load_state_dict(other.state_dict())
    state.reset()
    got = encoder.step(video, state)
    assert rel_err(got, other.encode(video, normalize=False)) <= TOLERANCE


def test_ring_streams_in_threads_share_the_rotations(ring_on_cpu):
    """Streams in threads sharing one encoder build each rotation once and get equal latents."""
    encoder, reference = random_encoder(narrow(8), seed=25), random_encoder(narrow(8), seed=25)
    videos = [random_video(9, 16, 16, seed=26 + i) for i in range(4)]
    expected = [reference.encode(to_model_video(video), normalize=False) for video in videos]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = streamed(StreamEncoder(encoder, normalize=False), videos[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, want in enumerate(expected):
        assert rel_err(results[i], want) <= TOLERANCE
    assert len(encoder.conv_in._rotated) == 3  # one tensor per rotation, whoever built it
    if onednn_available():  # and one oneDNN pack per rotation, kept (not rebuilt per step)
        assert len(encoder.conv_in.kernel._packed) == 3


def test_ring_needs_one_frame_per_step(narrow_encoder):
    with pytest.raises(ValueError, match="one frame per step"):
        narrow_encoder.new_state(16, 16, capacity=4, ring=True)
    state = narrow_encoder.new_state(16, 16, capacity=1, ring=True)
    with pytest.raises(ValueError, match="one frame per step"):
        state.conv_in.slots(2)


# -- CUDA graphs: the Python-side bookkeeping (checked on the CPU), the replays (on a GPU) ----


@pytest.mark.parametrize(
    "capacity, chunk, ring", [(1, 1, False), (1, 1, True), (4, 4, False), (4, 1, False)]
)
def test_step_signature_determines_the_next(narrow_encoder, capacity, chunk, ring):
    """A replayed graph sets the state to what the eager step left: that must be a function of
    the state before the step and the step's frame count, over resets too."""
    state = narrow_encoder.new_state(16, 16, capacity=capacity, ring=ring)
    video = to_model_video(random_video(41, 16, 16, seed=9))
    after: dict[tuple, tuple] = {}
    for _run in range(2):
        state.reset()
        chunks = [video[:, :, :1], *video[:, :, 1:].split(chunk, dim=2)]
        for part in chunks:
            before = (part.shape[2], state.signature())
            narrow_encoder.step(part, state)
            assert after.setdefault(before, state.signature()) == state.signature()
            state.restore(before[1])
            assert state.signature() == before[1]
            state.restore(after[before])
    assert len(after) <= 17  # a bounded number of graphs per stream (17 with ring windows)


def test_weights_key_sees_every_parameter_move():
    """CUDA graphs bake in every parameter's address: any move, of any submodule, repacks."""
    encoder = random_encoder(narrow(8), seed=15)
    key = encoder._weights_key()
    assert encoder._weights_key() == key  # cached, stable
    proj = encoder.mid_block.attentions[0].proj
    held = [param.data for param in proj.parameters()]  # so that no new tensor reuses an address
    proj.double().float()  # one deep submodule, moved
    assert encoder._weights_key() != key
    del held
    key = encoder._weights_key()
    fresh = {name: value.clone() for name, value in encoder.state_dict().items()}
    encoder.load_state_dict(fresh, assign=True)  # new Parameter objects
    assert encoder._weights_key() != key


def _on_gpu(encoder: WanEncoder, dtype: torch.dtype = torch.float32) -> WanEncoder:
    gpu = WanEncoder(encoder.config)
    gpu.load_state_dict(encoder.state_dict())
    return gpu.to(device="cuda", dtype=dtype).eval().requires_grad_(False)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["frame", "group"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
def test_cuda_graph_replays_equal_eager_steps(mode, memory_format):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cpu = random_encoder(narrow(8), seed=12)
        gpu = _on_gpu(cpu)
        video = random_video(29, 32, 48, seed=10)
        expected = cpu.encode(to_model_video(video), normalize=False)
        graphed = StreamEncoder(
            gpu, mode=mode, normalize=False, memory_format=memory_format, cuda_graphs=True
        )
        for _ in range(3):  # eager, captured, replayed
            assert rel_err(streamed(graphed, video), expected) <= TOLERANCE
        state = graphed._state
        assert state is not None and state.graphs is not None and state.graphs.graphs
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
def test_cuda_graphs_full_config_bfloat16():
    cpu = random_encoder(WAN21, seed=13)
    video = random_video(13, 64, 96, seed=11)
    expected = cpu.encode(to_model_video(video), normalize=False)
    graphed = StreamEncoder(_on_gpu(cpu, torch.bfloat16), normalize=False, cuda_graphs=True)
    for _ in range(3):
        assert_bf16_close(streamed(graphed, video), expected)


@pytest.mark.cuda
def test_cuda_graphs_dropped_when_the_weights_move():
    cpu = random_encoder(narrow(8), seed=14)
    gpu = _on_gpu(cpu)
    video = random_video(9, 16, 16, seed=12)
    stream = StreamEncoder(gpu, normalize=False, cuda_graphs=True)
    first = [streamed(stream, video) for _ in range(3)][-1]
    gpu.to(torch.float64).to(torch.float32)  # new parameter tensors, new addresses
    assert rel_err(streamed(stream, video), first) <= TOLERANCE


# -- every public way to get an encoder takes the oneDNN path (issue 11, item 3) ----


def conv_ops_of_a_group(encoder: WanEncoder) -> dict[str, int]:
    """Profiler op names (and counts) of the convolutions of a stream's first five pushes."""
    sys.path.insert(0, str(BENCHMARKS))
    from direct_encoder import conv_ops

    return conv_ops(encoder, (16, 24))


def saved_and_loaded(encoder: WanEncoder, tmp_path) -> WanEncoder:
    from safetensors.torch import save_file

    from streamvae import load_encoder
    from streamvae.weights import streamvae_to_wan_name

    path = tmp_path / "narrow.safetensors"
    save_file(
        {streamvae_to_wan_name(k): v.contiguous() for k, v in encoder.state_dict().items()}, path
    )
    return load_encoder(path)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN ops")
@pytest.mark.parametrize(
    "how",
    [
        "direct",
        pytest.param(
            "direct_bfloat16",
            marks=pytest.mark.skipif(not onednn_bf16_available(), reason=NO_ONEDNN_BF16),
        ),
        "deepcopy",
        "random",
        "loaded",
    ],
)
def test_every_public_encoder_runs_the_onednn_convs(how, tmp_path):
    import streamvae

    direct = WanEncoder(narrow(8))  # parameters require grad, as every new nn.Module's
    assert direct.conv_in.weight.requires_grad
    encoder = {
        "direct": lambda: direct,
        "direct_bfloat16": lambda: WanEncoder(narrow(8)).to(torch.bfloat16),
        "deepcopy": lambda: copy.deepcopy(direct).eval(),
        "random": lambda: streamvae.random_encoder(narrow(8)),
        "loaded": lambda: saved_and_loaded(direct, tmp_path),
    }[how]()
    ops = conv_ops_of_a_group(encoder)
    slow = {name: n for name, n in ops.items() if "slow_conv3d" in name}
    assert not slow, f"im2col 3D convolutions ran: {slow} (all conv ops: {ops})"
    # Every conv of the 5 steps on packed weights (plus first frames' sliced taps).
    assert ops.get("mkldnn::_convolution_pointwise", 0) >= 20, ops
    # The same kernels as an encoder frozen by hand (the attention's 1x1 Conv2d included).
    frozen = copy.deepcopy(encoder).requires_grad_(False)
    assert conv_ops_of_a_group(frozen) == ops


def test_bfloat16_without_onednn_bf16_takes_the_reference_convs(monkeypatch):
    """What an AVX2-only CPU does with a bfloat16 encoder (emulated on any CPU): no oneDNN
    conv (it would raise), a SlowPathWarning that says why, latents within bf16 error."""
    monkeypatch.setattr(kernels, "_ONEDNN_BF16", False)
    encoder = random_encoder(narrow(8), seed=27)
    low = copy.deepcopy(encoder).to(torch.bfloat16)
    with pytest.warns(kernels.SlowPathWarning, match="bfloat16 on a CPU without AVX-512"):
        ops = conv_ops_of_a_group(low)
    assert not [name for name in ops if "mkldnn" in name], ops
    assert ops, "no convolution ran"
    video = random_video(5, 16, 24, seed=28)
    expected = encoder.encode(to_model_video(video), normalize=False)
    with pytest.warns(kernels.SlowPathWarning):
        got = streamed(StreamEncoder(low, normalize=False), video)
    assert_bf16_close(got, expected)


def test_the_direct_encoders_fast_path_equals_the_frozen_one():
    direct = WanEncoder(narrow(8))
    frozen = copy.deepcopy(direct).requires_grad_(False)
    video = random_video(9, 16, 24, seed=22)
    a = streamed(StreamEncoder(direct, normalize=False), video)
    b = streamed(StreamEncoder(frozen, normalize=False), video)
    assert torch.equal(a, b)


def test_packed_conv_leaves_recorded_calls_to_autograd():
    conv = PackedConv(stride=(1, 1, 1), padding=(0, 1, 1))
    weight = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    x = torch.randn(1, 3, 3, 8, 8).to(memory_format=CHANNELS_LAST)
    assert not conv.applies(x, weight)  # grad mode on: the graph needs F.conv3d's backward
    conv(x, weight, None).sum().backward()
    assert weight.grad is not None
    with torch.inference_mode():
        assert conv.applies(x, weight) == onednn_available()
    with torch.no_grad():
        assert conv.applies(x, weight) == onednn_available()


@pytest.mark.parametrize(
    ("dtype", "memory_format", "says"),
    [
        (torch.float16, None, "float16 on the CPU"),
        (torch.float32, torch.contiguous_format, "contiguous_format state on the CPU"),
    ],
)
def test_a_slow_path_is_named_with_its_reason(dtype, memory_format, says):
    encoder = random_encoder(narrow(8), dtype=dtype)
    stream = StreamEncoder(encoder, memory_format=memory_format)
    with pytest.warns(kernels.SlowPathWarning, match=says):
        stream.push(random_video(1, 16, 16)[0, 0].numpy())


def test_the_fast_path_warns_nothing(recwarn):
    StreamEncoder(WanEncoder(narrow(8))).push(random_video(1, 16, 16)[0, 0].numpy())
    assert not [w for w in recwarn if issubclass(w.category, kernels.SlowPathWarning)]
