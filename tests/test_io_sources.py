"""Sources: files, synthetic, the webcam path on a file, and the live drop policy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import io_fixtures
from io_fixtures import make_video, read_video_frames
from streamvae import StreamEncoder
from streamvae.io import Backoff, encode_to_sinks, open_source, parse_size
from streamvae.io.sources import (
    SourceError,
    SourceFrame,
    SourceStats,
    _GroupQueue,
    fit_frame,
    source_kind,
    synthetic_frame,
)

test_video = io_fixtures.test_video  # fixtures
one_torch_thread = io_fixtures.one_torch_thread


def test_parse_size_and_fit_frame():
    assert parse_size("480x832") == (480, 832)
    assert parse_size((64, 96)) == (64, 96)
    for bad in ("480x830", "0x64", "64", "64x64x3", "-8x8"):
        with pytest.raises(ValueError, match="size must be HxW"):
            parse_size(bad)
    image = np.zeros((528, 720, 3), np.uint8)
    image[:, :60] = 255  # a white band on the left, cut off by a centre crop to a square
    assert fit_frame(image, (64, 96), "resize").shape == (64, 96, 3)
    cropped = fit_frame(image, (64, 64), "crop")
    assert cropped.shape == (64, 64, 3) and cropped[:, 0].max() == 0
    assert fit_frame(image, (64, 64), "resize")[:, 0].min() == 255


def test_source_kinds():
    assert [source_kind(u) for u in (0, "1", "/dev/video0")] == ["webcam"] * 3
    assert [source_kind(u) for u in ("rtsp://h/x", "http://h:8/", "https://h/")] == ["network"] * 3
    assert source_kind("synthetic://moving?frames=3") == "synthetic"
    assert source_kind("clip.mp4") == source_kind("file:///tmp/clip.mp4") == "file"


def test_open_source_refuses_clearly():
    with pytest.raises(FileNotFoundError, match="no video file"):
        open_source("/nonexistent/clip.mp4")
    with pytest.raises(IsADirectoryError, match="is a directory, not a video file"):
        open_source(Path(__file__).parent)
    with pytest.raises(ValueError, match="multiples of 8"):
        open_source("synthetic://moving", size="30x30")
    with pytest.raises(ValueError, match="unknown synthetic pattern"):
        open_source("synthetic://spiral")
    with pytest.raises(ValueError, match="unknown option"):
        open_source("synthetic://moving?frame=3")


async def test_file_source_gives_every_frame_in_rgb(test_video: Path):
    expected = read_video_frames(test_video)
    async with open_source(test_video, max_queued_groups=1) as source:
        frames = [frame async for frame in source]
    assert len(frames) == len(expected) == 21
    for frame, image in zip(frames, expected):
        assert isinstance(frame, SourceFrame) and not frame.gap
        np.testing.assert_array_equal(frame.image, image)
    assert [f.number for f in frames] == list(range(21))
    assert all(a.timestamp <= b.timestamp for a, b in zip(frames, frames[1:]))
    # The stream's own times (25 fps), besides the wall-clock and monotonic capture times.
    assert [f.stream_time for f in frames] == pytest.approx([n / 25 for n in range(21)])
    assert all(a.captured < b.captured for a, b in zip(frames, frames[1:]))
    assert source.stats.dropped_frames == 0 and source.total_frames == 21
    assert source.fps == 25.0
    # Issue 17: this promised an RGB check and asserted only fps. In frame 0 of testsrc at
    # 64x64 the pixel at (y 5, x 10) is red and (y 40, x 30) blue: a BGR frame swaps them.
    red, blue = frames[0].image[5, 10], frames[0].image[40, 30]
    assert red[0] > 220 and red[1] < 35 and red[2] < 35, red
    assert blue[0] < 35 and blue[1] < 35 and blue[2] > 220, blue


async def test_a_slow_reader_of_a_file_loses_nothing(test_video: Path):
    async with open_source(test_video, max_queued_groups=1) as source:
        numbers = []
        async for frame in source:
            numbers.append(frame.number)
            await asyncio.sleep(0.01)
    assert numbers == list(range(21)) and source.stats.dropped_frames == 0


async def test_synthetic_source_is_deterministic_and_sized():
    async with open_source("synthetic://moving?frames=9", size="32x48") as source:
        frames = [frame async for frame in source]
    assert len(frames) == 9 and not source.live
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.image, synthetic_frame(i, 32, 48))
    assert not np.array_equal(frames[0].image, frames[1].image)  # it moves


def _frame(number: int, run: int = 0) -> SourceFrame:
    return SourceFrame(
        np.zeros((8, 8, 3), np.uint8), float(number), run > 0 and number == 0, number, run
    )


def test_live_queue_drops_oldest_whole_groups_and_never_frame_zero():
    stats = SourceStats()
    queue = _GroupQueue(max_groups=2, drop=True, group_frames=4, stats=stats, wake=lambda: None)
    for number in range(23):  # groups: {0} {1-4} {5-8} {9-12} {13-16} {17-20} {21, 22...}
        queue.put(_frame(number))
    taken = []
    while (frame := queue.take()) is not None:
        taken.append(frame.number)
    # Frame 0 stays (alignment), then the newest complete group and the one being filled.
    assert taken == [0, 17, 18, 19, 20, 21, 22]
    assert (stats.dropped_frames, stats.dropped_groups) == (16, 4)


def test_live_queue_never_drops_a_group_already_started():
    stats = SourceStats()
    queue = _GroupQueue(max_groups=2, drop=True, group_frames=4, stats=stats, wake=lambda: None)
    for number in range(5):
        queue.put(_frame(number))
    assert [queue.take().number for _ in range(3)] == [0, 1, 2]  # group 1-4 started
    for number in range(5, 21):
        queue.put(_frame(number))
    rest = []
    while (frame := queue.take()) is not None:
        rest.append(frame.number)
    # 3, 4 finish the started group; 5-12 dropped whole; the newest two groups wait.
    assert rest == [3, 4, *range(13, 21)]
    assert stats.dropped_frames == 8


def test_live_queue_keeps_runs_apart():
    stats = SourceStats()
    queue = _GroupQueue(max_groups=2, drop=True, group_frames=4, stats=stats, wake=lambda: None)
    for number in range(3):
        queue.put(_frame(number))
    for number in range(9):  # the source reconnected: run 1
        queue.put(_frame(number, run=1))
    taken = []
    while (frame := queue.take()) is not None:
        taken.append((frame.run, frame.number, frame.gap))
    # Nothing of run 0 was handed out: it went whole ({0} and {1, 2}), oldest first; run 1 stays.
    assert taken == [(1, 0, True)] + [(1, n, False) for n in range(1, 9)]
    assert stats.dropped_frames == 3


def test_live_queue_stays_bounded_when_a_camera_flaps():
    """Issue 17 item 8: frame 0 of every old run was never dropped, so a flapping camera with
    a slow consumer grew the queue by one group per reconnect without bound."""
    stats = SourceStats()
    queue = _GroupQueue(max_groups=2, drop=True, group_frames=4, stats=stats, wake=lambda: None)
    for run in range(50):  # 50 reconnects, six frames each, and nobody taking any
        for number in range(6):
            queue.put(_frame(number, run=run))
    taken = []
    while (frame := queue.take()) is not None:
        taken.append((frame.run, frame.number, frame.gap))
    # Only the newest run is left, whole and aligned: its frame 0 (with its gap) comes first.
    assert taken == [(49, n, n == 0) for n in range(6)]
    assert stats.dropped_frames == 49 * 6 and stats.dropped_groups == 49 * 3


def test_live_queue_drops_a_started_old_run_group_by_group():
    stats = SourceStats()
    queue = _GroupQueue(max_groups=2, drop=True, group_frames=4, stats=stats, wake=lambda: None)
    for number in range(6):
        queue.put(_frame(number, run=0))
    assert queue.take().number == 0  # run 0 has started: its later groups go one by one
    for number in range(10):
        queue.put(_frame(number, run=1))
    taken = []
    while (frame := queue.take()) is not None:
        taken.append((frame.run, frame.number))
    # Run 0's groups {1-4} and {5} go one by one (its frame 0 was handed out), then run 1's
    # oldest waiting group {1-4}; run 1's frame 0 stays, so its groups stay aligned.
    assert taken == [(1, 0)] + [(1, n) for n in range(5, 10)]
    assert (stats.dropped_frames, stats.dropped_groups) == (9, 3)


def test_file_queue_blocks_instead_of_dropping():
    stats = SourceStats()
    queue = _GroupQueue(max_groups=2, drop=False, group_frames=4, stats=stats, wake=lambda: None)
    produced: list[int] = []

    def produce() -> None:
        for number in range(30):
            if not queue.put(_frame(number)):
                return
            produced.append(number)
        queue.close()

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while len(produced) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(produced) == 5  # {0} and {1-4} queued; the third group waits
        taken = []
        while len(taken) < 30 and time.monotonic() < deadline:
            frame = queue.take()
            if frame is None:
                time.sleep(0.001)
            else:
                taken.append(frame.number)
        assert taken == list(range(30)) and stats.dropped_frames == 0
    finally:
        queue.close()
        thread.join(5)
    assert not thread.is_alive()


def _queued(stats: SourceStats) -> int:
    """Frames read but neither handed out nor dropped: what waits in the source's queue (or in
    the reader's hand, at most one, between reading a frame and queueing it). ``frames_read``
    is read first, so a frame the reader reads meanwhile cannot make it more."""
    read = stats.frames_read
    return read - stats.frames_delivered - stats.dropped_frames


@pytest.mark.parametrize("max_queued_groups", [1, 2, 3])
async def test_a_live_source_queues_frame_zero_and_max_queued_groups_groups(max_queued_groups):
    """Issue 24 item 2: what a live source keeps for a consumer that has not read yet is its
    bound, exactly: frame 0 and the newest ``max_queued_groups`` whole groups; every older
    group is dropped and counted (its lag is this bound, whatever the clock says)."""
    total = 1 + 4 * 12  # frame 0 and twelve groups
    async with open_source(
        f"synthetic://moving?frames={total}", size="16x16", live=True,
        max_queued_groups=max_queued_groups,
    ) as source:  # fmt: skip
        assert source.live and not source.reconnect
        # Once the last frame is read, the last group's first frame (which made the drops)
        # has been queued: the queue holds what it will hand out.
        await io_fixtures.wait_until(
            lambda: source.stats.frames_read == total, 30, "the reader to read every frame"
        )
        numbers = [frame.number async for frame in source]
    kept = 4 * max_queued_groups
    assert numbers == [0, *range(total - kept, total)]
    assert source.stats.dropped_groups == 12 - max_queued_groups
    assert source.stats.dropped_frames == total - 1 - kept


async def test_slow_consumer_of_a_live_source_drops_whole_groups_and_queues_at_most_its_bound():
    """A camera-paced source at 200 fps and a consumer that takes 20 ms a frame (50 fps)."""
    period = 0.02
    async with open_source("synthetic://moving?fps=200&frames=400", size="16x16") as source:
        frames = []
        queued = []
        async for frame in source:
            queued.append(_queued(source.stats))
            frames.append(frame.number)
            await asyncio.sleep(period)
    stats = source.stats
    assert source.live and stats.frames_read == 400
    assert stats.dropped_frames > 0 and stats.dropped_frames == 4 * stats.dropped_groups
    assert stats.frames_delivered == len(frames) == 400 - stats.dropped_frames
    assert frames[0] == 0
    missing = sorted(set(range(400)) - set(frames))
    assert all(number % 4 == 1 and missing[i : i + 4] == list(range(number, number + 4))
               for i, number in enumerate(missing) if i % 4 == 0)  # fmt: skip
    assert len(missing) == stats.dropped_frames
    # What waits behind the frame in hand: the rest of its group (3 at most), the 2 queued
    # groups (the default max_queued_groups) and a frame the reader holds. The lag is this
    # many frames of the camera, whatever the machine's load; without dropping, it would grow
    # to hundreds.
    assert max(queued) <= 3 + 4 * 2 + 1, queued


async def test_webcam_path_on_a_file_reconnects_with_a_gap(test_video: Path, narrow_encoder):
    """A file standing in for a camera device: live policy, and reopened when it 'unplugs'."""
    source = open_source(test_video, kind="webcam", backoff=Backoff(initial=0.05, maximum=0.05))
    assert source.live and source.reconnect
    frames: list[SourceFrame] = []
    async with source:
        async for frame in source:
            frames.append(frame)
            if len(frames) == 30:
                break
    assert source.stats.reconnects >= 1 and source.stats.disconnects >= 1
    gap_frames = [f for f in frames if f.gap]
    assert gap_frames and gap_frames[0].number == 0 and gap_frames[0].run == 1
    # Through the encoder: the first run's partial group is dropped, the next latent has gap.
    encoder = StreamEncoder(narrow_encoder)
    latents = list(_push_all(encoder, frames))
    gap_latents = [x for x in latents if x.gap]
    assert gap_latents and gap_latents[0].index == 0


def _push_all(encoder: StreamEncoder, frames):
    for frame in frames:
        yield from encoder.push(frame)
    yield from encoder.flush()


async def test_a_file_ending_mid_group_drops_and_counts_the_partial_group(
    tmp_path: Path, narrow_encoder
):
    """Issue 7 §2, a source that dies mid-group: the complete latents, and the rest counted."""
    video = make_video(tmp_path / "seven.avi", frames=7)
    encoder = StreamEncoder(narrow_encoder)

    class ListSink:
        def __init__(self) -> None:
            self.latents = []

        async def send(self, latent) -> None:
            self.latents.append(latent)

    sink = ListSink()
    async with open_source(video) as source:
        stats = await encode_to_sinks(source, encoder, [sink])
    assert [x.frames for x in sink.latents] == [range(0, 1), range(1, 5)]
    assert stats.frames == 7 and stats.dropped_by_encoder == 2
    frames = read_video_frames(video)
    expected = narrow_encoder.encode(
        torch.from_numpy(np.stack(frames[:5])).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    )
    for latent in sink.latents:
        assert torch.allclose(latent.data, expected[0, :, latent.index], rtol=0, atol=1e-5)


async def test_stop_ends_iteration_and_the_reader_thread():
    before = {t.ident for t in threading.enumerate()}
    source = open_source("synthetic://moving?fps=30", size="16x16")
    async with source:
        async for frame in source:
            if frame.number == 2:
                source.stop()
    after = {t.ident for t in threading.enumerate() if t.is_alive()}
    assert after <= before


async def test_an_encoder_slower_than_a_live_source_stays_current(narrow_encoder, one_torch_thread):
    """A camera-paced source at 1000 fps into the narrow encoder at 64x64 (about 5 ms a frame
    here at best, slower when the machine is busy): the source drops whole groups, every drop
    is counted, and the lag stays flat instead of growing with the backlog."""

    class LatencySink:
        def __init__(self) -> None:
            self.lags: list[float] = []
            self.queued: list[int] = []  # frames waiting in the source when a latent leaves
            self.latents: list = []

        async def send(self, latent) -> None:
            self.lags.append(time.time() - latent.timestamps[-1])
            self.queued.append(_queued(source.stats))
            self.latents.append(latent)

    sink = LatencySink()
    async with open_source("synthetic://moving?fps=1000&frames=1000", size="64x64") as source:
        stats = await encode_to_sinks(source, StreamEncoder(narrow_encoder), [sink])
    dropped = source.stats.dropped_frames
    assert dropped > 0 and dropped == 4 * source.stats.dropped_groups
    assert stats.frames == 1000 - dropped == source.stats.frames_delivered
    assert stats.latents == 1 + (stats.frames - 1) // 4
    # The queue holds at most 2 groups besides the one in the encoder (the rest of it, 3 at
    # most) and a frame in the reader's hand: the lag is bounded by these 12 frames of
    # encoding, not by the 1000-frame backlog a non-dropping queue builds.
    assert max(sink.queued) <= 3 + 4 * 2 + 1, sink.queued
    per_frame = stats.elapsed / stats.frames
    late = sink.lags[len(sink.lags) // 2 :]
    print(
        f"slow consumer: {dropped} of 1000 frames dropped in {source.stats.dropped_groups} "
        f"groups; lag median {sorted(late)[len(late) // 2] * 1000:.0f} ms, "
        f"max {max(late) * 1000:.0f} ms; {per_frame * 1000:.1f} ms a frame"
    )
    # Issue 17 item 6: each latent names its source frames and counts the drops before it.
    latents = sink.latents
    assert latents[0].source_frames == (0,) and latents[0].dropped_before == 0
    for before, latent in zip(latents, latents[1:]):
        first, last = latent.source_frames[0], latent.source_frames[-1]
        assert latent.source_frames == tuple(range(first, last + 1)) and last - first == 3
        assert latent.dropped_before == first - before.source_frames[-1] - 1
        assert latent.dropped_before % 4 == 0
    counted = sum(x.dropped_before for x in latents)
    assert 0 < counted <= dropped and dropped - counted < 4 * 4  # the rest: after the last one


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_cancelled_consumer_leaves_no_thread_or_descriptor(
    test_video: Path, narrow_encoder
):
    """Issue 7 §2: cancel the task that encodes a live source (and one that reads a file)."""
    for uri, kind in (("synthetic://moving?fps=100", "synthetic"), (str(test_video), "webcam")):
        threads_before = set(threading.enumerate())
        fds_before = _open_fds()
        started = asyncio.Event()

        class Sink:
            def __init__(self, started: asyncio.Event) -> None:
                self.started = started

            async def send(self, latent) -> None:
                self.started.set()

        async def run(uri: str = uri, kind: str = kind, started=started) -> None:
            async with open_source(uri, kind=kind, size="32x32") as source:
                await encode_to_sinks(source, StreamEncoder(narrow_encoder), [Sink(started)])

        task = asyncio.ensure_future(run())
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        assert not leaked, leaked
        assert _open_fds() <= fds_before, uri


async def test_frames_are_rgb(tmp_path: Path):
    video = tmp_path / "red.avi"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         "color=c=red:size=32x32:rate=10", "-frames:v", "3", "-c:v", "mpeg4", "-q:v", "2", str(video)],
        check=True, timeout=60,
    )  # fmt: skip
    async with open_source(video) as source:
        frames = [frame.image async for frame in source]
    mean = np.stack(frames).reshape(-1, 3).mean(axis=0)
    assert mean[0] > 200 and mean[1] < 60 and mean[2] < 60, mean


@pytest.mark.network
async def test_a_source_that_opens_but_yields_nothing_obeys_max_reconnects(tmp_path: Path):
    """Issue 17 item 8: it reconnected forever whatever max_reconnects said (199 reopens in
    2 s with max_reconnects=2). Issue 24 item 8: a real endpoint, not a stand-in for
    ``FrameSource._open``: an HTTP server on loopback whose video is an AVI header without a
    frame, so that FFmpeg opens the stream each time and it ends at once."""
    (tmp_path / "www").mkdir()
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc=size=32x32:rate=10", "-frames:v", "0", "-c:v", "mpeg4",
         str(tmp_path / "www" / "empty.avi")],
        check=True, timeout=60,
    )  # fmt: skip
    port = io_fixtures.free_port()
    log = tmp_path / "http.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "--bind", io_fixtures.HOST, str(port),
             "--directory", str(tmp_path / "www")],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        io_fixtures.wait_for_port(port, timeout=30, process=server)
        source = open_source(
            f"http://{io_fixtures.HOST}:{port}/empty.avi",
            max_reconnects=2,
            backoff=Backoff(initial=0.01, maximum=0.01),
        )
        assert source.kind == "network" and source.reconnect

        async def read_all() -> list:
            async with source:
                return [frame async for frame in source]

        with pytest.raises(
            SourceError, match=r"gave no frame 3 times in a row \(max_reconnects=2\)"
        ):
            await asyncio.wait_for(read_all(), 30)
    finally:
        io_fixtures.stop_process(server)  # by its PID: SIGTERM, then SIGKILL
    assert server.poll() is not None
    assert source.has_opened and source.stats.disconnects == 3
    assert source.stats.frames_read == 0
    # The server saw the three opens, one request each, and nothing after the source gave up.
    assert log.read_text().count('"GET /empty.avi HTTP/1.1" 200') == 3, log.read_text()


async def test_secrets_in_a_camera_url_stay_out_of_errors_and_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Issue 17 (lesser): ``?user=...&pwd=...`` (common on IP cameras) reached SourceError and
    the logs; and a source password could only be given on the command line."""
    import logging

    from streamvae.io import sources

    caplog.set_level(logging.DEBUG)
    port = io_fixtures.free_port()  # nothing listens there
    url = f"rtsp://127.0.0.1:{port}/cam?user=admin&pwd=hunter2&channel=1"
    source = open_source(url, reconnect=False, open_timeout=2, read_timeout=2)
    with pytest.raises(sources.SourceError) as failed:
        async with source:
            async for _ in source:
                pass
    shown = str(failed.value) + repr(source) + caplog.text + str(source.stats.last_error)
    assert "hunter2" not in shown and "pwd=***" in str(failed.value)
    # The password kept apart from the URL: OpenCV gets it, no message shows it.
    targets = []
    real = sources._OpenCvCapture.__init__

    def recording(self, target, **options):
        targets.append(target)
        real(self, target, **options)

    monkeypatch.setattr(sources._OpenCvCapture, "__init__", recording)
    source = open_source(
        f"rtsp://admin@127.0.0.1:{port}/cam", password="s3cr:t/pw", reconnect=False, open_timeout=2
    )
    with pytest.raises(sources.SourceError) as failed:
        async with source:
            async for _ in source:
                pass
    assert targets == [f"rtsp://admin:s3cr%3At%2Fpw@127.0.0.1:{port}/cam"]
    assert "s3cr" not in str(failed.value) + caplog.text + repr(source)
    with pytest.raises(ValueError, match="needs the user in the URL"):
        open_source(f"rtsp://127.0.0.1:{port}/cam", password="x")
    with pytest.raises(ValueError, match="network streams"):
        open_source("synthetic://moving", password="x")


