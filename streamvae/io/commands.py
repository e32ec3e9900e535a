"""``streamvae encode`` and ``streamvae live``: the CLI over sources, the encoder and sinks.

::

    streamvae encode clip.mp4 -o clip.latents --size 480x832 --weights Wan2.1_VAE.pth
    streamvae live rtsp://camera.local/stream --mqtt mqtt://broker:1883/lab --stream-id cam1 \\
        --size 480x832 --weights Wan2.1_VAE.pth

``encode`` shows a progress bar on stderr and prints a summary (frames, latents, frames/s,
latency percentiles); ``live`` prints live stats (fps in and out, latency, drops, MQTT state)
every ``--stats-interval`` seconds. Both stop cleanly on Ctrl-C or SIGTERM: the source stops,
the encoder is flushed, the file is closed, buffered MQTT messages are published and the
stream's status becomes ``offline``. A second Ctrl-C aborts at once. ``--json`` prints the
summary as one JSON line on stdout instead of text.

Exit status: 0 when every latent was delivered; 2 for a command line that cannot run as given
(see :mod:`streamvae.usage`); 1 when the source or a sink failed, or when ``live`` could not
deliver every latent to MQTT (discarded by a full buffer, or unsent at exit: the summary's
``error`` says how many); 130 after an abort. A job a signal stopped before it was done exits
with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM) and says so: an ``encode``
stopped before the end of its input (its file keeps the latents so far), a ``live`` stopped
before its source ever opened (it leaves no file). A bad input is refused before any output
file exists; a failed ``encode`` removes the file it created.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import torch

from streamvae.config import PRESETS, WanConfig
from streamvae.frames import FrameError
from streamvae.io.backoff import Backoff
from streamvae.io.decode import (
    DECODE_FORMATS,
    DecodeSink,
    check_decode_output,
    decoded_output_path,
)
from streamvae.io.filesink import FileSink
from streamvae.io.pipeline import (
    LatentSink,
    PipelineStats,
    SinkError,
    encode_to_sinks,
    percentiles,
)
from streamvae.io.redact import redact_url
from streamvae.io.sources import (
    SOURCE_PASSWORD_ENV,
    FrameSource,
    SourceError,
    open_source,
    parse_size,
    source_kind,
)
from streamvae.io.topics import PASSWORD_ENV, validate_stream_id
from streamvae.io.wire import STORAGE_DTYPES
from streamvae.model import WanDecoder
from streamvae.model_args import (
    ModelChoice,
    add_model_arguments,
    decoder_from_args,
    model_from_args,
)
from streamvae.stream import StreamEncoder
from streamvae.usage import (
    check_output_file,
    non_negative_seconds,
    positive_int,
    positive_seconds,
    usage_error,
    user_errors,
)

if TYPE_CHECKING:
    from streamvae.io.mqtt import MqttSettings, MqttSink

__all__ = [
    "RESIZE_HELP",
    "add_decode_argument",
    "add_encode_command",
    "add_live_command",
    "add_resize_argument",
    "decoder_for_round_trip",
    "default_stream_id",
    "model_labels",
    "mqtt_settings",
    "mqtt_sink",
    "round_trip_line",
    "round_trip_summary",
]


def add_encode_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``streamvae encode INPUT -o OUTPUT``: a video (or any source) to a ``.latents`` file."""
    parser = commands.add_parser(
        "encode",
        help="encode a video file (or any source) into a .latents file",
        description="Encode INPUT frame by frame into a .latents file (read it back with "
        "streamvae.io.read_latents). INPUT: a video file, synthetic://moving?frames=N, a camera "
        "(0, /dev/video0) or a stream URL (rtsp://, http://).",
    )
    parser.add_argument(
        "input", metavar="INPUT", help="video file, synthetic://moving, camera or URL"
    )
    parser.add_argument("-o", "--output", required=True, help="the .latents file to write")
    _add_source_arguments(parser)
    _add_encoder_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_output_arguments(parser)
    parser.set_defaults(run=run_encode)
    return parser


