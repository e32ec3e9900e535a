"""``streamvae serve``: many sources through one :class:`~streamvae.StreamPool` to MQTT and files.

::

    streamvae serve cameras.toml --weights Wan2.1_VAE.pth
    streamvae serve --source door=rtsp://cam1/stream --source yard=0 --size 240x416 \\
        --mqtt mqtt://broker:1883/site --output-dir out/ --weights Wan2.1_VAE.pth

Sources come from a TOML file, from repeated ``--source ID=URI``, or both (ids must differ)::

    mqtt = "mqtt://127.0.0.1:1883/site"   # optional: --mqtt overrides
    output_dir = "out"                     # optional: --output-dir overrides
    size = "240x416"                       # optional: every source's size (--size overrides)

    [sources.door]
    uri = "rtsp://cam1.local:554/stream"
    size = "480x832"                       # optional: this source's own size

    [sources.yard]
    uri = "0"

Each stream publishes to ``<prefix>/<ID>/latents`` (with its own retained status, as ``live``
does) and/or writes to ``<output-dir>/<ID>.latents``. One tick takes each source's next
frame, waiting at most ``--deadline`` seconds for late ones, and steps the pool: a stalled
source holds no other back. Network sources and cameras that fail are reopened with backoff,
and their first frame after it marks a gap on their own stream only (its run restarts: the
next latent has ``gap`` and index 0). A stats line per stream every ``--stats-interval``
seconds; Ctrl-C (SIGTERM) stops every source, flushes every stream, publishes what is buffered
and marks each stream offline; a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamvae.io.commands import (
    _add_encoder_arguments,
    _add_mqtt_arguments,
    _add_output_arguments,
    _add_source_arguments,
    _latency_text,
    _live_stats_line,
    _model_choice,
    _open_source_from_args,
    _print_summary,
    _run_until_done,
    _setup_logging,
    _stop_on_signals,
    add_decode_argument,
    add_warmup_argument,
    decoder_for_round_trip,
    model_labels,
    mqtt_settings,
    mqtt_sink,
    round_trip_line,
    round_trip_summary,
    warmup_wanted,
)
from streamvae.io.decode import DecodeSink, check_decode_output, decoded_output_path
from streamvae.io.filesink import FileSink
from streamvae.io.pipeline import LatentSink, PipelineStats, SinkError, _counted, latent_latency
from streamvae.io.sources import FrameSource, SourceError
from streamvae.io.topics import validate_stream_id
from streamvae.model_args import add_model_arguments
from streamvae.pool import PoolSourceError, StreamPool
from streamvae.usage import check_output_dir, non_negative_seconds, user_errors

if TYPE_CHECKING:
    from streamvae.io.mqtt import MqttSettings, MqttSink

__all__ = [
    "SourceSpec",
    "StreamSinks",
    "add_serve_command",
    "decoded_path",
    "read_sources",
    "run_serve",
    "stream_output_path",
    "stream_sinks",
]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source of ``serve``: its stream id, URI and size (``None``: the command's ``--size``)."""

    stream_id: str
    uri: str
    size: str | None = None


