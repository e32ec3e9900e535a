"""``streamvae decode IN.latents -o OUT.mp4``: a ``.latents`` file back to frames.

::

    streamvae decode clip.latents -o clip.mp4 --weights Wan2.1_VAE.pth
    streamvae decode clip.latents -o frames/ --random-weights --config narrow8

Reads the latents as :func:`streamvae.io.iter_latents` does (a file that ``streamvae encode``,
``live -o`` or ``serve`` wrote), decodes them one by one with :class:`streamvae.StreamDecoder`
and writes a video (any container ffmpeg writes: ``.mp4``, ``.mkv``, ``.avi``, ``.webm``;
needs PyAV, ``pip install 'streamvae[web]'``) or a folder of PNG frames (``-o`` ending in ``/``
or naming a folder: ``frame_000000.png``, ...). Latents stored without Wan's normalisation
(``encode --no-normalize``) are decoded as such. A progress line on stderr (``--quiet``: none)
and a summary at the end.

Exit status: 0 when every latent was decoded and written; 2 for a command line that cannot run
as given (bad options, weights whose latent space is not the file's); 1 when the file or the
writer failed. A failed run removes the video file it created.

:class:`DecodeSink` is the same decode as a :class:`~streamvae.io.LatentSink`: ``live --decode``
and ``serve --decode`` write the round trip (the decoded frames) beside the latents file with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamvae.decoding import DecodedFrame, LatentError, StreamDecoder
from streamvae.io.filesink import iter_latents
from streamvae.io.pipeline import SinkError
from streamvae.io.wire import WireError
from streamvae.model import WanDecoder
from streamvae.model_args import add_model_arguments, decoder_from_args
from streamvae.stream import Latent
from streamvae.usage import check_output_dir, check_output_file, positive_number, usage_error

__all__ = [
    "DECODE_FORMATS",
    "DecodeSink",
    "add_decode_command",
    "check_decode_output",
    "decoded_output_path",
    "run_decode",
]

VIDEO_SUFFIXES = {".mp4": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9"}

DECODE_FORMATS = ("png", *(suffix[1:] for suffix in VIDEO_SUFFIXES))
"""What ``--decode`` writes: ``png`` (a folder of frames) or a video container."""


def add_decode_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``streamvae decode IN.latents -o OUT``: a ``.latents`` file to a video or PNG frames."""
    parser = commands.add_parser(
        "decode",
        help="decode a .latents file into a video or a folder of PNG frames",
        description="Decode IN (a .latents file written by streamvae encode, live or serve) "
        "latent by latent into OUT: a video (.mp4, .mkv, .avi, .webm) or a folder of PNG "
        "frames (a name ending in / or an existing folder).",
    )
    parser.add_argument("input", metavar="IN", help="the .latents file to decode")
    parser.add_argument(
        "-o", "--output", required=True, help="OUT.mp4 (.mkv, .avi, .webm) or a folder for PNGs"
    )
    parser.add_argument(
        "--fps", type=positive_number, default=16.0, help="frame rate of the video (Wan: 16)"
    )
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(run=run_decode)
    return parser


def _is_folder(output: str) -> bool:
    path = Path(output)
    return output.endswith(("/", "\\")) or path.is_dir() or not path.suffix