def test_the_cli_reads_the_source_password_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import argparse

    from streamvae.io.commands import source_password

    monkeypatch.delenv("STREAMVAE_SOURCE_PASSWORD", raising=False)
    assert source_password(argparse.Namespace(source_password_file=None)) is None
    monkeypatch.setenv("STREAMVAE_SOURCE_PASSWORD", "from-env")
    assert source_password(argparse.Namespace(source_password_file=None)) == "from-env"
    secret = tmp_path / "pw"
    secret.write_text("from-file\nignored\n")
    assert source_password(argparse.Namespace(source_password_file=str(secret))) == "from-file"


async def test_frames_discarded_by_stop_are_counted():
    """Issue 17 (lesser): frames queued when stop() ended the iteration vanished uncounted."""
    source = open_source("synthetic://moving?fps=500", size="16x16", max_queued_groups=4)
    async with source:
        async for frame in source:
            if frame.number == 0:
                await io_fixtures.wait_until(
                    lambda: source.stats.frames_read > 6, 10, "frames to queue up"
                )
                source.stop()
    await source.aclose()
    stats = source.stats
    assert stats.discarded_at_stop > 0
    assert (
        stats.frames_read == stats.frames_delivered + stats.dropped_frames + stats.discarded_at_stop
    )


def test_a_source_never_closed_stops_its_reader_with_its_event_loop():
    """Issue 17 (lesser): a FrameSource never closed kept its reader thread forever."""
    sources = {}

    async def main(uri: str) -> None:
        source = open_source(uri, size="16x16", max_queued_groups=1)
        sources[uri] = source
        async for frame in source:
            if frame.number == 1:
                return  # neither stop() nor aclose(): the reader is left running

    for uri in ("synthetic://moving?fps=200", "synthetic://moving"):  # live, and blocking
        asyncio.run(main(uri))
        thread = sources[uri]._thread
        thread.join(10)
        assert not thread.is_alive(), uri