def add_serve_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``streamvae serve [FILE.toml] [--source ID=URI ...]``."""
    parser = commands.add_parser(
        "serve",
        help="encode many sources through one batched pool, to MQTT and/or files",
        description=__doc__.split("::")[0].strip().splitlines()[0],
        epilog="See the README's 'Many sources: streamvae serve' section for the TOML file's keys.",
    )
    parser.add_argument(
        "sources_file",
        nargs="?",
        metavar="FILE.toml",
        help="sources, and settings for all of them, in TOML",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="ID=URI",
        help="a source and its stream id (repeat for more)",
    )
    parser.add_argument("--mqtt", metavar="URL", help="mqtt://[user@]host:port/prefix")
    parser.add_argument(
        "--output-dir", help="write each stream's latents to DIR/ID.latents (replacing it)"
    )
    parser.add_argument(
        "--deadline",
        type=non_negative_seconds,
        default=0.025,
        help="seconds a tick waits for late sources once one has a frame",
    )
    parser.add_argument(
        "--stats-interval",
        type=non_negative_seconds,
        default=2.0,
        help="seconds between stats lines (0: none)",
    )
    _add_mqtt_arguments(parser)
    _add_source_arguments(parser)
    _add_encoder_arguments(parser)
    add_warmup_argument(parser)
    add_model_arguments(parser)
    add_decode_argument(parser, "beside each stream's latents: DIR/ID.decoded.mp4")
    _add_output_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def read_sources(
    path: str | Path | None, pairs: list[str]
) -> tuple[list[SourceSpec], dict[str, Any]]:
    """Sources from a TOML file and ``ID=URI`` pairs; and the file's top-level defaults.

    Raises ``ValueError`` naming the bad entry (unknown keys, a bad id, an id given twice).
    """
    specs: list[SourceSpec] = []
    defaults: dict[str, Any] = {}
    if path is not None:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        unknown = set(data) - {"sources", "mqtt", "output_dir", "size"}
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {sorted(unknown)}; expected sources, mqtt, output_dir, size"
            )
        defaults = {k: v for k, v in data.items() if k != "sources"}
        sources = data.get("sources", {})
        if not isinstance(sources, dict):
            raise ValueError(f"{path}: 'sources' must be tables [sources.ID] with a uri")
        for sid, entry in sources.items():
            if not isinstance(entry, dict) or "uri" not in entry:
                raise ValueError(f'{path}: [sources.{sid}] needs uri = "..."')
            extra = set(entry) - {"uri", "size"}
            if extra:
                raise ValueError(f"{path}: [sources.{sid}] unknown keys {sorted(extra)}")
            size = entry.get("size")
            specs.append(SourceSpec(sid, str(entry["uri"]), None if size is None else str(size)))
    for pair in pairs:
        sid, sep, uri = pair.partition("=")
        if not sep or not sid or not uri:
            raise ValueError(f"--source takes ID=URI, got {pair!r}")
        specs.append(SourceSpec(sid, uri))
    seen: set[str] = set()
    for spec in specs:
        validate_stream_id(spec.stream_id)
        if spec.stream_id in seen:
            raise ValueError(f"stream id {spec.stream_id!r} is given twice")
        seen.add(spec.stream_id)
    if not specs:
        raise ValueError("give sources: a TOML file and/or --source ID=URI")
    return specs, defaults


@dataclasses.dataclass(frozen=True)
class StreamSinks:
    """One stream's sinks as ``serve`` (and ``web``) make them: MQTT and/or a latents file."""

    mqtt: MqttSink | None
    file: FileSink | None
    decode: DecodeSink | None = None

    @property
    def sinks(self) -> list[LatentSink]:
        return [sink for sink in (self.mqtt, self.file, self.decode) if sink is not None]


def stream_output_path(output_dir: str | Path, stream_id: str) -> Path:
    """Where ``--output-dir`` puts a stream's latents: ``<output_dir>/<stream_id>.latents``."""
    return Path(output_dir) / f"{stream_id}.latents"


