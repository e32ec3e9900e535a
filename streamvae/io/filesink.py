"""Latents appended to a file as they come; readable while it grows and after a crash.

>>> from streamvae.io import FileSink, read_latents
>>> with FileSink("out/cam1.latents", labels={"stream": "cam1"}) as sink:   # doctest: +SKIP
...     for latent in stream.push(frame):
...         sink.write(latent)
>>> latents = read_latents("out/cam1.latents")                              # doctest: +SKIP

Format (``.latents``, version 2): the line ``STREAMVAE-LATENTS/2\\n``, then one record per latent::

    b"SVL2" | payload length (uint64 LE) | CRC-32 of the 12 bytes before (uint32 LE)
            | payload | CRC-32 of payload (uint32 LE)

where the payload is the latent's wire encoding (:mod:`streamvae.io.wire`, a safetensors file).
Each record is written and flushed to the OS in one piece as its latent arrives, so nothing is
buffered beyond one latent, other processes can read the file while it grows, and a process that
dies mid-write leaves at most one incomplete record at the end.

**Damage.** The record header has its own checksum, so a corrupted length is found as such
and never taken for the end of the file. A record counts as *torn* (a writer still running, or
one that died mid-write) only when the file truly ends inside it: readers stop before it and
log a warning saying how many bytes were skipped. Anything else (a bad marker, a header or
payload that fails its checksum with more of the file after it) raises
:class:`streamvae.io.WireError` naming the record and its byte offset: nothing after damage is
ever skipped without a word. ``FileSink(append=True)`` refuses a file that ends in a torn record
unless asked to ``repair`` it (the torn bytes are then cut off and logged), and always refuses a
file damaged before its end. Version 1 files (``STREAMVAE-LATENTS/1``, records ``b"SVL1" |
length | payload | CRC-32``, no header checksum) are still read and appended to; there a short
last record counts as torn only if no record marker follows its header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from streamvae.io.wire import DEFAULT_MAX_PAYLOAD_BYTES, WireError, decode_latent, encode_latent
from streamvae.stream import Latent

__all__ = ["FILE_MAGIC", "FileSink", "iter_latents", "read_latents"]

log = logging.getLogger(__name__)

FILE_MAGIC = b"STREAMVAE-LATENTS/2\n"
"""The first line of a ``.latents`` file this version writes."""


@dataclass(frozen=True)
class _Format:
    """The record layout of one file version."""

    file_magic: bytes
    record_magic: bytes
    head: struct.Struct  # marker, length (and, from version 2, the header's CRC-32)

    @property
    def head_checked(self) -> bool:
        return self.head.size > 12

    def pack_head(self, length: int) -> bytes:
        if not self.head_checked:
            return self.head.pack(self.record_magic, length)
        first = struct.pack("<4sQ", self.record_magic, length)
        return first + struct.pack("<I", zlib.crc32(first))


_FORMATS = (
    _Format(FILE_MAGIC, b"SVL2", struct.Struct("<4sQI")),
    _Format(b"STREAMVAE-LATENTS/1\n", b"SVL1", struct.Struct("<4sQ")),
)
_MAGIC_SIZE = len(FILE_MAGIC)
assert all(len(f.file_magic) == _MAGIC_SIZE for f in _FORMATS)
_RECORD_TAIL = struct.Struct("<I")


@dataclass(frozen=True)
class _Tail:
    """How a ``.latents`` file ends: its complete records and what follows them."""

    format: _Format
    records: int
    valid_bytes: int  # the file up to the end of its last complete record
    torn_bytes: int  # an incomplete last record after that (0: none)


class FileSink:
    """Appends latents to a ``.latents`` file (see the module docstring); sync or async.

    - ``labels``: string metadata stored with every latent (stream id, model, ...).
    - ``dtype``: storage dtype, ``float32`` (default, exact), ``float16`` or ``bfloat16``.
    - ``fsync``: also force every record to disk (survives power loss, costs a disk flush each).
    - ``append``: continue an existing file instead of starting a new one. A file that ends
      in a torn record is refused (:class:`WireError`) unless ``repair=True``, which cuts that
      record off (and logs how many bytes went); a file damaged before its end is always
      refused. The records are written in the existing file's version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        labels: Mapping[str, str] | None = None,
        dtype: str = "float32",
        fsync: bool = False,
        append: bool = False,
        repair: bool = False,
    ) -> None:
        self.path = Path(path)
        self.labels = dict(labels or {})
        self.dtype = dtype
        self.fsync = fsync
        self.latents_written = 0
        self.bytes_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tail = _scan(self.path) if append and self.path.exists() else None
        if tail is not None and tail.valid_bytes:  # else: empty, or only part of the first line
            if tail.torn_bytes and not repair:
                raise WireError(
                    f"{self.path} ends in an incomplete record {tail.records} ({tail.torn_bytes} "
                    f"bytes at byte {tail.valid_bytes}: a writer that died mid-write, or one still "
                    "writing); pass repair=True to cut it off, or write to a new file"
                )
            self._format = tail.format
            # Unbuffered: a record is handed to the OS whole or not at all (a failed write is
            # cut off again), never left in a buffer to be written twice by a later flush.
            self._file: BinaryIO = open(self.path, "r+b", buffering=0)  # noqa: SIM115
            if tail.torn_bytes:
                log.warning(
                    "%s: repair: cutting off the incomplete record %d (%d bytes at byte %d)",
                    self.path,
                    tail.records,
                    tail.torn_bytes,
                    tail.valid_bytes,
                )
                self._file.truncate(tail.valid_bytes)
            self._file.seek(tail.valid_bytes)
            self._end = tail.valid_bytes
        else:
            self._format = _FORMATS[0]
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 (closed by close())
            self._end = 0
            try:
                self._append(FILE_MAGIC)
            except BaseException:
                self._file.close()
                raise

    def write(self, latent: Latent) -> None:
        """Append one latent and hand it to the OS (and the disk, with ``fsync``).

        If the OS refuses it (a full disk: ``OSError`` naming this file), nothing of the record
        stays in the file or in any buffer: a retry once there is space writes it once.
        """
        if self._file.closed:
            raise ValueError(f"{self.path} is closed")
        payload = encode_latent(latent, self.labels, dtype=self.dtype)
        record = (
            self._format.pack_head(len(payload)) + payload + _RECORD_TAIL.pack(zlib.crc32(payload))
        )
        self._append(record)
        self.latents_written += 1
        self.bytes_written += len(record)

    def _append(self, data: bytes) -> None:
        """Write ``data`` at the end, whole (and fsync it) or not at all."""
        start = self._end
        try:
            view = memoryview(data)
            while view:
                written = self._file.write(view)
                view = view[written or 0 :]
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            try:  # take back what part of it reached the file: no torn record is left
                self._file.truncate(start)
                self._file.seek(start)
            except OSError as undo:
                log.warning(
                    "%s: could not cut off a failed write at byte %d: %s", self.path, start, undo
                )
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._end = start + len(data)

    async def send(self, latent: Latent) -> None:
        """:meth:`write`, for pipelines of async sinks. A record is small and handed to the OS at
        once; with ``fsync`` the disk flush runs in a thread, off the event loop."""
        if self.fsync:
            await asyncio.to_thread(self.write, latent)
        else:
            self.write(latent)

    def close(self) -> None:
        """Close the file (always; with ``fsync``, a failing disk flush is raised after)."""
        if self._file.closed:
            return
        try:
            if self.fsync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    async def aclose(self) -> None:
        if self.fsync:
            await asyncio.to_thread(self.close)
        else:
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
        await self.aclose()


