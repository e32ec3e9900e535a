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
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamvae.decoding import LatentError, StreamDecoder
from streamvae.io.filesink import iter_latents
from streamvae.io.wire import WireError
from streamvae.model_args import add_model_arguments, decoder_from_args
from streamvae.usage import check_output_dir, check_output_file, usage_error

__all__ = ["add_decode_command", "run_decode"]

VIDEO_SUFFIXES = {".mp4": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9"}


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
        "--fps", type=_positive_float, default=16.0, help="frame rate of the video (Wan: 16)"
    )
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(run=run_decode)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _is_folder(output: str) -> bool:
    path = Path(output)
    return output.endswith(("/", "\\")) or path.is_dir() or not path.suffix


def run_decode(args: argparse.Namespace) -> int:
    """The ``decode`` command (see :func:`add_decode_command`)."""
    source = Path(args.input)
    if not source.is_file():
        raise SystemExit(f"streamvae: {args.input}: no such file")
    folder = _is_folder(args.output)
    if folder:
        check_output_dir(args.output, "--output")
    else:
        suffix = Path(args.output).suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            usage_error(
                f"--output {args.output}: expected a video ({', '.join(VIDEO_SUFFIXES)}) or a "
                "folder for PNG frames"
            )
        check_output_file(args.output, "--output")
    decoder, label, random = decoder_from_args(args)
    if random:
        print(
            "streamvae: RANDOM WEIGHTS: the decoded frames are meaningless (for trying the "
            "pipeline)",
            file=sys.stderr,
        )
    writer: _Writer = _PngWriter(Path(args.output)) if folder else _VideoWriter(args)
    created = not folder and not Path(args.output).exists()
    started = time.monotonic()
    latents = frames = 0
    size = (0, 0)
    try:
        latent_iter = iter_latents(source)
        stream: StreamDecoder | None = None
        for latent in latent_iter:
            if stream is None:
                stream = _stream_for(decoder, latent, args)
            try:
                decoded = stream.push(latent)
            except LatentError as exc:
                raise SystemExit(f"streamvae: {args.input}: latent {latent.index}: {exc}") from None
            for frame in decoded:
                rgb = frame.to_rgb()
                size = rgb.shape[:2]
                writer.write(rgb)
                frames += 1
            latents += 1
            if not args.quiet:
                elapsed = max(time.monotonic() - started, 1e-9)
                print(
                    f"\rdecode: {latents} latents, {frames} frames, {frames / elapsed:.1f} frames/s",
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
    if latents == 0:
        _discard(writer, created, args.output)
        raise SystemExit(f"streamvae: {args.input}: no complete latent in the file")
    elapsed = time.monotonic() - started
    print(
        f"decoded {latents} latents -> {frames} frames ({size[0]}x{size[1]}) into {args.output} "
        f"in {elapsed:.1f} s ({frames / max(elapsed, 1e-9):.1f} frames/s; model: {label})"
    )
    return 0


def _stream_for(decoder: Any, latent: Any, args: argparse.Namespace) -> StreamDecoder:
    """The stream for this file's latents; a usage error if the weights cannot decode them."""
    config = decoder.config
    z = latent.data.shape[0]
    labelled = latent.meta.get("config", "?")
    if z != config.z_dim:
        usage_error(
            f"{args.input} holds {z}-channel latents (config {labelled}); the decoder "
            f"({config.name}) decodes {config.z_dim}: give the weights (or --config) they were "
            "encoded with"
        )
    normalized = latent.meta.get("normalization", "wan") != "none"
    return StreamDecoder(decoder, normalized=normalized)


class _Writer:
    def write(self, rgb: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the output."""

    def discard(self) -> None:
        """Stop without finishing (the caller removes what was created)."""


class _PngWriter(_Writer):
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(rgb).save(self.folder / f"frame_{self.count:06d}.png")
        self.count += 1


class _VideoWriter(_Writer):
    def __init__(self, args: argparse.Namespace) -> None:
        try:
            import av
        except ImportError:
            usage_error(
                "writing a video needs PyAV (pip install 'streamvae[web]'); or give a folder "
                "for PNG frames"
            )
        self.av = av
        self.path = Path(args.output)
        self.codec = VIDEO_SUFFIXES[self.path.suffix.lower()]
        self.fps = args.fps
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
