"""StreamEncoder.resume, snapshot and restore: a stream rebuilt or moved continues bit-identically."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import random_encoder, random_video
from streamvae import StreamEncoder, narrow
from streamvae.snapshot import SnapshotError

REPO = Path(__file__).resolve().parents[1]


def push_all(stream: StreamEncoder, frames: torch.Tensor, start: int = 0) -> list:
    out = []
    for i, frame in enumerate(frames):
        out += stream.push(frame.numpy(), timestamp=1000.0 + start + i)
    return out


def assert_same(latents, reference) -> None:
    by_index = {latent.index: latent for latent in reference}
    assert latents, "no latents to compare"
    for latent in latents:
        ref = by_index[latent.index]
        assert latent.frames == ref.frames and latent.timestamps == ref.timestamps
        assert not latent.approximate and latent.gap == ref.gap
        assert torch.equal(latent.data, ref.data), latent.index


def group_start(frame: int) -> int:
    """The first frame of the group that holds ``frame`` (0 for frame 0 and before)."""
    return 0 if frame <= 0 else 4 * ((frame - 1) // 4) + 1


@pytest.fixture(scope="module")
def clip():
    return random_video(200, 8, 8, seed=21)[0]


@pytest.fixture(scope="module")
def reference(narrow_encoder, clip):
    return push_all(StreamEncoder(narrow_encoder), clip)


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_resume_is_bit_identical_to_the_uninterrupted_stream(narrow_encoder, clip, mode):
    reference = push_all(StreamEncoder(narrow_encoder, mode=mode), clip)
    stream = StreamEncoder(narrow_encoder, mode=mode)
    r = stream.receptive_field
    last_published = 35  # its last frame is 140
    first = group_start(4 * last_published - r + 1)
    m = 150
    stamps = [1000.0 + i for i in range(first, m)]
    replayed = stream.resume(
        [f.numpy() for f in clip[first:m]], first_index=first, timestamps=stamps
    )
    assert stream.frames_pushed == m and stream.latents_emitted == 1 + (m - 1) // 4
    # Every latent the replay completes is exact, the last published one included.
    assert replayed[0].index == last_published
    later = push_all(stream, clip[m:], start=m)
    assert [lat.index for lat in replayed + later] == list(range(last_published, 50))
    assert_same(replayed + later, reference)


def test_resume_from_frame_zero_equals_pushing(narrow_encoder, clip, reference):
    stream = StreamEncoder(narrow_encoder)
    out = stream.resume(
        [f.numpy() for f in clip[:30]], first_index=0, timestamps=[1000.0 + i for i in range(30)]
    )
    assert [lat.index for lat in out] == list(range(8))
    assert_same(out + push_all(stream, clip[30:60], start=30), reference)


def test_resume_with_fewer_than_r_frames_is_refused_and_changes_nothing(
    narrow_encoder, clip, reference
):
    stream = StreamEncoder(narrow_encoder)
    before = push_all(stream, clip[:9])
    r = stream.receptive_field
    with pytest.raises(ValueError, match=rf"needs the last {r} frames .* approximate=True"):
        stream.resume([f.numpy() for f in clip[101 : 101 + r - 1]], first_index=101)
    for bad in (2, -1, 4, 1.0, True):
        with pytest.raises(ValueError, match="first_index must be 0 or the first frame of a group"):
            stream.resume([clip[0].numpy()], first_index=bad)
    with pytest.raises(ValueError, match="at least one frame"):
        stream.resume([], first_index=0)
    bad_size = [torch.zeros(3, 16, 16, dtype=torch.uint8)] + [f.permute(2, 0, 1) for f in clip[1:3]]
    with pytest.raises(ValueError, match="fixed for a stream"):
        stream.resume(bad_size, first_index=0)
    assert stream.frames_pushed == 9
    assert_same(before + push_all(stream, clip[9:40], start=9), reference)


def test_resume_approximate_flags_latents_until_the_window_is_full(narrow_encoder, clip, reference):
    stream = StreamEncoder(narrow_encoder)
    r = stream.receptive_field
    first = 41
    out = stream.resume([f.numpy() for f in clip[first:61]], first_index=first, approximate=True)
    later = push_all(stream, clip[61:], start=61)
    exact_from = -(-(first + r - 1) // 4)  # the first latent whose window starts at `first`
    flagged = [lat.index for lat in out + later if lat.approximate]
    assert 11 < exact_from < 50 and flagged == list(range(11, exact_from))
    assert [lat.index for lat in out + later] == list(range(11, 50))
    assert_same([lat for lat in later if not lat.approximate], reference)
    # The approximate ones are really not exact (their window reaches before the replay).
    by_index = {lat.index: lat for lat in reference}
    assert not torch.equal(out[0].data, by_index[out[0].index].data)


@pytest.mark.slow
def test_resume_full_wan21_is_bit_identical(wan21_encoder):
    clip = random_video(150, 8, 8, seed=22)[0]
    reference = push_all(StreamEncoder(wan21_encoder), clip)
    stream = StreamEncoder(wan21_encoder)
    r = stream.receptive_field
    first = group_start(4 * 30 - r + 1)
    replayed = stream.resume(
        [f.numpy() for f in clip[first:130]],
        first_index=first,
        timestamps=[1000.0 + i for i in range(first, 130)],
    )
    assert replayed[0].index == 30
    assert_same(replayed + push_all(stream, clip[130:], start=130), reference)


# -- snapshot / restore ----

CHILD = """
import sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
from helpers import random_encoder, random_video
from streamvae import StreamEncoder, narrow
stream = StreamEncoder(random_encoder(narrow(8), seed=1), mode={mode!r})
for i, frame in enumerate(random_video(200, 8, 8, seed=21)[0][:{upto}]):
    stream.push(frame.numpy(), timestamp=1000.0 + i)