def _records(path: Path, max_bytes: int, tail: list[_Tail] | None = None) -> Iterator[bytes]:
    """The payloads of the complete records; how the file ends is appended to ``tail``."""
    with open(path, "rb") as file:
        magic = file.read(_MAGIC_SIZE)
        form = next((f for f in _FORMATS if f.file_magic == magic), None)
        if form is None:
            if any(f.file_magic.startswith(magic) for f in _FORMATS):
                if tail is not None:  # a file whose writer has only just started
                    tail.append(_Tail(_FORMATS[0], 0, 0, len(magic)))
                return
            raise WireError(
                f"{path} is not a streamvae .latents file (it starts with {magic[:20]!r})"
            )
        offset, number = _MAGIC_SIZE, 0
        while True:
            torn = _read_record(file, form, path, number, offset, max_bytes)
            if isinstance(torn, int):
                if torn:
                    log.warning(
                        "%s: skipping an incomplete record %d at the end (%d bytes at byte %d: "
                        "a writer still running, or one that died mid-write)",
                        path,
                        number,
                        torn,
                        offset,
                    )
                if tail is not None:
                    tail.append(_Tail(form, number, offset, torn))
                return
            offset += form.head.size + len(torn) + _RECORD_TAIL.size
            number += 1
            yield torn


def _read_record(
    file: BinaryIO, form: _Format, path: Path, number: int, offset: int, max_bytes: int
) -> bytes | int:
    """The next record's payload, or the size of a torn record that ends the file (0: none)."""
    where = f"{path}: record {number} at byte {offset}"
    head = file.read(form.head.size)
    if len(head) < form.head.size:
        return len(head)
    magic, length, *check = form.head.unpack(head)
    if magic != form.record_magic:
        raise WireError(f"{where} has no record marker ({magic!r}, expected {form.record_magic!r})")
    if check and check[0] != zlib.crc32(head[:12]):
        raise WireError(f"{where} fails its header checksum (a corrupted length field)")
    if length > max_bytes:
        raise WireError(f"{where} claims {length} bytes, over the limit of {max_bytes}")
    body = file.read(length + _RECORD_TAIL.size)
    if len(body) < length + _RECORD_TAIL.size:
        if not form.head_checked and form.record_magic in body:
            # Version 1 has no header checksum: records after this one mean a bad length.
            raise WireError(f"{where} claims {length} bytes but another record starts inside")
        return form.head.size + len(body)
    payload = body[:length]
    (crc,) = _RECORD_TAIL.unpack(body[length:])
    if crc != zlib.crc32(payload):
        if not file.read(1):  # a last write that did not reach the disk whole
            return form.head.size + len(body)
        raise WireError(f"{where} fails its checksum")
    return payload


def _scan(path: Path) -> _Tail:
    tail: list[_Tail] = []
    for _ in _records(path, DEFAULT_MAX_PAYLOAD_BYTES, tail):
        pass
    return tail[0]


def iter_latents(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Iterator[Latent]:
    """The latents of a ``.latents`` file in order, reading as it goes.

    Stops at an incomplete last record (a writer still running, or one that crashed), with a
    warning on the ``streamvae.io.filesink`` logger that says how many bytes it skipped;
    raises :class:`streamvae.io.WireError` for a file that is not one or is damaged before its
    end (see the module docstring).
    """
    for payload in _records(Path(path), max_bytes):
        yield decode_latent(payload, max_bytes=max_bytes)


def read_latents(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> list[Latent]:
    """All complete latents of a ``.latents`` file (see :func:`iter_latents`)."""
    return list(iter_latents(path, max_bytes=max_bytes))