def add_live_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``streamvae live SOURCE --mqtt URL``: a live source to MQTT (and/or a file)."""
    parser = commands.add_parser(
        "live",
        help="encode a live source and publish latents over MQTT",
        description="Encode SOURCE as it arrives and publish every latent to "
        "<prefix>/<stream-id>/latents (and/or append it to --output). SOURCE: a camera (0, "
        "/dev/video0), rtsp:// or http:// stream, synthetic://moving?fps=25 or a video file. "
        f"The MQTT password is read from ${PASSWORD_ENV} or --mqtt-password-file.",
    )
    parser.add_argument("source", metavar="SOURCE", help="camera, stream URL, synthetic:// or file")
    parser.add_argument(
        "--mqtt", metavar="URL", help="mqtt://[user@]host:port/prefix (mqtts:// for TLS)"
    )
    parser.add_argument(
        "-o", "--output", help="also write the latents to this .latents file (replacing it)"
    )
    parser.add_argument("--stream-id", help="topic level for this stream (default: from SOURCE)")
    _add_mqtt_arguments(parser)
    _add_source_arguments(parser)
    _add_encoder_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument(
        "--stats-interval",
        type=non_negative_seconds,
        default=2.0,
        help="seconds between stats lines (0: none)",
    )
    add_decode_argument(parser, "beside the -o file: clip.latents -> clip.decoded.mp4")
    _add_output_arguments(parser)
    parser.set_defaults(run=run_live)
    return parser


def _add_mqtt_arguments(parser: argparse.ArgumentParser) -> None:
    """The MQTT options of ``live`` and ``serve`` (the broker URL itself is ``--mqtt``)."""
    mqtt = parser.add_argument_group("MQTT")
    mqtt.add_argument(
        "--qos", type=int, choices=(0, 1, 2), default=1, help="MQTT QoS of the latent messages"
    )
    mqtt.add_argument(
        "--buffer-messages",
        type=positive_int,
        default=256,
        help="latents held while the broker is away; the oldest are discarded beyond",
    )
    mqtt.add_argument(
        "--mqtt-password-file", help=f"file whose first line is the password (else ${PASSWORD_ENV})"
    )
    mqtt.add_argument("--mqtt-ca-file", help="CA certificate(s) for mqtts://")
    mqtt.add_argument("--mqtt-cert-file", help="client certificate for mqtts://")
    mqtt.add_argument("--mqtt-key-file", help="client key for mqtts://")
    mqtt.add_argument(
        "--mqtt-tls-insecure",
        action="store_true",
        help="skip the broker host-name check (testing only)",
    )
    mqtt.add_argument(
        "--reconnect-max",
        type=positive_seconds,
        default=5.0,
        help="longest wait between reconnects, s",
    )
    mqtt.add_argument(
        "--drain-timeout",
        type=non_negative_seconds,
        default=5.0,
        help="seconds to publish buffered latents at exit",
    )


def add_decode_argument(parser: argparse.ArgumentParser, where: str) -> None:
    """``--decode [FORMAT]`` of ``live`` and ``serve``: the round trip written beside the
    latents (``where`` says where)."""
    parser.add_argument(
        "--decode",
        nargs="?",
        const="mp4",
        choices=DECODE_FORMATS,
        metavar="FORMAT",
        help="also decode every latent and write the frames (the round trip), "
        f"{where}; FORMAT: {', '.join(DECODE_FORMATS)} (png: a folder of frames; default "
        "without FORMAT: mp4)",
    )


def decoder_for_round_trip(args: argparse.Namespace) -> WanDecoder:
    """The decoder of ``--decode``: the weights the encoder came from (random ones said so)."""
    decoder, _, random = decoder_from_args(args)
    if random:
        print(
            "streamvae: RANDOM WEIGHTS: the decoded frames (the round trip) are meaningless too",
            file=sys.stderr,
        )
    return decoder


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log connections and reconnections (INFO)"
    )


def _setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("source")
    group.add_argument(
        "--size", help="HxW, multiples of 8, e.g. 480x832 (default: the source's own size)"
    )
    add_resize_argument(group)
    group.add_argument("--frames", type=positive_int, help="stop after this many frames")
    group.add_argument(
        "--max-queued-groups",
        type=positive_int,
        default=2,
        help="groups of 4 frames waiting for the encoder; live sources drop the oldest beyond",
    )
    group.add_argument(
        "--ffmpeg-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="FFmpeg option for stream URLs, e.g. rtsp_transport=tcp or rtsp_flags=listen",
    )
    group.add_argument(
        "--source-password-file",
        help="file whose first line is the stream's password, put into rtsp://USER@host/... "
        f"(else ${SOURCE_PASSWORD_ENV}; keeps it out of the command line)",
    )


RESIZE_HELP = "how --size is reached: resize scales, crop scales to cover and keeps the centre"


def add_resize_argument(group: argparse._ActionsContainer) -> None:
    """``--resize {resize,crop}`` (default ``resize``), the same in every command."""
    group.add_argument("--resize", choices=("resize", "crop"), default="resize", help=RESIZE_HELP)


MODE_HELP = (
    "frame: each frame runs as far as causality allows when it arrives; group: a group runs in "
    "one step when its 4th frame arrives"
)


def _add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder")
    group.add_argument(
        "--mode",
        choices=("frame", "group"),
        default="frame",
        help=MODE_HELP,
    )
    group.add_argument(
        "--pad-tail", action="store_true", help="pad a partial last group instead of dropping it"
    )
    group.add_argument(
        "--no-normalize", action="store_true", help="raw latent means, without Wan's normalisation"
    )
    group.add_argument(
        "--latent-dtype", choices=sorted(STORAGE_DTYPES), default="float32", help="storage dtype"
    )
    # As `streamvae bench` runs it, so that the bench measures what the CLI runs.
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, launch every step's kernels instead of replaying captured CUDA graphs",
    )
    group.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="on CUDA, cuDNN's default algorithms instead of the fastest measured per shape",
    )
    group.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (float32 runs)")


# -- helpers shared by both commands ----


def default_stream_id(source: str) -> str:
    """A topic-safe stream id from a source: ``camera0``, the file's stem, the URL's host/path."""
    kind = source_kind(source)
    if kind == "webcam":
        raw = "camera" + re.sub(r"\D", "", source)
    elif kind == "synthetic":
        raw = "synthetic-" + (urlsplit(source).netloc or "moving")
    elif kind == "network":
        parts = urlsplit(source)
        raw = f"{parts.hostname or 'stream'}-{parts.path.strip('/')}"
    else:
        raw = Path(source).stem
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-._")[:64]
    return cleaned or "stream"


def model_labels(choice: ModelChoice, *, normalize: bool) -> dict[str, str]:
    """Labels stored with every latent: model, config, z_dim, stride, normalisation, meaningless.

    ``normalization`` names the preset whose latent statistics were applied (``wan2.1``,
    ``wan2.2``) or ``none``.
    """
    config = choice.encoder.config
    return {
        "model": choice.label,
        "config": config.name,
        "z_dim": str(config.z_dim),
        "stride": f"{config.temporal_stride}x{config.spatial_stride}x{config.spatial_stride}",
        "normalization": _statistics_name(config) if normalize else "none",
        "meaningless": "true" if choice.random else "false",
    }


def _statistics_name(config: WanConfig) -> str:
    for preset in PRESETS.values():
        if (preset.latents_mean, preset.latents_std) == (config.latents_mean, config.latents_std):
            return preset.name
    return config.name


def mqtt_settings(args: argparse.Namespace) -> MqttSettings | None:
    """The broker from ``--mqtt`` and the TLS/password options; ``None`` without ``--mqtt``."""
    if not args.mqtt:
        return None
    from streamvae.io.mqtt import MqttSettings

    settings = MqttSettings.from_url(
        args.mqtt,
        password_file=args.mqtt_password_file,
        ca_file=args.mqtt_ca_file,
        cert_file=args.mqtt_cert_file,
        key_file=args.mqtt_key_file,
        tls_insecure=args.mqtt_tls_insecure,
    )
    settings.tls_context()  # a missing CA file or a bad key: refused before streaming
    return settings


def mqtt_sink(
    args: argparse.Namespace, settings: MqttSettings, stream_id: str, labels: dict[str, str]
) -> MqttSink:
    """One stream's MQTT sink with the command's QoS, dtype, buffer and reconnect options."""
    from streamvae.io.mqtt import MqttSink

    return MqttSink(
        settings,
        stream_id=stream_id,
        labels=labels,
        qos=args.qos,
        dtype=args.latent_dtype,
        buffer_messages=args.buffer_messages,
        backoff=Backoff(initial=0.2, maximum=args.reconnect_max),
        drain_timeout=args.drain_timeout,
    )


def _ffmpeg_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            usage_error(f"--ffmpeg-option takes KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def source_password(args: argparse.Namespace) -> str | None:
    """The source's password: ``--source-password-file`` (first line), else the environment."""
    path = getattr(args, "source_password_file", None)
    if path:
        lines = Path(path).read_text().splitlines()
        return lines[0] if lines else ""
    return os.environ.get(SOURCE_PASSWORD_ENV) or None


