"""Lossless records of the frames a stream received: PNGs and an index, to check the latents.

>>> from streamvae.web.record import FrameRecorder, read_recording
>>> async def main(source):                                                # doctest: +SKIP
...     with FrameRecorder("rec/web-1") as recorder:
...         async for frame in source:
...             recorder.add(frame)            # written by a worker thread, in order
...     frames = read_recording("rec/web-1")   # SourceFrames: the same pixels, numbers, gaps

``DIR/000000.png, 000001.png, ...`` hold the RGB pixels exactly as the encoder got them (after
resizing); ``DIR/frames.jsonl`` has one line per frame: ``file``, ``number``, ``run``, ``gap``,
``timestamp``, ``stream_time``. Encoding :func:`read_recording`'s frames with a fresh
:class:`~streamvae.StreamEncoder` gives the latents the stream gave (drops included: the
numbers carry them).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from streamvae.io.sources import SourceFrame

__all__ = ["FrameRecorder", "read_recording"]

INDEX = "frames.jsonl"


class FrameRecorder:
    """Writes each frame :meth:`add` is given to ``directory`` (see the module docstring).

    A context manager: leaving it waits for every write. The directory must be empty or new.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and any(self.directory.iterdir()):
            raise FileExistsError(
                f"record directory {str(self.directory)!r} is not empty; give a new one"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._index = (self.directory / INDEX).open("w")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamvae-record")
        self._error: BaseException | None = None  # the first write's error, kept

    def add(self, frame: SourceFrame) -> None:
        """Queue ``frame`` for writing (its pixels are copied now); raises the first earlier
        write's error (once one failed, nothing more is written)."""
        if self._error is not None:
            raise self._error
        name = f"{self.count:06d}.png"
        entry = {
            "file": name,
            "number": frame.number,
            "run": frame.run,
            "gap": frame.gap,
            "timestamp": frame.timestamp,
            "stream_time": frame.stream_time,
        }
        image = np.array(frame.image, copy=True)
        self.count += 1
        self._executor.submit(self._write, name, image, entry)

    def _write(self, name: str, image: np.ndarray, entry: dict[str, object]) -> None:
        if self._error is not None:
            return
        try:
            self._write_one(name, image, entry)
        except Exception as error:
            self._error = error

    def _write_one(self, name: str, image: np.ndarray, entry: dict[str, object]) -> None:
        if not cv2.imwrite(str(self.directory / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {self.directory / name}")
        self._index.write(json.dumps(entry) + "\n")
        self._index.flush()

    def close(self) -> None:
        """Wait for the writes and close the index (raises the first write's error)."""
        self._executor.shutdown(wait=True)
        self._index.close()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> FrameRecorder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def read_recording(directory: str | Path) -> list[SourceFrame]:
    """The frames :class:`FrameRecorder` wrote to ``directory``, in order."""
    directory = Path(directory)
    frames = []
    for line in (directory / INDEX).read_text().splitlines():
        entry = json.loads(line)
        bgr = cv2.imread(str(directory / entry["file"]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"could not read {directory / entry['file']}")
        frames.append(
            SourceFrame(
                cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                entry["timestamp"],
                gap=entry["gap"],
                number=entry["number"],
                run=entry["run"],
                stream_time=entry["stream_time"],
            )
        )
    return frames