async def test_opened_waits_for_the_source_and_reports_a_bad_one(test_video: Path, tmp_path: Path):
    async with open_source(test_video) as source:
        assert await source.opened()
        assert source.total_frames == len(read_video_frames(test_video))
        assert await source.opened()  # again: at once
        assert len([frame async for frame in source]) == source.total_frames  # nothing consumed
    not_video = tmp_path / "notes.md"
    not_video.write_text("# not a video\n")
    async with open_source(not_video) as source:
        with pytest.raises(SourceError, match=r"could not open .*notes\.md.*not a video"):
            await source.opened()
    # A reconnecting source that cannot open: opened() keeps waiting until it is stopped.
    source = open_source(not_video, kind="webcam", backoff=Backoff(initial=0.01, maximum=0.01))
    async with source:
        waiting = asyncio.ensure_future(source.opened())
        await asyncio.sleep(0.2)
        assert not waiting.done() and source.stats.last_error is not None
        source.stop()
        assert await asyncio.wait_for(waiting, 5) is False


def test_a_mistyped_scheme_is_kept_as_typed_and_the_scheme_suggested():
    """Issue 23: ``rstp://`` was taken for a file and shown as ``rstp:/...`` (a slash lost)."""
    with pytest.raises(ValueError) as caught:
        open_source("rstp://127.0.0.1:8554/x")
    message = str(caught.value)
    assert "'rstp://127.0.0.1:8554/x'" in message and "did you mean rtsp://?" in message
    with pytest.raises(ValueError, match="did you mean synthetic://"):
        open_source("sythetic://moving?frames=3")
    with pytest.raises(ValueError, match=r"unknown scheme 'foo://'") as caught:
        open_source("foo://x")
    assert "did you mean" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match=r"no video file at 'missing/clip\.mp4'"):
        open_source("missing/clip.mp4")