FINITE_JOB_RECONNECTS = 2
"""Failed opens in a row after which ``encode`` (a finite job) gives up on a camera or stream
(``live`` and ``serve`` keep retrying, and their stats lines say so)."""


def _open_source_from_args(
    uri: str, args: argparse.Namespace, *, finite: bool = False
) -> FrameSource:
    if isinstance(uri, str) and redact_url(uri) != uri:
        print(
            "streamvae: warning: the source URL holds a secret, visible in the process list "
            f"and shell history; put the password in ${SOURCE_PASSWORD_ENV} or "
            "--source-password-file instead",
            file=sys.stderr,
        )
    with user_errors():
        password = source_password(args)
        return open_source(
            uri,
            size=args.size,
            resize=args.resize,
            max_queued_groups=args.max_queued_groups,
            ffmpeg_options=_ffmpeg_options(args.ffmpeg_option),
            password=password if source_kind(uri) == "network" else None,
            max_reconnects=FINITE_JOB_RECONNECTS if finite else None,
        )


def _model_choice(args: argparse.Namespace) -> ModelChoice:
    """The encoder of ``--weights`` / ``--random-weights`` (saying so on stderr if random)."""
    choice = model_from_args(args)
    size = parse_size(args.size) if getattr(args, "size", None) else None
    problem = None if size is None else choice.encoder.config.size_error(*size)
    if problem is not None:
        usage_error(f"--size {args.size}: {problem}")
    if choice.random:
        print(
            "streamvae: RANDOM WEIGHTS: the latents are meaningless (for trying the pipeline); "
            "every output is labelled meaningless=true",
            file=sys.stderr,
        )
    options = cuda_options(args, choice.encoder.device)
    if choice.encoder.device.type == "cuda":
        torch.backends.cudnn.benchmark = options["cudnn_benchmark"]
        torch.backends.cudnn.allow_tf32 = options["tf32"]
        torch.backends.cuda.matmul.allow_tf32 = options["tf32"]
    return choice