open({path!r}, "wb").write(stream.snapshot())
"""


@pytest.mark.parametrize(("mode", "upto"), [("frame", 66), ("group", 63)])
def test_snapshot_restores_exactly_in_another_process(narrow_encoder, clip, tmp_path, mode, upto):
    path = tmp_path / "state.safetensors"
    code = CHILD.format(
        repo=str(REPO), tests=str(REPO / "tests"), mode=mode, upto=upto, path=str(path)
    )
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120)
    reference = push_all(StreamEncoder(narrow_encoder, mode=mode), clip[:100])
    stream = StreamEncoder(narrow_encoder, mode=mode)
    stream.restore(path.read_bytes())
    assert stream.frames_pushed == upto and stream.frame_size == (8, 8)
    later = push_all(stream, clip[upto:100], start=upto)
    assert later[0].index == (upto - 1) // 4 + 1
    assert_same(later, reference)


def test_snapshot_keeps_the_pending_frames_for_padding(narrow_encoder, clip):
    original = StreamEncoder(narrow_encoder, pad_tail=True)
    push_all(original, clip[:11])
    moved = StreamEncoder(narrow_encoder, pad_tail=True)
    moved.restore(original.snapshot())
    a, b = original.flush(), moved.flush()
    assert (
        len(a) == 1 and a[0].padded == 2 and b[0].padded == 2 and torch.equal(a[0].data, b[0].data)
    )


def test_snapshot_keeps_source_frame_numbers_and_drops(narrow_encoder, clip):
    """A mid-group snapshot carries the pending frames' source numbers and the last number
    emitted, so the restored stream labels its next latents (``source_frames``,
    ``dropped_before``) as the original does."""
    from streamvae import Frame

    def numbered(i: int) -> Frame:
        # Source numbers with a hole of 4 (a dropped group) between frames 8 and 9.
        return Frame(clip[i].numpy(), number=i if i <= 8 else i + 4)

    original = StreamEncoder(narrow_encoder)
    for i in range(11):
        original.push(numbered(i))
    moved = StreamEncoder(narrow_encoder)
    moved.restore(original.snapshot())
    a = [lat for i in range(11, 17) for lat in original.push(numbered(i))]
    b = [lat for i in range(11, 17) for lat in moved.push(numbered(i))]
    assert [lat.source_frames for lat in a] == [lat.source_frames for lat in b]
    assert [lat.source_frames for lat in b] == [(13, 14, 15, 16), (17, 18, 19, 20)]
    assert [lat.dropped_before for lat in b] == [4, 0]
    assert all(torch.equal(x.data, y.data) for x, y in zip(a, b))


def test_restore_is_refused_for_another_model_size_dtype_or_mode(narrow_encoder, clip, reference):
    source = StreamEncoder(narrow_encoder)
    push_all(source, clip[:20])
    data = source.snapshot()

    stream = StreamEncoder(narrow_encoder)
    before = push_all(stream, clip[:13])
    cases = [
        (StreamEncoder(random_encoder(narrow(8), seed=5)), "another model"),
        (StreamEncoder(random_encoder(narrow(8), seed=1, dtype=torch.bfloat16)), "another dtype"),
        (StreamEncoder(narrow_encoder, mode="group"), "another mode"),
    ]
    for other, message in cases:
        with pytest.raises(SnapshotError, match=message):
            other.restore(data)
    sized = StreamEncoder(narrow_encoder)
    sized.push(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(
        SnapshotError, match="snapshot of 8x8 frames; this stream's frames are 16x16"
    ):
        sized.restore(data)
    assert sized.frames_pushed == 1 and sized.frame_size == (16, 16)
    for garbage in (b"", b"not a snapshot at all", data[:100], 3):
        with pytest.raises(SnapshotError):
            stream.restore(garbage)
    # The refused restores left the stream as it was.
    assert_same(before + push_all(stream, clip[13:40], start=13), reference)


def test_snapshot_before_any_frame_is_refused(narrow_encoder):
    with pytest.raises(ValueError, match="no frame yet"):
        StreamEncoder(narrow_encoder).snapshot()


# -- ring windows (the CUDA default), run on the CPU; and another device ----


@pytest.fixture
def ring_on_cpu(monkeypatch):
    from streamvae.model import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "RING_DEVICES", frozenset({"cpu"}))
    return monkeypatch


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_resume_with_ring_windows_is_bit_identical(ring_on_cpu, narrow_encoder, clip):
    reference = push_all(StreamEncoder(narrow_encoder), clip)
    stream = StreamEncoder(narrow_encoder)
    first = group_start(4 * 35 - stream.receptive_field + 1)
    replayed = stream.resume(
        [f.numpy() for f in clip[first:150]],
        first_index=first,
        timestamps=[1000.0 + i for i in range(first, 150)],
    )
    assert stream._state is not None and stream._state.conv_in.ring
    assert_same(replayed + push_all(stream, clip[150:], start=150), reference)


def test_snapshot_of_a_ring_state_restores_into_a_shifted_one(ring_on_cpu, narrow_encoder, clip):
    from streamvae.model import encoder as encoder_module

    ring = StreamEncoder(narrow_encoder)
    push_all(ring, clip[:43])  # ring heads at an odd rotation
    assert ring._state.conv_in.ring and ring._state.conv_in.head != 2
    data = ring.snapshot()
    ring_on_cpu.setattr(encoder_module, "RING_DEVICES", frozenset())
    shifted = StreamEncoder(narrow_encoder)
    shifted.restore(data)
    assert not shifted._state.conv_in.ring
    a = push_all(ring, clip[43:80], start=43)
    b = push_all(shifted, clip[43:80], start=43)
    assert [x.index for x in a] == [y.index for y in b] and a
    assert max(rel(x.data, y.data) for x, y in zip(a, b)) <= 1e-5


@pytest.mark.cuda
def test_snapshot_on_the_cpu_continues_on_cuda(clip):
    cpu_encoder = random_encoder(narrow(8), seed=1)
    cuda_encoder = random_encoder(narrow(8), seed=1).cuda()
    reference = push_all(StreamEncoder(cpu_encoder), clip[:80])
    source = StreamEncoder(cpu_encoder)
    push_all(source, clip[:41])
    moved = StreamEncoder(cuda_encoder)
    moved.restore(source.snapshot())
    later = push_all(moved, clip[41:80], start=41)
    by_index = {lat.index: lat for lat in reference}
    assert later and max(rel(lat.data, by_index[lat.index].data) for lat in later) <= 1e-5


@pytest.mark.parametrize("name", ["streamvae.receptive", "streamvae.snapshot", "streamvae.stream"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("mode", ["frame", "group"])
def test_wan22_resume_and_snapshot_are_bit_identical(mode):
    """Wan 2.2: the shortcuts' pending frames are in the snapshot, and resume starts them as a
    stream at a group boundary has them."""
    from streamvae import WAN22

    encoder = random_encoder(narrow(8, WAN22), seed=6)
    frames = random_video(160, 32, 16, seed=22)[0]
    reference = push_all(StreamEncoder(encoder, mode=mode), frames)
    stream = StreamEncoder(encoder, mode=mode)
    first = 21  # a group's first frame; 116 frames replayed, more than R
    assert 137 - first >= stream.receptive_field
    stamps = [1000.0 + i for i in range(first, 137)]
    resumed = stream.resume(frames[first:137].numpy(), first_index=first, timestamps=stamps)
    resumed += push_all(stream, frames[137:], start=137)
    assert [lat.index for lat in resumed] == [34, 35, 36, 37, 38, 39]
    assert_same(resumed, reference)
    original = StreamEncoder(encoder, mode=mode)
    push_all(original, frames[:23])  # mid-group: a pair of the shortcut may be pending
    moved = StreamEncoder(encoder, mode=mode)
    moved.restore(original.snapshot())
    assert_same(push_all(moved, frames[23:60], start=23), reference)


def _edited(data: bytes, *, tensors=None, **state_changes) -> bytes:
    """The snapshot ``data`` with some of its counters (or tensors) replaced."""
    import json

    from streamvae.snapshot import pack, unpack

    old_tensors, meta = unpack(data)
    state = {**json.loads(meta["state"]), **state_changes}
    meta = {k: v for k, v in meta.items() if k != "format"}
    return pack({**old_tensors, **(tensors or {})}, {**meta, "state": json.dumps(state)})


def test_a_malformed_snapshot_is_refused_whole_and_the_stream_is_untouched(
    narrow_encoder, clip, reference
):
    """Each malformed snapshot raises SnapshotError (never a plain ValueError, never later as
    an IndexError) and leaves the stream as it was: validated before anything is replaced."""
    from streamvae.snapshot import unpack

    source = StreamEncoder(narrow_encoder)
    push_all(source, clip[:6])  # 6 frames: latents 0 and 1, one frame pending
    data = source.snapshot()
    tensors, _ = unpack(data)
    name = next(k for k in tensors if k != "group")
    nan = {name: torch.full_like(tensors[name], float("nan"))}
    inf = {name: torch.full_like(tensors[name], float("inf"))}
    cases = {
        "exact_from 'x'": _edited(data, exact_from="x"),
        "no timestamps": _edited(data, timestamps=[], numbers=[]),
        "too many timestamps": _edited(data, timestamps=[1.0, 2.0], numbers=[None, None]),
        "NaN state": _edited(data, tensors=nan),
        "inf state": _edited(data, tensors=inf),
        "NaN pending frame": _edited(
            data, tensors={"group": torch.full_like(tensors["group"], float("nan"))}
        ),
        "latents not what frames make": _edited(data, latents=7),
        "frames a bool": _edited(data, frames=True),
        "gap_pending a string": _edited(data, gap_pending="no"),
        "dropped_frames negative": _edited(data, dropped_frames=-1),
        "layers not integers": _edited(data, layers={"conv.0.history": "two"}),
        "a timestamp NaN": _edited(data, timestamps=[float("nan")]),
        "wrong dtype": _edited(data, tensors={name: tensors[name].double()}),
        "wrong shape": _edited(data, tensors={name: tensors[name][:, :1]}),
        "pending frames of another size": _edited(
            data, tensors={"group": torch.zeros(1, 3, 1, 16, 16)}
        ),
    }
    stream = StreamEncoder(narrow_encoder)
    before = push_all(stream, clip[:2])
    for what, bad in cases.items():
        try:
            stream.restore(bad)
        except SnapshotError:
            pass
        else:
            raise AssertionError(f"{what}: restored")
        assert stream.frames_pushed == 2 and stream.latents_emitted == 1, what
    # The refused restores left the stream as it was: it goes on exactly.
    assert_same(before + push_all(stream, clip[2:30], start=2), reference)
    # The same snapshot, unedited, still restores (the edits were what it refused).
    fresh = StreamEncoder(narrow_encoder)
    fresh.restore(_edited(data))
    assert_same(push_all(fresh, clip[6:30], start=6), reference)