def run_decode(args: argparse.Namespace) -> int:
    """The ``decode`` command (see :func:`add_decode_command`)."""
    source = Path(args.input)
    if not source.is_file():
        raise SystemExit(f"streamvae: {args.input}: no such file")
    folder = check_decode_output(args.output, "--output")
    decoder, label, random = decoder_from_args(args)
    if random:
        print(
            "streamvae: RANDOM WEIGHTS: the decoded frames are meaningless (for trying the "
            "pipeline)",
            file=sys.stderr,
        )
    writer = open_frame_writer(Path(args.output), args.fps, folder=folder)
    created = not folder and not Path(args.output).exists()
    started = time.monotonic()
    sink: DecodeSink | None = None
    try:
        for latent in iter_latents(source):
            if sink is None:
                sink = DecodeSink(
                    writer, _checked_decoder(decoder, latent, args), normalized=_normalized(latent)
                )
            try:
                sink.write(latent)
            except SinkError as exc:
                raise SystemExit(
                    f"streamvae: {args.input}: latent {latent.index}: {exc.__cause__}"
                ) from None
            if not args.quiet:
                elapsed = max(time.monotonic() - started, 1e-9)
                print(
                    f"\rdecode: {sink.latents_decoded} latents, {sink.frames_written} frames, "
                    f"{sink.frames_written / elapsed:.1f} frames/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        writer.close()
    except (WireError, OSError) as exc:
        _discard(writer, created, args.output)
        raise SystemExit(f"streamvae: {args.input}: {exc}") from None
    except BaseException:
        _discard(writer, created, args.output)
        raise
    if not args.quiet:
        print(file=sys.stderr)
    if sink is None:
        _discard(writer, created, args.output)
        raise SystemExit(f"streamvae: {args.input}: no complete latent in the file")
    elapsed = time.monotonic() - started
    size = sink.size or (0, 0)
    print(
        f"decoded {sink.latents_decoded} latents -> {sink.frames_written} frames "
        f"({size[0]}x{size[1]}) into {args.output} in {elapsed:.1f} s "
        f"({sink.frames_written / max(elapsed, 1e-9):.1f} frames/s; model: {label})"
    )
    return 0


def _checked_decoder(decoder: WanDecoder, latent: Latent, args: argparse.Namespace) -> WanDecoder:
    """``decoder``; a usage error if it cannot decode this file's latents."""
    config = decoder.config
    z = latent.data.shape[0]
    labelled = latent.meta.get("config", "?")
    if z != config.z_dim:
        usage_error(
            f"{args.input} holds {z}-channel latents (config {labelled}); the decoder "
            f"({config.name}) decodes {config.z_dim}: give the weights (or --config) they were "
            "encoded with"
        )
    return decoder


def _normalized(latent: Latent) -> bool:
    """Whether a stored latent carries Wan's normalisation (``encode --no-normalize``: not)."""
    return latent.meta.get("normalization", "wan") != "none"


def check_decode_output(output: str | Path, option: str, *, folder: bool | None = None) -> bool:
    """A usage error (status 2) unless ``output`` can take decoded frames: a video file
    (:data:`VIDEO_SUFFIXES`) or a folder for PNGs (``folder``: which, else told by the name).
    ``True`` for a folder."""
    text = str(output)
    if folder or (folder is None and _is_folder(text)):
        check_output_dir(text, option)
        return True
    if Path(text).suffix.lower() not in VIDEO_SUFFIXES:
        usage_error(
            f"{option} {text}: expected a video ({', '.join(VIDEO_SUFFIXES)}) or a "
            "folder for PNG frames"
        )
    check_output_file(text, option)
    return False


def decoded_output_path(latents_path: str | Path, fmt: str) -> Path:
    """Where ``--decode FMT`` writes beside a latents file: ``clip.latents`` ->
    ``clip.decoded.mp4`` (a video), or the folder ``clip.decoded/`` for ``png``."""
    if fmt not in DECODE_FORMATS:
        raise ValueError(f"--decode takes one of {', '.join(DECODE_FORMATS)}, got {fmt!r}")
    path = Path(latents_path)
    stem = path.with_suffix("").name + ".decoded"
    return path.with_name(stem if fmt == "png" else f"{stem}.{fmt}")


def open_frame_writer(path: Path, fps: float, *, folder: bool | None = None) -> _Writer:
    """The writer of decoded frames into ``path``: a video at ``fps`` where its suffix names
    one (:data:`VIDEO_SUFFIXES`), else a folder of PNGs (``folder`` says which outright)."""
    if folder is None:
        folder = path.suffix.lower() not in VIDEO_SUFFIXES
    return _PngWriter(path) if folder else _VideoWriter(path, fps)


class DecodeSink:
    """A latent sink that decodes every latent it is sent and writes the frames: the round trip.

    One :class:`StreamDecoder` over ``decoder`` (weights shared with any other sink), its frames
    written into ``path`` (a video, or a folder of PNGs: see :func:`check_decode_output`) as each
    latent arrives; the decode runs in a worker thread, so the event loop stays free. A latent
    with ``gap`` (the source restarted) starts a new run of the decoder, as it does the
    encoder's. ``normalized``: the latents carry Wan's normalisation (the encoder's default).
    A latent the decoder or the writer cannot take raises :class:`streamvae.io.SinkError`.
    """

    def __init__(
        self,
        output: str | Path | _Writer,
        decoder: WanDecoder,
        *,
        normalized: bool = True,
        fps: float = 16.0,
    ) -> None:
        if isinstance(output, _Writer):
            self._writer: _Writer | None = output
            self.path = output.path
        else:
            self.path = Path(output)
            self._writer = open_frame_writer(self.path, fps)
        self.stream = StreamDecoder(decoder, normalized=normalized)
        self.latents_decoded = 0
        self.frames_written = 0
        self.size: tuple[int, int] | None = None

    async def send(self, latent: Latent) -> None:
        """Decode ``latent`` and write its frames (1 for a stream's first latent, else 4)."""
        await asyncio.to_thread(self.write, latent)

    def write(self, latent: Latent) -> list[DecodedFrame]:
        """:meth:`send`, in the calling thread; the frames written."""
        try:
            frames = self.stream.push(latent)
            if self._writer is None:
                raise ValueError("the sink is closed")
            for frame in frames:
                rgb = frame.to_rgb()
                self.size = (rgb.shape[0], rgb.shape[1])
                self._writer.write(rgb)
                self.frames_written += 1
        except (LatentError, OSError, ValueError) as exc:
            raise SinkError(f"decoding into {self.path}: {exc}") from exc
        self.latents_decoded += 1
        return frames

    def close(self) -> None:
        """Finish the output (a video's trailer); nothing was created if no frame came."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> DecodeSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Writer:
    path: Path

    def write(self, rgb: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the output."""

    def discard(self) -> None:
        """Stop without finishing (the caller removes what was created)."""


class _PngWriter(_Writer):
    def __init__(self, folder: Path) -> None:
        self.path = self.folder = folder
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        from PIL import Image

        if self.count == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(self.folder / f"frame_{self.count:06d}.png")
        self.count += 1


class _VideoWriter(_Writer):
    def __init__(self, path: Path, fps: float) -> None:
        try:
            import av
        except ImportError:
            usage_error(
                "writing a video needs PyAV (pip install 'streamvae[web]'); or give a folder "
                "for PNG frames"
            )
        self.av = av
        self.path = path
        self.codec = VIDEO_SUFFIXES[self.path.suffix.lower()]
        self.fps = fps
        self.container: Any = None
        self.stream: Any = None

    def write(self, rgb: np.ndarray) -> None:
        if self.container is None:
            from fractions import Fraction

            self.container = self.av.open(str(self.path), "w")
            rate = Fraction(self.fps).limit_denominator(1000)
            self.stream = self.container.add_stream(self.codec, rate=rate)
            self.stream.width, self.stream.height = rgb.shape[1], rgb.shape[0]
            self.stream.pix_fmt = "yuv420p"
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None

    def discard(self) -> None:
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
            self.container = None


def _discard(writer: _Writer, created: bool, output: str) -> None:
    writer.discard()
    if created:
        with contextlib.suppress(FileNotFoundError):
            Path(output).unlink()