def _stream_encoder(args: argparse.Namespace) -> tuple[ModelChoice, StreamEncoder]:
    choice = _model_choice(args)
    options = cuda_options(args, choice.encoder.device)
    encoder = StreamEncoder(
        choice.encoder,
        mode=args.mode,
        pad_tail=args.pad_tail,
        normalize=not args.no_normalize,
        cuda_graphs=options["cuda_graphs"],
    )
    return choice, encoder


def cuda_options(args: argparse.Namespace, device: torch.device) -> dict[str, bool]:
    """What the CLI runs on ``device``: CUDA graphs, cuDNN's benchmark mode and TF32 as
    ``streamvae bench`` measures them by default (graphs and benchmark on, TF32 off); each has
    a flag. Off the GPU none applies."""
    cuda = device.type == "cuda"
    return {
        "cuda_graphs": cuda and not args.no_cuda_graphs,
        "cudnn_benchmark": cuda and not args.no_cudnn_benchmark,
        "tf32": cuda and args.tf32,
    }


WARMUP_HELP = (
    "run each stream size's first steps before the streams go live (cuDNN autotuning and "
    "kernel setup off the live path): auto warms up on CUDA only, where a cold first latent "
    "takes seconds; on; off"
)


def add_warmup_argument(parser: argparse.ArgumentParser) -> None:
    """``--warmup {auto,on,off}`` of the commands that serve live streams."""
    parser.add_argument("--warmup", choices=("auto", "on", "off"), default="auto", help=WARMUP_HELP)


