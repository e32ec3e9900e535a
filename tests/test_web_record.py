"""FrameRecorder / read_recording: the frames a stream got, back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from streamvae.io import SourceFrame
from streamvae.web.record import FrameRecorder, read_recording


def test_frames_come_back_exactly_with_their_numbers_and_gaps(tmp_path):
    rng = np.random.default_rng(0)
    frames = [
        SourceFrame(
            rng.integers(0, 256, (16, 24, 3), dtype=np.uint8),
            1000.0 + n,
            gap=n == 3,
            number=n if n < 3 else n - 3,
            run=int(n >= 3),
            stream_time=n / 30,
        )
        for n in range(6)
    ]
    with FrameRecorder(tmp_path / "rec") as recorder:
        for frame in frames:
            recorder.add(frame)
    back = read_recording(tmp_path / "rec")
    assert len(back) == recorder.count == 6
    for a, b in zip(frames, back):
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.number, a.run, a.gap, a.timestamp, a.stream_time) == (
            b.number,
            b.run,
            b.gap,
            b.timestamp,
            b.stream_time,
        )


def test_a_directory_in_use_is_refused(tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "frames.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="is not empty"):
        FrameRecorder(tmp_path / "rec")


def test_the_first_write_error_is_raised_not_lost(tmp_path, monkeypatch):
    import streamvae.web.record as record

    written = []

    def imwrite(path, image):  # the first write fails, the later ones succeed
        written.append(path)
        return len(written) > 1

    monkeypatch.setattr(record.cv2, "imwrite", imwrite)
    frame = SourceFrame(np.zeros((8, 8, 3), np.uint8), 0.0)
    recorder = FrameRecorder(tmp_path / "rec")
    recorder.add(frame)
    with pytest.raises(OSError, match=r"could not write .*000000\.png"):
        try:  # the second add raises it if the first write has failed by then
            recorder.add(frame)
        finally:
            recorder.close()
