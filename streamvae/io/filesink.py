"""Latents appended to a file as they come; readable while it grows and after a crash.

>>> from streamvae.io import FileSink, read_latents
>>> with FileSink("out/cam1.latents", labels={"stream": "cam1"}) as sink:   # doctest: +SKIP
...     for latent in stream.push(frame):
...         sink.write(latent)
>>> latents = read_latents("out/cam1.latents")                              # doctest: +SKIP

Format (``.latents``): the line ``STREAMVAE-LATENTS/1\\n``, then one record per latent::

    b"SVL1" | payload length (uint64, little-endian) | payload | CRC-32 of payload (uint32, LE)

where the payload is the latent's wire encoding (:mod:`streamvae.io.wire`, a safetensors file).
Each record is written and flushed to the OS in one piece as its latent arrives, so nothing is
buffered beyond one latent, other processes can read the file while it grows, and a process that
dies mid-write leaves at most one incomplete record at the end, which readers skip.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from streamvae.io.wire import DEFAULT_MAX_PAYLOAD_BYTES, WireError, decode_latent, encode_latent
from streamvae.stream import Latent

__all__ = ["FILE_MAGIC", "FileSink", "iter_latents", "read_latents"]

log = logging.getLogger("streamvae.io.filesink")

FILE_MAGIC = b"STREAMVAE-LATENTS/1\n"
_RECORD_MAGIC = b"SVL1"
_RECORD_HEAD = struct.Struct("<4sQ")
_RECORD_TAIL = struct.Struct("<I")


class FileSink:
    """Appends latents to a ``.latents`` file (see the module docstring); sync or async.

    - ``labels``: string metadata stored with every latent (stream id, model, ...).
    - ``dtype``: storage dtype, ``float32`` (default, exact), ``float16`` or ``bfloat16``.
    - ``fsync``: also force every record to disk (survives power loss, costs a disk flush each).
    - ``append``: continue an existing file (an incomplete last record is cut off first)
      instead of starting a new one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        labels: Mapping[str, str] | None = None,
        dtype: str = "float32",
        fsync: bool = False,
        append: bool = False,
    ) -> None:
        self.path = Path(path)
        self.labels = dict(labels or {})
        self.dtype = dtype
        self.fsync = fsync
        self.latents_written = 0
        self.bytes_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists() and self.path.stat().st_size >= len(FILE_MAGIC):
            valid = _valid_length(self.path)
            self._file: BinaryIO = open(self.path, "r+b")  # noqa: SIM115 (closed by close())
            self._file.truncate(valid)
            self._file.seek(valid)
        else:
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
            self._file.write(FILE_MAGIC)
            self._flush()

    def write(self, latent: Latent) -> None:
        """Append one latent and hand it to the OS (and the disk, with ``fsync``)."""
        if self._file.closed:
            raise ValueError(f"{self.path} is closed")
        payload = encode_latent(latent, self.labels, dtype=self.dtype)
        record = (
            _RECORD_HEAD.pack(_RECORD_MAGIC, len(payload))
            + payload
            + _RECORD_TAIL.pack(zlib.crc32(payload))
        )
        self._file.write(record)
        self._flush()
        self.latents_written += 1
        self.bytes_written += len(record)

    async def send(self, latent: Latent) -> None:
        """:meth:`write`, for pipelines of async sinks (a record is small: it does not block)."""
        self.write(latent)

    def _flush(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._flush()
            self._file.close()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> FileSink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> FileSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _records(
    path: Path, max_bytes: int
) -> Iterator[tuple[int, bytes]]:  # (offset after the record, payload)
    with open(path, "rb") as file:
        magic = file.read(len(FILE_MAGIC))
        if magic != FILE_MAGIC:
            if FILE_MAGIC.startswith(magic):  # a file whose writer has only just started
                return
            raise WireError(
                f"{path} is not a streamvae .latents file (it starts with {magic[:20]!r})"
            )
        offset = len(FILE_MAGIC)
        number = 0
        while True:
            head = file.read(_RECORD_HEAD.size)
            if len(head) < _RECORD_HEAD.size:
                _note_tail(path, number, len(head))
                return
            magic, length = _RECORD_HEAD.unpack(head)
            if magic != _RECORD_MAGIC:
                raise WireError(f"{path}: record {number} at byte {offset} has no record marker")
            if length > max_bytes:
                raise WireError(
                    f"{path}: record {number} at byte {offset} claims {length} bytes, over the "
                    f"limit of {max_bytes}"
                )
            body = file.read(length + _RECORD_TAIL.size)
            if len(body) < length + _RECORD_TAIL.size:
                _note_tail(path, number, _RECORD_HEAD.size + len(body))
                return
            payload = body[:length]
            (crc,) = _RECORD_TAIL.unpack(body[length:])
            if crc != zlib.crc32(payload):
                if not file.read(1):  # a torn last write: the end of what is readable
                    _note_tail(path, number, _RECORD_HEAD.size + len(body))
                    return
                raise WireError(f"{path}: record {number} at byte {offset} fails its checksum")
            offset += _RECORD_HEAD.size + len(body)
            number += 1
            yield offset, payload


def _note_tail(path: Path, number: int, size: int) -> None:
    if size:
        log.info("%s: ignoring an incomplete record %d (%d bytes) at the end", path, number, size)


def _valid_length(path: Path) -> int:
    valid = len(FILE_MAGIC)
    for record_end, _ in _records(path, DEFAULT_MAX_PAYLOAD_BYTES):
        valid = record_end
    return valid


def iter_latents(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Iterator[Latent]:
    """The latents of a ``.latents`` file in order, reading as it goes.

    Stops quietly at an incomplete last record (a writer still running, or one that crashed);
    raises :class:`streamvae.io.WireError` for a file that is not one or is corrupt mid-way.
    """
    for _, payload in _records(Path(path), max_bytes):
        yield decode_latent(payload, max_bytes=max_bytes)


def read_latents(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> list[Latent]:
    """All complete latents of a ``.latents`` file (see :func:`iter_latents`)."""
    return list(iter_latents(path, max_bytes=max_bytes))