@pytest.mark.skipif(not os.path.isdir("/dev") or os.uname().sysname != "Linux", reason="Linux only")
async def test_a_camera_that_does_not_exist_is_named():
    """Issue 23: a camera index with no device node is refused by name (OpenCV only warns)."""
    index = next(n for n in range(90, 200) if not os.path.exists(f"/dev/video{n}"))
    for uri in (index, f"/dev/video{index}"):
        source = open_source(uri, reconnect=False)
        assert source.kind == "webcam"
        async with source:
            with pytest.raises(SourceError, match=f"no camera at /dev/video{index}"):
                await source.opened()


def test_an_rtsp_listener_gets_a_valid_listen_timeout():
    """Issue 23: FFmpeg's default listen_timeout (-1) is refused by its TCP layer, so a listener
    without one never opened; one is set, and OpenCV's open timeout outlasts it."""
    from streamvae.io.sources import LISTEN_TIMEOUT, _listen_options, _listens

    assert _listens({"rtsp_flags": "listen"}) and _listens({"rtsp_flags": "prefer_tcp+listen"})
    assert not _listens({"rtsp_transport": "tcp"}) and not _listens({"rtsp_flags": "filter_src"})
    options, open_timeout = _listen_options({"rtsp_flags": "listen"}, 10.0)
    assert options == {"rtsp_flags": "listen", "listen_timeout": str(LISTEN_TIMEOUT)}
    assert open_timeout > LISTEN_TIMEOUT
    given, open_timeout = _listen_options({"rtsp_flags": "listen", "listen_timeout": "30"}, 10.0)
    assert given["listen_timeout"] == "30" and open_timeout > 30
