"""Bad frames are refused with a clear error and leave the stream exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import random_video, rel_err
from streamvae import FrameError, StreamEncoder
from streamvae.frames import Frame

H, W = 8, 16
GOOD = np.zeros((H, W, 3), np.uint8)

BAD_FRAMES = {
    "grey HxW": (np.zeros((H, W), np.uint8), "shape"),
    "grey HxWx1": (np.zeros((H, W, 1), np.uint8), "shape"),
    "RGBA": (np.zeros((H, W, 4), np.uint8), "shape"),
    "5 channels": (np.zeros((H, W, 5), np.uint8), "shape"),
    "a batch of frames": (np.zeros((2, H, W, 3), np.uint8), "shape"),
    "torch HWC": (torch.zeros(H, W, 3, dtype=torch.uint8), "shape"),
    "torch batch": (torch.zeros(1, 3, H, W), "shape"),
    "complex": (np.zeros((H, W, 3), np.complex64), "dtype"),
    "object": (np.empty((H, W, 3), dtype=object), "dtype"),
    "int16": (np.zeros((H, W, 3), np.int16), "dtype"),
    "bool": (np.zeros((H, W, 3), bool), "dtype"),
    "torch int32": (torch.zeros(3, H, W, dtype=torch.int32), "dtype"),
    "torch complex": (torch.zeros(3, H, W, dtype=torch.complex64), "dtype"),
    "NaN": (np.full((H, W, 3), np.nan, np.float32), "NaN"),
    "Inf": (torch.full((3, H, W), float("inf")), "NaN or Inf"),
    "0..255 floats": (np.full((H, W, 3), 200.0, np.float32), r"\[-1, 1\]"),
    "slightly out of range": (np.full((H, W, 3), 1.01, np.float32), r"\[-1, 1\]"),
    "not a multiple of 8": (np.zeros((H + 1, W, 3), np.uint8), "multiples of 8"),
    "empty": (np.zeros((0, 0, 3), np.uint8), "multiples of 8"),
    "None": (None, "NoneType"),
    "a string": ("frame.png", "str"),
    "a list": ([[0, 0, 0]], "list"),
    "another device": (torch.zeros(3, H, W, device="meta"), "device"),
    "a wrapped bad frame": (Frame(np.zeros((H, W, 4), np.uint8)), "shape"),
}


def latents_of(stream: StreamEncoder, frames, junk=None, junk_every: int = 2) -> torch.Tensor:
    out = []
    for t, frame in enumerate(frames):
        if junk is not None and t % junk_every == 0:
            with pytest.raises(FrameError):
                stream.push(junk)
        out += stream.push(frame)
    return torch.stack([latent.data for latent in out])


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_is_refused_and_changes_nothing(narrow_encoder, name):
    bad, expected_words = BAD_FRAMES[name]
    frames = [f.numpy() for f in random_video(9, H, W, seed=1)[0]]
    clean = latents_of(StreamEncoder(narrow_encoder), frames)
    stream = StreamEncoder(narrow_encoder)
    with pytest.raises(FrameError, match=expected_words) as info:
        stream.push(bad)
    assert "expected" in str(info.value) or "must" in str(info.value)
    assert stream.frames_pushed == 0 and stream.state_nbytes == 0
    assert torch.equal(latents_of(stream, frames, junk=bad), clean)


def test_size_change_is_refused_and_changes_nothing(narrow_encoder):
    frames = [f.numpy() for f in random_video(9, H, W, seed=2)[0]]
    clean = latents_of(StreamEncoder(narrow_encoder), frames)
    stream = StreamEncoder(narrow_encoder)
    out = stream.push(frames[0])
    with pytest.raises(FrameError, match=r"reset\(\)"):
        stream.push(np.zeros((H, W + 8, 3), np.uint8))
    out += [latent for frame in frames[1:] for latent in stream.push(frame)]
    assert torch.equal(torch.stack([latent.data for latent in out]), clean)


def test_a_bad_frame_in_a_burst_refuses_the_whole_burst(narrow_encoder):
    frames = [f.numpy() for f in random_video(5, H, W, seed=3)[0]]
    stream = StreamEncoder(narrow_encoder)
    with pytest.raises(FrameError):
        stream.push_many([*frames[:3], None, frames[3]])
    assert stream.frames_pushed == 0
    with pytest.raises(ValueError, match="timestamps"):
        stream.push_many(frames, timestamps=[0.0])


def test_bad_timestamps_are_refused(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    for stamp in (float("nan"), float("inf"), "now", True, np.float32("nan"), 1j):
        with pytest.raises(FrameError, match="timestamp"):
            stream.push(GOOD, timestamp=stamp)
    with pytest.raises(FrameError, match="captured"):
        stream.push(Frame(GOOD, captured=False))
    assert stream.frames_pushed == 0


def test_numpy_timestamps_are_accepted_as_floats(narrow_encoder):
    """Issue 17 (lesser): ``True`` was taken for a timestamp and ``np.float32`` refused."""
    stream = StreamEncoder(narrow_encoder)
    (latent,) = stream.push(GOOD, timestamp=np.float32(1.5))
    assert latent.timestamps == (1.5,) and type(latent.timestamps[0]) is float
    stream.reset()
    (latent,) = stream.push(Frame(GOOD, timestamp=np.int64(7)))
    assert latent.timestamps == (7.0,) and type(latent.timestamps[0]) is float


def test_float64_and_float_frames_are_accepted(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    assert len(stream.push(np.full((H, W, 3), 0.5, np.float64))) == 1
    assert stream.push(torch.full((3, H, W), -1.0005, dtype=torch.float64)) == []


def test_numpy_float_frames_in_minus_one_to_one_are_documented_and_equal_uint8(narrow_encoder):
    """Issue 23: numpy float frames in [-1, 1] are accepted (decided: documented, not refused):
    the same latent as the uint8 frame they scale from; the refusal names them as accepted."""
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    (from_uint8,) = StreamEncoder(narrow_encoder).push(image)
    (from_float,) = StreamEncoder(narrow_encoder).push(image.astype(np.float32) / 127.5 - 1)
    assert torch.equal(from_uint8.data, from_float.data)
    with pytest.raises(FrameError, match=r"numpy \[H, W, 3\] RGB .* float in \[-1, 1\]"):
        StreamEncoder(narrow_encoder).push(np.zeros((H, W, 4), np.float32))


def _is_valid(frame) -> bool:
    """An independent statement of what a valid 8x16 frame is."""
    if isinstance(frame, np.ndarray):
        if frame.shape != (H, W, 3):
            return False
        if frame.dtype == np.uint8:
            return True
        if frame.dtype.kind != "f":
            return False
        values = frame.astype(np.float64)
        return bool(np.isfinite(values).all() and np.abs(values).max() <= 1.001)
    return False


def _as_model_frame(frame: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 127.5 - 1
    return tensor.float()


junk = st.one_of(
    hnp.arrays(
        dtype=st.one_of(hnp.scalar_dtypes(), st.just(np.dtype(np.uint8))),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=17),
    ),
    hnp.arrays(dtype=st.sampled_from([np.uint8, np.float32, np.float64]), shape=st.just((H, W, 3))),
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(0, 255), max_size=4),
    st.builds(
        lambda a, b, c: torch.zeros(a, b, c),
        st.integers(0, 4),
        st.integers(0, 9),
        st.integers(0, 17),
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=st.lists(junk, min_size=1, max_size=8))
def test_random_junk_never_disturbs_the_stream(narrow_encoder, items):
    """Each item is either refused with a FrameError (state untouched) or is a valid frame."""
    good = [f.numpy() for f in random_video(5, H, W, seed=4)[0]]
    stream = StreamEncoder(narrow_encoder)
    accepted: list[torch.Tensor] = []
    latents = []
    for i, frame in enumerate(good):
        for item in items[i::5]:
            if _is_valid(item):
                latents += stream.push(item)
                accepted.append(_as_model_frame(item))
            else:
                with pytest.raises(FrameError):
                    stream.push(item)
        latents += stream.push(frame)
        accepted.append(_as_model_frame(frame))
    latents += stream.flush()
    video = torch.stack(accepted, dim=1)[None]
    expected = narrow_encoder.encode(video)
    got = torch.stack([latent.data for latent in latents], dim=1)[None]
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_frame_fields_are_checked_at_construction():
    """Issue 21 item 17: ``Frame(gap="no")`` counted as a gap, and ``Frame(number=2**63)`` was
    encoded and written, after which ``read_latents`` refused the whole file."""
    for gap in ("no", 1, None, np.array([True, False])):
        with pytest.raises(FrameError, match="gap must be True or False"):
            Frame(GOOD, gap=gap)
    for number in (2**63, -1, 1.5, True):
        with pytest.raises(FrameError, match="number must be an integer"):
            Frame(GOOD, number=number)
    assert Frame(GOOD, gap=np.bool_(True), number=2**63 - 1).number == 2**63 - 1


def test_the_largest_frame_number_is_written_and_read_back(narrow_encoder, tmp_path):
    from streamvae.io import FileSink, read_latents

    stream = StreamEncoder(narrow_encoder)
    (latent,) = stream.push(Frame(GOOD, number=2**63 - 1))
    with FileSink(tmp_path / "big.latents") as sink:
        sink.write(latent)
    (back,) = read_latents(tmp_path / "big.latents")
    assert back.source_frames == (2**63 - 1,)


def test_a_sparse_torch_frame_is_a_frame_error(narrow_encoder):
    stream = StreamEncoder(narrow_encoder)
    sparse = torch.zeros(3, H, W).to_sparse()
    with pytest.raises(FrameError, match=r"layout torch.sparse_coo.*to_dense\(\)"):
        stream.push(sparse)
    assert stream.frames_pushed == 0
    assert len(stream.push(sparse.to_dense())) == 1
