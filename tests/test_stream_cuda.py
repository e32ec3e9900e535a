"""CUDA: each StreamEncoder on its own CUDA stream, pinned uploads, exact latents. Needs a GPU."""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import assert_bf16_close, random_encoder, random_video, rel_err, to_model_video
from streamvae import WAN21, StreamEncoder, WanEncoder, narrow

pytestmark = pytest.mark.cuda


@pytest.fixture
def exact_fp32():
    """TF32 convs would cost ~1e-3 relative error; the exactness checks run in true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_gpu(encoder: WanEncoder, dtype=torch.float32) -> WanEncoder:
    gpu = WanEncoder(encoder.config)
    gpu.load_state_dict(encoder.state_dict())
    return gpu.to(device="cuda", dtype=dtype).eval().requires_grad_(False)


def streamed(stream: StreamEncoder, frames) -> torch.Tensor:
    out = [latent for frame in frames for latent in stream.push(frame)] + stream.flush()
    return torch.stack([latent.data for latent in out], dim=1)[None]


@pytest.mark.parametrize("memory_format", [None, torch.channels_last_3d])  # eager / fused norms
@pytest.mark.parametrize("mode", ["frame", "group"])
@pytest.mark.parametrize("config, size", [(narrow(8), (32, 48)), (WAN21, (64, 96))])
def test_gpu_stream_equals_cpu_batch_encoder(exact_fp32, config, size, mode, memory_format):
    cpu = random_encoder(config, seed=3)
    frames = random_video(9, *size, seed=1)
    expected = cpu.encode(to_model_video(frames))
    stream = StreamEncoder(on_gpu(cpu), mode=mode, memory_format=memory_format)
    got = streamed(stream, [f.numpy() for f in frames[0]])
    assert got.device.type == "cpu"
    assert rel_err(got, expected) <= 1e-5


def test_gpu_resident_frames_and_gpu_output(exact_fp32):
    cpu = random_encoder(narrow(8), seed=4)
    frames = random_video(5, 16, 16, seed=2)
    expected = cpu.encode(to_model_video(frames))
    stream = StreamEncoder(on_gpu(cpu), output_device=None)
    got = streamed(stream, [f.permute(2, 0, 1).cuda() for f in frames[0]])
    assert got.device.type == "cuda"
    assert rel_err(got.cpu(), expected) <= 1e-5


def test_each_stream_has_its_own_cuda_stream():
    gpu = on_gpu(random_encoder(narrow(8), seed=5))
    a, b = StreamEncoder(gpu), StreamEncoder(gpu)
    assert a._cuda is not None and b._cuda is not None
    # Issue 17: the chained ``a != b != c`` never compared a with c.
    streams = [a._cuda.stream, b._cuda.stream, torch.cuda.current_stream()]
    assert len({stream.cuda_stream for stream in streams}) == 3


def test_two_streams_in_threads_equal_separate_runs(exact_fp32):
    gpu = on_gpu(random_encoder(narrow(16), seed=6))
    videos = [[f.numpy() for f in random_video(13, 64, 64, seed=s)[0]] for s in range(2)]
    separate = [streamed(StreamEncoder(gpu), v) for v in videos]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = streamed(StreamEncoder(gpu), videos[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for i, expected in enumerate(separate):
        # cuBLAS promises bitwise-equal results only with one stream at work: allow rounding.
        assert rel_err(results[i], expected) <= 1e-6


def test_bfloat16_on_gpu_is_close_to_float32():
    cpu = random_encoder(WAN21, seed=7)
    frames = random_video(9, 64, 64, seed=3)
    expected = cpu.encode(to_model_video(frames))
    got = streamed(StreamEncoder(on_gpu(cpu, torch.bfloat16)), [f.numpy() for f in frames[0]])
    error = rel_err(got, expected)
    print(f"bfloat16 on {torch.cuda.get_device_name()}: relative error {error:.2e}")
    assert_bf16_close(got, expected)