@contextlib.asynccontextmanager
async def stream_sinks(
    args: argparse.Namespace,
    settings: MqttSettings | None,
    stream_id: str,
    labels: dict[str, str],
) -> AsyncIterator[StreamSinks]:
    """Open one stream's sinks: ``<prefix>/<ID>/latents`` on MQTT (with its retained status,
    ``offline`` once left) when ``settings``, and ``<args.output_dir>/<ID>.latents`` when
    ``args.output_dir``; closed (buffered latents published, the file closed) on leaving."""
    async with contextlib.AsyncExitStack() as stack:
        mqtt = None
        if settings is not None:
            mqtt = await stack.enter_async_context(mqtt_sink(args, settings, stream_id, labels))
        file = None
        if args.output_dir:
            path = stream_output_path(args.output_dir, stream_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            file = stack.enter_context(FileSink(path, labels=labels, dtype=args.latent_dtype))
        decode = None
        decoder = getattr(args, "round_trip_decoder", None)
        if decoder is not None and args.output_dir:
            decode = stack.enter_context(
                DecodeSink(decoded_path(args, stream_id), decoder, normalized=not args.no_normalize)
            )
        yield StreamSinks(mqtt, file, decode)


def run_serve(args: argparse.Namespace) -> int:
    """The ``serve`` command (see the module docstring)."""
    _setup_logging(args)
    with user_errors("streamvae serve"):
        specs, defaults = read_sources(args.sources_file, args.source)
        if args.output_dir is not None:  # given: '' too is checked (and refused), never ignored
            check_output_dir(args.output_dir, "--output-dir")
        args.mqtt = args.mqtt or defaults.get("mqtt")
        args.output_dir = args.output_dir or defaults.get("output_dir")
        args.size = args.size or defaults.get("size")
        if not args.mqtt and not args.output_dir:
            raise ValueError("give --mqtt URL and/or --output-dir DIR (or mqtt/output_dir in TOML)")
        if args.decode and not args.output_dir:
            raise ValueError(
                "--decode writes the decoded frames beside each stream's latents: give "
                "--output-dir DIR (or output_dir in TOML)"
            )
        if not (args.deadline >= 0):
            raise ValueError(f"--deadline must be >= 0 seconds, got {args.deadline}")
        settings = mqtt_settings(args)
    if args.output_dir:
        check_output_dir(args.output_dir, "--output-dir")
    if args.decode:
        for spec in specs:
            check_decode_output(
                decoded_path(args, spec.stream_id), "--decode", folder=args.decode == "png"
            )
    sources = {
        spec.stream_id: _open_source_from_args(
            spec.uri, argparse.Namespace(**{**vars(args), "size": spec.size or args.size})
        )
        for spec in specs
    }
    choice = _model_choice(args)
    pool = StreamPool(
        choice.encoder, mode=args.mode, pad_tail=args.pad_tail, normalize=not args.no_normalize
    )
    args.round_trip_decoder = decoder_for_round_trip(args) if args.decode else None
    return _run_until_done(_serve(args, sources, choice, pool, settings))


def decoded_path(args: argparse.Namespace, stream_id: str) -> Path:
    """Where ``--decode`` writes a stream's frames: beside ``DIR/ID.latents``."""
    return decoded_output_path(stream_output_path(args.output_dir, stream_id), args.decode)


async def _serve(
    args: argparse.Namespace,
    sources: dict[str, FrameSource],
    choice: Any,
    pool: StreamPool,
    settings: MqttSettings | None,
) -> int:
    base = model_labels(choice, normalize=not args.no_normalize)
    stats = {sid: PipelineStats() for sid in sources}
    sinks: dict[str, list[LatentSink]] = {sid: [] for sid in sources}
    mqtt: dict[str, MqttSink] = {}
    files: dict[str, FileSink] = {}
    decoded: dict[str, DecodeSink] = {}
    errors: dict[str, str] = {}
    dropped: dict[str, int] = {}
    # Sources that cannot come back (files, synthetic://) are refused before any output exists;
    # cameras and streams that are not up yet are waited for, reconnecting, as always.
    for sid, source in sources.items():
        try:
            if not source.reconnect and not await source.opened():
                return 130  # stopped (Ctrl-C) while opening
        except SourceError as exc:
            for other in sources.values():
                other.stop()
            raise SystemExit(f"streamvae serve: {sid}: {exc}") from None
    created: set[str] = set()
    async with contextlib.AsyncExitStack() as stack:
        for sid in sources:
            if args.output_dir and not stream_output_path(args.output_dir, sid).exists():
                created.add(sid)
            opened = await stack.enter_async_context(
                stream_sinks(args, settings, sid, {**base, "stream": sid})
            )
            sinks[sid] = list(opened.sinks)
            if opened.mqtt is not None:
                mqtt[sid] = opened.mqtt
            if opened.file is not None:
                files[sid] = opened.file
            if opened.decode is not None:
                decoded[sid] = opened.decode
        if settings is not None:
            print(
                f"streamvae: publishing {len(sources)} streams to {settings.display}",
                file=sys.stderr,
            )
        for source in sources.values():
            await stack.enter_async_context(source)

        def stop() -> None:
            for source in sources.values():
                source.stop()

        stack.enter_context(_stop_on_signals(stop))
        if warmup_wanted(args, pool.model.device):  # sizes known now; others at their 1st frame
            sizes = Counter(source.size for source in sources.values() if source.size)
            for size, count in sizes.items():
                began = time.monotonic()
                await asyncio.to_thread(pool.warmup, size, streams=count)
                print(
                    f"streamvae: warmed up {size[0]}x{size[1]} for {count} stream(s) in "
                    f"{time.monotonic() - began:.1f} s",
                    file=sys.stderr,
                )
        reporter = asyncio.ensure_future(_report(args.stats_interval, sources, stats, mqtt, pool))
        counted = {sid: _counted(src, stats[sid], args.frames) for sid, src in sources.items()}
        try:
            async with pool.stream(counted, deadline=args.deadline) as latents:
                try:
                    async for sid, latent in latents:
                        if sid in errors:
                            continue  # its sink is dead: the stream is being stopped
                        try:
                            for sink in sinks[sid]:
                                await sink.send(latent)
                        except SinkError as exc:
                            # A sink that cannot work (refused credentials, say) ends the run:
                            # every stream drains, and the exit status says it failed.
                            errors[sid] = str(exc)
                            stop()
                            continue
                        record = stats[sid]
                        record.latents += 1
                        record.gaps += latent.gap
                        latency = latent_latency(latent)
                        if latency is not None:
                            record.latencies.append(latency)
                finally:
                    dropped.update(latents.dropped_frames)
        except PoolSourceError as exc:
            errors.update({sid: f"{type(e).__name__}: {e}" for sid, e in exc.errors.items()})
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            for record in stats.values():
                record.finished = time.monotonic()
    for sid, sink in mqtt.items():
        m = sink.stats  # a stream that ran but whose latents did not all get out: a failure
        if m.undelivered and sid not in errors:
            errors[sid] = (
                f"{m.undelivered} of {m.sent} latent(s) not delivered to MQTT "
                f"({m.discarded} discarded, {m.unsent} unsent; last error: {m.last_error})"
            )
    summary: dict[str, Any] = {"streams": {}, "meaningless": choice.random, "pool": {}}
    lines = []
    for sid, source in sources.items():
        record = stats[sid]
        record.dropped_by_encoder = dropped.get(sid, 0)
        entry: dict[str, Any] = {
            **record.summary(),
            "source": {
                "dropped_frames": source.stats.dropped_frames,
                "dropped_groups": source.stats.dropped_groups,
                "disconnects": source.stats.disconnects,
                "reconnects": source.stats.reconnects,
            },
            "error": errors.get(sid),
        }
        line = (
            f"{sid}: {record.frames} frames -> {record.latents} latents "
            f"({record.frames_per_second:.1f} frames/s), {record.gaps} gap(s), "
            f"{source.stats.reconnects} reconnect(s), {_latency_text(record.latencies)}"
        )
        if sid in mqtt:
            m = mqtt[sid].stats
            entry["mqtt"] = {
                "sent": m.sent,
                "published": m.published,
                "discarded": m.discarded,
                "unsent": m.unsent,
                "undelivered": m.undelivered,
            }
            line += f", mqtt {m.published}/{m.sent} published, {m.discarded} discarded"
        if sid in files:
            entry["output"] = str(files[sid].path)
            if sid in errors and sid in created and not files[sid].latents_written:
                files[sid].path.unlink(missing_ok=True)  # a failed stream leaves no empty file
                entry["output_removed"] = True
        if sid in decoded:
            entry["decoded"] = round_trip_summary(decoded[sid])
            line += ", " + round_trip_line(decoded[sid], choice.random)
        if sid in errors:
            line += f", error: {errors[sid]}"
        summary["streams"][sid] = entry
        lines.append(line)
    tick = pool.stats
    summary["pool"] = {"ticks": tick.ticks, "steps": tick.steps, "mean_batch": tick.mean_batch}
    lines.append(f"pool: {tick.ticks} ticks, {tick.steps} steps, mean batch {tick.mean_batch:.2f}")
    _print_summary(args, summary, lines)
    return 1 if errors else 0


async def _report(
    interval: float,
    sources: dict[str, FrameSource],
    stats: dict[str, PipelineStats],
    mqtt: dict[str, MqttSink],
    pool: StreamPool,
) -> None:
    """A line per stream every ``interval`` seconds: fps in/out, latency, drops, MQTT state."""
    if interval <= 0:
        return
    seen = {sid: (0, 0) for sid in sources}
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        span, last = now - last, now
        for sid, source in sources.items():
            frames, latents = seen[sid]
            record = stats[sid]
            seen[sid] = (source.stats.frames_read, record.latents)
            line = _live_stats_line(span, frames, latents, source, record, mqtt.get(sid))
            print(f"{sid}: {line}", file=sys.stderr, flush=True)
        print(
            f"pool: {len(pool)} streams, mean batch {pool.stats.mean_batch:.2f}",
            file=sys.stderr,
            flush=True,
        )
