"""The file sink: appended as latents come, readable while growing and after a crash."""

from __future__ import annotations

import logging
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_io_wire import make_latent

from streamvae.io import FileSink, WireError, iter_latents, read_latents
from streamvae.io.filesink import FILE_MAGIC


def test_round_trip_and_reading_while_it_grows(tmp_path: Path):
    path = tmp_path / "out" / "cam.latents"
    latents = [make_latent(i) for i in range(5)]
    with FileSink(path, labels={"stream": "cam"}) as sink:
        assert read_latents(path) == []
        for i, latent in enumerate(latents):
            sink.write(latent)
            seen = read_latents(path)  # another reader, while the sink is open
            assert [x.index for x in seen] == list(range(i + 1))
    back = read_latents(path)
    for original, decoded in zip(latents, back, strict=True):
        assert torch.equal(original.data, decoded.data)
        assert (decoded.frames, decoded.timestamps) == (original.frames, original.timestamps)
        assert decoded.meta == {"stream": "cam"}
    assert sink.latents_written == 5


def test_every_cut_of_the_last_record_reads_the_complete_ones(tmp_path: Path):
    path = tmp_path / "a.latents"
    with FileSink(path) as sink:
        for i in range(3):
            sink.write(make_latent(i, h=2, w=2))
    data = path.read_bytes()
    two = len(FILE_MAGIC) + 2 * (len(data) - len(FILE_MAGIC)) // 3
    cut_file = tmp_path / "cut.latents"
    for end in range(two, len(data)):
        cut_file.write_bytes(data[:end])
        assert [x.index for x in read_latents(cut_file)] == [0, 1], end
    for end in range(len(FILE_MAGIC)):  # a writer that has only just started
        cut_file.write_bytes(data[:end])
        assert read_latents(cut_file) == []


def test_append_cuts_a_torn_record_only_when_asked_to_repair(tmp_path: Path):
    path = tmp_path / "a.latents"
    with FileSink(path) as sink:
        sink.write(make_latent(0))
        sink.write(make_latent(1))
    path.write_bytes(path.read_bytes()[:-10])
    torn = path.read_bytes()
    with pytest.raises(WireError, match=r"incomplete record 1.*repair=True"):
        FileSink(path, append=True)
    assert path.read_bytes() == torn  # refused: not a byte changed
    with FileSink(path, append=True, repair=True) as sink:
        sink.write(make_latent(2))
    assert [x.index for x in read_latents(path)] == [0, 2]


def _four_records(path: Path) -> list[int]:
    """Writes four latents; the byte offset of each record."""
    offsets = []
    with FileSink(path) as sink:
        for i in range(4):
            offsets.append(len(FILE_MAGIC) + sink.bytes_written)
            sink.write(make_latent(i))
    return offsets


@pytest.mark.parametrize("delta", [-100, +1, +10_000])
def test_a_corrupted_length_is_an_error_and_append_deletes_nothing(tmp_path: Path, delta: int):
    """Issue 17 item 2: a bad length in record 1 was taken for a torn end: read_latents
    returned one record without a word, and an append then cut the file (2,036 -> 1,028 B)."""
    path = tmp_path / "a.latents"
    offsets = _four_records(path)
    data = bytearray(path.read_bytes())
    length = struct.unpack_from("<Q", data, offsets[1] + 4)[0]
    struct.pack_into("<Q", data, offsets[1] + 4, length + delta)
    path.write_bytes(bytes(data))
    with pytest.raises(WireError, match=f"record 1 at byte {offsets[1]} fails its header checksum"):
        read_latents(path)
    for repair in (False, True):
        with pytest.raises(WireError, match="record 1"):
            FileSink(path, append=True, repair=repair)
        assert path.read_bytes() == bytes(data)


def _as_version_1(data: bytes) -> bytes:
    """The same records in the version 1 layout (no header checksum)."""
    out, offset = bytearray(b"STREAMVAE-LATENTS/1\n"), len(FILE_MAGIC)
    while offset < len(data):
        length = struct.unpack_from("<Q", data, offset + 4)[0]
        payload_and_crc = data[offset + 16 : offset + 16 + length + 4]
        out += b"SVL1" + struct.pack("<Q", length) + payload_and_crc
        offset += 16 + length + 4
    return bytes(out)


def test_version_1_files_are_read_appended_and_checked(tmp_path: Path):
    path = tmp_path / "a.latents"
    _four_records(path)
    old = tmp_path / "old.latents"
    old.write_bytes(_as_version_1(path.read_bytes()))
    assert [x.index for x in read_latents(old)] == [0, 1, 2, 3]
    with FileSink(old, append=True) as sink:
        sink.write(make_latent(4))
    assert old.read_bytes().startswith(b"STREAMVAE-LATENTS/1\n")
    assert [x.index for x in read_latents(old)] == [0, 1, 2, 3, 4]
    # A bad length in record 1 (no header checksum there): the records after it give it away.
    data = bytearray(old.read_bytes())
    second = len(FILE_MAGIC) + 12 + struct.unpack_from("<Q", data, len(FILE_MAGIC) + 4)[0] + 4
    length = struct.unpack_from("<Q", data, second + 4)[0]
    struct.pack_into("<Q", data, second + 4, length + 50_000)
    old.write_bytes(bytes(data))
    with pytest.raises(WireError, match=r"record 1 .* another record starts inside"):
        read_latents(old)