def warmup_wanted(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether ``--warmup`` asks to warm up on ``device`` (``auto``: on CUDA only)."""
    choice = getattr(args, "warmup", "auto")
    return choice == "on" or (choice == "auto" and device.type == "cuda")


@dataclass
class _Stop:
    """Which signal (if any) stopped a run: ``status`` is its exit status (130 for SIGINT, 143
    for SIGTERM), as a shell reports a process the signal ended."""

    signal: int | None = None

    @property
    def status(self) -> int:
        return 128 + (self.signal or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGINT).name


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[_Stop]:
    """First Ctrl-C / SIGTERM: ``stop()`` (a clean shutdown); the second: cancel the run. The
    :class:`_Stop` it gives says which signal came first."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM)
    received = 0
    stopped = _Stop()

    def on_signal(number: int) -> None:
        nonlocal received
        received += 1
        if received == 1:
            stopped.signal = number
            print("\nstreamvae: stopping (flushing; Ctrl-C again to abort)", file=sys.stderr)
            stop()
        elif task is not None:
            task.cancel()

    installed = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, int(sig))
            installed.append(sig)
    try:
        yield stopped
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _run_until_done(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run``, with an abort (a second Ctrl-C) reported as exit status 130."""
    try:
        return asyncio.run(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("streamvae: aborted", file=sys.stderr)
        return 130
    except FrameError as exc:  # e.g. a source whose frames the model cannot take (its rule)
        raise SystemExit(f"streamvae: {exc}") from None
    except OSError as exc:  # an output that cannot be written (disk full, read-only, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        raise SystemExit(f"streamvae: {where}{exc.strerror or exc}") from None


def _file_size(path: Path, fallback: int) -> int:
    """The size of the file written (its header included), or ``fallback`` if it is gone."""
    try:
        return path.stat().st_size
    except OSError:
        return fallback


def _latents(count: int) -> str:
    return f"{count} latent" if count == 1 else f"{count} latents"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _latency_text(values: Any, name: str = "latency") -> str:
    points = percentiles(values)
    if not points:
        return f"{name} n/a"
    return f"{name} " + "  ".join(f"{key} {_ms(value)}" for key, value in points.items())


def _latency_lines(stats: PipelineStats, source: FrameSource) -> list[str]:
    """The summary's latency lines. A live source (a camera, a stream, a paced synthetic one) is
    read as it comes, so capture -> ready is its latency; a file or an unpaced synthetic source
    is read ahead of the encoder, so its capture -> ready is mostly time in the read-ahead queue
    and the encoder's own time (push -> ready) comes first."""
    own, waits = percentiles(stats.encoder_latencies), percentiles(stats.queue_waits)
    if source.live:
        parts = (
            f"; the encoder p50 {_ms(own['p50'])}, queued p50 {_ms(waits['p50'])}"
            if own and waits
            else ""
        )
        return [
            f"{_latency_text(stats.latencies)} (capture of a latent's last frame -> latent ready"
            f"{parts})"
        ]
    encoder = (
        f"{_latency_text(stats.encoder_latencies, 'encoder latency')} "
        "(push of a latent's last frame -> latent ready)"
    )
    if not waits:
        return [encoder]
    total = percentiles(stats.latencies)
    return [
        encoder,
        f"{_latency_text(stats.queue_waits, 'read-ahead queue')} (a latent's last frame waited "
        "this long before the encoder took it: this source is read ahead, so its capture -> "
        f"latent, p50 {_ms(total['p50'])}, is mostly queueing)",
    ]


def _process_seconds() -> float | None:
    """Seconds since this process started (Linux: from /proc), or ``None`` where unknown."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _model_text(choice: ModelChoice) -> str:
    """What ran, for the summary: a narrow or random network says what it is good for."""
    config = choice.encoder.config
    line = f"model: {config.name}"
    if "narrow" in config.name:
        line += (
            f" (the {config.name.split('-narrow')[0]} network 8 channels wide: for trying the "
            "pipeline, not the real model's speed)"
        )
    if choice.random:
        line += ", random weights"
    return line


class _ProgressBar:
    """Progress on stderr: a bar redrawn in place (a terminal, 10 times a second at most), or a
    plain line every 5 seconds (a pipe or a log file)."""

    def __init__(self, stream: TextIO, total: Callable[[], int | None], enabled: bool) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.terminal = stream.isatty()
        self._interval = 0.1 if self.terminal else 5.0
        self._last = time.monotonic()

    def update(self, stats: PipelineStats, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        total = self.total()
        rate = f"{stats.frames_per_second:6.1f} frames/s  {stats.latents} latents"
        if total:
            done = min(1.0, stats.frames / total)
            bar = "#" * int(done * 30)
            line = f"[{bar:<30}] {stats.frames}/{total} frames  {rate}"
        else:
            line = f"{stats.frames} frames  {rate}"
        self.stream.write(f"\r{line}\x1b[K" if self.terminal else f"{line}\n")
        self.stream.flush()

    def finish(self, stats: PipelineStats) -> None:
        if self.enabled and self.terminal:
            self.update(stats, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _print_summary(args: argparse.Namespace, summary: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print("\n".join(lines), flush=True)


async def _source_opened(source: FrameSource) -> bool:
    """Wait for ``source`` to open; exit with its error (status 1) if it cannot. ``False``:
    stopped (Ctrl-C) before it opened."""
    try:
        opened = await source.opened()
    except SourceError as exc:
        raise SystemExit(f"streamvae: {exc}") from None
    if not opened:
        print("streamvae: stopped before the source opened; nothing written", file=sys.stderr)
    return opened


@dataclass
class _Outcome:
    failed: bool = False
    removed: bool = False


@contextlib.contextmanager
def _removed_on_failure(path: Path, created: bool) -> Iterator[_Outcome]:
    """Delete ``path`` if this command ``created`` it and the run failed (``outcome.failed``
    set, or an exception): no incomplete output is left behind, and a file that was there
    before is never deleted."""
    outcome = _Outcome()
    try:
        yield outcome
    except BaseException:
        outcome.failed = True
        raise
    finally:
        if outcome.failed and created:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            outcome.removed = True


# -- encode ----


def run_encode(args: argparse.Namespace) -> int:
    """The ``encode`` command (see :func:`add_encode_command`)."""
    _setup_logging(args)
    check_output_file(args.output, "--output")
    source = _open_source_from_args(args.input, args, finite=True)
    choice, encoder = _stream_encoder(args)
    return _run_until_done(_encode(args, source, choice, encoder))


async def _encode(
    args: argparse.Namespace, source: FrameSource, choice: ModelChoice, encoder: StreamEncoder
) -> int:
    labels = model_labels(choice, normalize=not args.no_normalize)
    stats = PipelineStats()
    progress = _ProgressBar(
        sys.stderr,
        lambda: min(filter(None, (source.total_frames, args.frames)), default=None),
        not args.quiet,
    )
    error: str | None = None
    output = Path(args.output)
    async with source:
        with _stop_on_signals(source.stop) as stopped:
            # The input first: a file that is no video is refused before any output exists.
            if not await _source_opened(source):
                return stopped.status
            created = not output.exists()
            with (
                _removed_on_failure(output, created) as outcome,
                FileSink(output, labels=labels, dtype=args.latent_dtype) as sink,
            ):
                try:
                    await encode_to_sinks(
                        source,
                        encoder,
                        [sink],
                        max_frames=args.frames,
                        on_latent=lambda _, s: progress.update(s),
                        stats=stats,
                    )
                except SourceError as exc:
                    error = str(exc)
                    outcome.failed = True
                # A signal before the source ended: the job was not done (the file keeps the
                # latents of the frames read so far), and the exit status says so.
                interrupted = stopped.signal is not None and not outcome.failed
    progress.finish(stats)
    summary = {
        **stats.summary(),
        "output": str(args.output),
        "bytes": sink.bytes_written,
        "output_removed": outcome.removed,
        "dropped_by_source": source.stats.dropped_frames,
        "meaningless": choice.random,
        "error": error,
        "stopped_by": stopped.name if interrupted else None,
    }
    meaningless = " (RANDOM WEIGHTS: latents are meaningless)" if choice.random else ""
    took = _process_seconds()
    summary["command_seconds"] = None if took is None else round(took, 2)
    _print_summary(
        args,
        summary,
        [
            f"encoded {stats.frames} frames -> {stats.latents} latents in {stats.elapsed:.2f} s "
            f"({stats.frames_per_second:.1f} frames/s)"
            + ("" if took is None else f"; the whole command took {took:.1f} s"),
            _model_text(choice),
            *_latency_lines(stats, source),
            f"dropped: {stats.dropped_by_encoder} frame(s) of a partial last group, "
            f"{source.stats.dropped_frames} by the source",
            (
                f"removed the incomplete {args.output} ({sink.latents_written} latents written "
                "before the failure)"
                if outcome.removed
                else f"wrote {args.output} ({_latents(sink.latents_written)}, "
                f"{_file_size(output, sink.bytes_written)} bytes)" + meaningless
            ),
            *([f"error: {error}"] if error else []),
            *(
                [
                    f"stopped by {stopped.name} after {stats.frames} frames: not the whole "
                    f"input (the file holds the latents of those frames)"
                ]
                if interrupted
                else []
            ),
        ],
    )
    if error:
        return 1
    return stopped.status if interrupted else 0


# -- live ----


def run_live(args: argparse.Namespace) -> int:
    """The ``live`` command (see :func:`add_live_command`)."""
    if args.output is not None:  # given: '' too is checked (and refused), never ignored
        check_output_file(args.output, "--output")
    if not args.mqtt and not args.output:
        usage_error("live needs --mqtt URL and/or --output FILE")
    decoded: Path | None = None
    if args.decode:
        if not args.output:
            usage_error(
                "--decode writes the decoded frames beside the latents file: give -o FILE.latents"
            )
        decoded = decoded_output_path(args.output, args.decode)
        check_decode_output(decoded, "--decode", folder=args.decode == "png")
    _setup_logging(args)
    with user_errors():
        stream_id = validate_stream_id(args.stream_id or default_stream_id(args.source))
        settings = mqtt_settings(args)
    source = _open_source_from_args(args.source, args)
    choice, encoder = _stream_encoder(args)
    round_trip = None
    if decoded is not None:
        round_trip = (decoded, decoder_for_round_trip(args))
    return _run_until_done(_live(args, source, choice, encoder, settings, stream_id, round_trip))


async def _live(
    args: argparse.Namespace,
    source: FrameSource,
    choice: ModelChoice,
    encoder: StreamEncoder,
    settings: MqttSettings | None,
    stream_id: str,
    round_trip: tuple[Path, WanDecoder] | None = None,
) -> int:
    labels = {**model_labels(choice, normalize=not args.no_normalize), "stream": stream_id}
    stats = PipelineStats()
    sinks: list[LatentSink] = []
    error: str | None = None
    # A source that cannot come back (a file, synthetic://) is refused before any output exists;
    # a camera or stream that is not up yet is waited for, reconnecting, as always.
    if not source.reconnect and not await _source_opened(source):
        return 130
    output = Path(args.output) if args.output else None
    created = output is not None and not output.exists()
    async with contextlib.AsyncExitStack() as stack:
        mqtt: MqttSink | None = None
        if settings is not None:
            mqtt = mqtt_sink(args, settings, stream_id, labels)
            await stack.enter_async_context(mqtt)
            sinks.append(mqtt)
            print(f"streamvae: publishing {stream_id} to {settings.display}", file=sys.stderr)
        file_sink: FileSink | None = None
        if args.output:
            file_sink = stack.enter_context(
                FileSink(args.output, labels=labels, dtype=args.latent_dtype)
            )
            sinks.append(file_sink)
        decode_sink: DecodeSink | None = None
        if round_trip is not None:
            decode_sink = stack.enter_context(
                DecodeSink(round_trip[0], round_trip[1], normalized=not args.no_normalize)
            )
            sinks.append(decode_sink)
        await stack.enter_async_context(source)
        stopped = stack.enter_context(_stop_on_signals(source.stop))
        reporter = asyncio.ensure_future(_report_live(args.stats_interval, source, stats, mqtt))
        try:
            await encode_to_sinks(source, encoder, sinks, max_frames=args.frames, stats=stats)
        except (SourceError, SinkError) as exc:
            error = str(exc)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    # Stopped before the source ever opened (a camera that is not there): nothing was done.
    never_opened = stopped.signal is not None and not source.has_opened and error is None
    if never_opened:
        error = f"stopped by {stopped.name} before the source opened; nothing encoded"
    if mqtt is not None and mqtt.stats.undelivered and error is None:
        m = mqtt.stats  # the stream ran, but not every latent got out: a failure too
        error = (
            f"{m.undelivered} of {m.sent} latent(s) not delivered to MQTT "
            f"({m.discarded} discarded, {m.unsent} unsent; last error: {m.last_error})"
        )
    summary: dict[str, Any] = {
        **stats.summary(),
        "stream": stream_id,
        "source": {
            "dropped_frames": source.stats.dropped_frames,
            "dropped_groups": source.stats.dropped_groups,
            "disconnects": source.stats.disconnects,
            "reconnects": source.stats.reconnects,
        },
        "meaningless": choice.random,
        "error": error,
    }
    lines = [
        f"{stream_id}: {stats.frames} frames -> {stats.latents} latents in {stats.elapsed:.2f} s "
        f"({stats.frames_per_second:.1f} frames/s), {stats.gaps} gap(s)",
        _model_text(choice),
        *_latency_lines(stats, source),
        f"dropped: {source.stats.dropped_frames} frames in {source.stats.dropped_groups} whole "
        f"groups by the source, {stats.dropped_by_encoder} in partial groups by the encoder",
    ]
    if mqtt is not None:
        m = mqtt.stats
        summary["mqtt"] = {
            "sent": m.sent,
            "published": m.published,
            "discarded": m.discarded,
            "unsent": m.unsent,
            "connects": m.connects,
            "publish_latency_ms": {
                k: round(v * 1000, 2) for k, v in percentiles(m.publish_latency).items()
            },
        }
        lines.append(
            f"mqtt: {m.published}/{m.sent} published, {m.discarded} discarded (buffer full), "
            f"{m.unsent} unsent at exit, {m.connects} connection(s)"
        )

    if file_sink is not None:
        summary["output"] = str(args.output)
        unopened = not source.has_opened
        if (error or unopened) and created and not file_sink.latents_written and output:
            output.unlink(missing_ok=True)  # a failed run leaves no empty file behind
            summary["output_removed"] = True
            why = "the source never opened" if unopened else "no latents written"
            lines.append(f"removed {args.output} ({why})")
        else:
            lines.append(f"wrote {args.output} ({file_sink.latents_written} latents)")
    if decode_sink is not None:
        summary["decoded"] = round_trip_summary(decode_sink)
        lines.append(round_trip_line(decode_sink, choice.random))
    if error:
        lines.append(f"error: {error}")
    _print_summary(args, summary, lines)
    if never_opened:
        return stopped.status
    return 1 if error else 0


def round_trip_summary(sink: DecodeSink) -> dict[str, Any]:
    """``--decode``'s part of a summary: where the frames went and how many."""
    return {
        "output": str(sink.path),
        "latents": sink.latents_decoded,
        "frames": sink.frames_written,
    }


def round_trip_line(sink: DecodeSink, random: bool) -> str:
    """``--decode``'s line of a summary."""
    where = f"into {sink.path}" if sink.frames_written else f"(nothing written to {sink.path})"
    return f"decoded {_latents(sink.latents_decoded)} -> {sink.frames_written} frames {where}" + (
        " (RANDOM WEIGHTS: meaningless)" if random else ""
    )


def _not_open_text(source: FrameSource) -> str:
    """`` | source not open yet: ... (retrying)`` for a stats line while a source is down."""
    if source.has_opened or not source.stats.last_error:
        return ""
    return f" | source not open yet: {source.stats.last_error} (retrying)"


async def _report_live(
    interval: float, source: FrameSource, stats: PipelineStats, mqtt: MqttSink | None
) -> None:
    if interval <= 0:
        return
    frames = latents = 0
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        span, last = now - last, now
        print(
            _live_stats_line(span, frames, latents, source, stats, mqtt),
            file=sys.stderr,
            flush=True,
        )
        frames, latents = source.stats.frames_read, stats.latents


def _live_stats_line(
    span: float,
    frames: int,
    latents: int,
    source: FrameSource,
    stats: PipelineStats,
    mqtt: MqttSink | None,
) -> str:
    """``live``'s stats line: the last ``span`` seconds' rates and latencies first (``frames``
    and ``latents``: the counts at its start), then the counts since the start, labelled so."""
    fps_in = (source.stats.frames_read - frames) / span
    new = stats.latents - latents
    fps_out = new / span
    recent = list(stats.latencies)[-new:] if new else []
    line = (
        f"last {span:.1f} s: in {fps_in:.1f} frames/s, out {fps_out:.1f} latents/s, "
        f"{_latency_text(recent)} | since start: {stats.latents} latents, dropped "
        f"{source.stats.dropped_frames} frames"
    )
    if source.stats.disconnects:
        line += f", source reconnects {source.stats.reconnects}/{source.stats.disconnects}"
    line += _not_open_text(source)
    if mqtt is not None:
        state = "connected" if mqtt.stats.connected else "DISCONNECTED"
        line += (
            f" | mqtt {state}, since start {mqtt.stats.published} published, "
            f"{mqtt.stats.discarded} discarded; {mqtt.stats.buffered} buffered now"
        )
    return line
