"""The file sink: appended as latents come, readable while growing and after a crash."""

from __future__ import annotations

import signal
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


def test_append_cuts_a_torn_record_then_continues(tmp_path: Path):
    path = tmp_path / "a.latents"
    with FileSink(path) as sink:
        sink.write(make_latent(0))
        sink.write(make_latent(1))
    path.write_bytes(path.read_bytes()[:-10])
    with FileSink(path, append=True) as sink:
        sink.write(make_latent(2))
    assert [x.index for x in read_latents(path)] == [0, 2]


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