def test_a_torn_end_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "a.latents"
    offsets = _four_records(path)
    path.write_bytes(path.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="streamvae.io.filesink"):
        assert [x.index for x in read_latents(path)] == [0, 1, 2]
    (record,) = caplog.records
    torn = path.stat().st_size - offsets[3]
    assert f"incomplete record 3 at the end ({torn} bytes at byte {offsets[3]}" in record.message


def test_corruption_inside_the_file_is_an_error(tmp_path: Path):
    path = tmp_path / "a.latents"
    with FileSink(path) as sink:
        for i in range(3):
            sink.write(make_latent(i))
    data = bytearray(path.read_bytes())
    data[len(FILE_MAGIC) + 200] ^= 0xFF  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(WireError, match="checksum"):
        read_latents(path)
    other = tmp_path / "other.bin"
    other.write_bytes(b"PK\x03\x04 not latents at all")
    with pytest.raises(WireError, match="not a streamvae"):
        read_latents(other)


def test_a_killed_writer_leaves_every_latent_it_wrote(tmp_path: Path):
    """Issue 7 §2: the file sink keeps every latent written before a fault readable."""
    path = tmp_path / "crash.latents"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from streamvae import Latent
        from streamvae.io import FileSink
        sink = FileSink({str(path)!r})
        for i in range(10_000):
            sink.write(Latent(torch.full((16, 8, 8), float(i)), i, range(i, i + 1)))
            print(i, flush=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        written = -1
        deadline = time.monotonic() + 60
        while written < 20 and time.monotonic() < deadline:
            written = int(process.stdout.readline())
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
    latents = list(iter_latents(path))
    assert len(latents) >= written + 1  # every latent reported written is there
    assert [x.index for x in latents] == list(range(len(latents)))
    assert all(float(x.data[0, 0, 0]) == x.index for x in latents)


async def test_fsync_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 17 (lesser): FileSink.send ran fsync (a disk flush) on the event loop."""
    import os
    import threading

    from streamvae.io import filesink

    loop_thread = threading.get_ident()
    synced_in: list[int] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced_in.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(filesink.os, "fsync", recording)
    path = tmp_path / "synced.latents"
    sink = FileSink(path, fsync=True)
    synced_in.clear()  # the file's first line was synced where the sink was made
    async with sink:
        for i in range(3):
            await sink.send(make_latent(i))
    assert len(synced_in) >= 3 and loop_thread not in synced_in
    assert [x.index for x in read_latents(path)] == [0, 1, 2]


@pytest.fixture
def file_size_limit():
    """``limit(n)``: writes past byte ``n`` of any file fail (``EFBIG``, as a full disk fails
    with ``ENOSPC``) until ``limit(None)``; the limit is lifted after the test."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if size is None else size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_is_not_written_again_by_the_next(tmp_path: Path, file_size_limit):
    """Issue 21 item 15: after a write failed on a full disk, the record stayed in Python's
    write buffer, so the retry once space was freed wrote it twice (11, 12, 12, 13); and
    ``close()`` raised before closing. Now a failed record is cut off, the error names the
    file, a retry writes it once, and close() closes."""
    path = tmp_path / "a.latents"
    with FileSink(path) as sink:
        sink.write(make_latent(11))
        size = path.stat().st_size
        file_size_limit(size + 100)  # part of the next record fits
        with pytest.raises(OSError, match=str(path)) as info:
            sink.write(make_latent(12))
        assert info.value.filename == str(path)
        assert path.stat().st_size == size  # no torn record left behind
        assert [x.index for x in read_latents(path)] == [11]
        file_size_limit(None)  # space again: the caller retries
        sink.write(make_latent(12))
        sink.write(make_latent(13))
    assert [x.index for x in read_latents(path)] == [11, 12, 13]
    assert sink.latents_written == 3

    other = FileSink(tmp_path / "b.latents")
    other.write(make_latent(0))
    file_size_limit(other.bytes_written + 50)
    with pytest.raises(OSError):
        other.write(make_latent(1))
    other.close()  # never raises for what a failed write left: nothing is buffered
    with pytest.raises(ValueError, match="is closed"):
        other.write(make_latent(2))


def test_a_file_that_cannot_take_even_its_header_is_named(tmp_path: Path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError, match="/dev/full") as info:
        FileSink("/dev/full")
    assert info.value.strerror and "No space left" in info.value.strerror
