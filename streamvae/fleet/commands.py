"""``streamvae fleet ingest | worker | move``: the fleet's command line.

::

    streamvae fleet ingest rtsp://cam1.local/live --nats nats://broker:4222 --stream-id cam1 \\
        --size 480x832 --frame-codec jpeg
    streamvae fleet worker --nats nats://broker:4222 --capacity 6 --weights Wan2.1_VAE.pth \\
        --mqtt mqtt://broker:1883/lab
    streamvae fleet move cam1 --nats nats://broker:4222 --to gpu-2

The NATS password comes from ``$STREAMVAE_NATS_PASSWORD`` or ``--nats-password-file`` (or a
``--nats-creds`` file), never from the command line. SIGTERM / Ctrl-C: an ingest ends its run;
a worker hands each stream over at a group boundary, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from streamvae.fleet.broker import NATS_PASSWORD_ENV, NatsSettings, connect
from streamvae.fleet.ingest import DEFAULT_RETAIN, ingest
from streamvae.fleet.messages import CODECS
from streamvae.fleet.names import CONTROL_SUBJECT, LEASES_BUCKET, validate_fleet_id
from streamvae.fleet.worker import FleetWorker, WorkerOptions
from streamvae.model_args import add_model_arguments, model_from_args
from streamvae.usage import positive_int, positive_seconds, user_errors

__all__ = ["add_fleet_command"]


def add_fleet_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``streamvae fleet {ingest,worker,move}``."""
    from streamvae.io.commands import MODE_HELP

    parser = commands.add_parser(
        "fleet",
        help="a worker fleet on NATS JetStream (ingest, worker, move)",
        description=__doc__.splitlines()[0],
    )
    sub = parser.add_subparsers(dest="fleet_command", required=True)

    ing = sub.add_parser(
        "ingest",
        help="publish a source's frames to JetStream",
        description="Read SOURCE and publish every frame (index, capture time, run id) to "
        "svae.frames.<stream-id> on JetStream, which keeps the last --retain frames for replays.",
    )
    ing.add_argument("source", metavar="SOURCE", help="anything open_source takes")
    _nats_arguments(ing)
    ing.add_argument("--stream-id", required=True, help="the stream's id (one subject token)")
    ing.add_argument("--size", help="HxW, multiples of 8")
    ing.add_argument(
        "--resize",
        choices=("resize", "crop"),
        default="resize",
        help="how --size is reached: resize scales, crop scales to cover and keeps the centre",
    )
    ing.add_argument(
        "--frame-codec", choices=CODECS, default="jpeg", help="how frames travel in messages"
    )
    ing.add_argument("--jpeg-quality", type=int, default=90, help="0-100, for --frame-codec jpeg")
    ing.add_argument(
        "--retain",
        type=int,
        default=DEFAULT_RETAIN,
        help="frames kept per stream for replays (>= R + 8)",
    )
    ing.add_argument("--frames", type=positive_int, help="stop after this many frames")
    ing.add_argument(
        "--run-id", help="run id, new for each start (default: time and a random suffix)"
    )
    ing.add_argument(
        "--take-over",
        action="store_true",
        help="replace the ingest that publishes this --stream-id now (else refused)",
    )
    _common_arguments(ing)
    ing.set_defaults(func=run_ingest)

    work = sub.add_parser(
        "worker",
        help="claim streams, encode them, publish latents",
        description="Claim up to --capacity streams through leases in a JetStream KV bucket, "
        "encode their frames and publish the latents to svae.latents.<stream> (and MQTT and/or "
        "files); a dead worker's streams are taken over once its leases expire.",
    )
    _nats_arguments(work)
    work.add_argument("--capacity", type=positive_int, required=True, help="most streams at once")
    work.add_argument("--worker-id", help="this worker's id (default: host-pid)")
    work.add_argument(
        "--lease-ttl",
        type=positive_seconds,
        default=3.0,
        help="seconds a dead worker's leases last",
    )
    work.add_argument("--mqtt", metavar="URL", help="also publish to <prefix>/<stream>/latents")
    work.add_argument("--mqtt-password-file", help="file whose first line is the MQTT password")
    work.add_argument(
        "-o", "--output", metavar="DIR", help="also write DIR/<stream>/<run>.*.latents"
    )
    work.add_argument(
        "--no-jetstream-latents",
        action="store_true",
        help="do not publish latents to svae.latents.<stream>",
    )
    work.add_argument("--mode", choices=("frame", "group"), default="frame", help=MODE_HELP)
    work.add_argument(
        "--latent-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage dtype",
    )
    add_model_arguments(work)
    _common_arguments(work)
    work.set_defaults(func=run_worker)

    move = sub.add_parser(
        "move",
        help="ask a stream's owner to hand it over (planned move)",
        description="Ask the worker that owns STREAM to hand it over: it stops after a latent, at "
        "a group boundary, writes its progress and releases the lease; the next owner (--to, "
        "else the least loaded worker) replays up to that latent without publishing it again.",
    )
    move.add_argument("stream_id", metavar="STREAM", help="the id of the stream to move")
    _nats_arguments(move)
    move.add_argument("--to", help="the worker that should take it (default: least loaded)")
    _common_arguments(move)
    move.set_defaults(func=run_move)

    parser.set_defaults(run=lambda args: args.func(args))
    return parser


def _nats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats", required=True, metavar="URL", help="nats://[user@]host:port[,host:port...]"
    )
    parser.add_argument(
        "--nats-password-file",
        help=f"file whose first line is the password (else ${NATS_PASSWORD_ENV})",
    )
    parser.add_argument("--nats-creds", help="a NATS .creds file (JWT and NKey seed)")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="events and the summary as JSON lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")


def _settings(args: argparse.Namespace) -> NatsSettings:
    with user_errors():
        return NatsSettings.from_url(
            args.nats, password_file=args.nats_password_file, creds_file=args.nats_creds
        )


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@contextlib.contextmanager
def _on_signals(stop: Any) -> Any:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record) if args.json else text, flush=True)


STOP_GRACE_S = 5.0  # after a stop signal, how long an ingest may take to publish what it read


def run_ingest(args: argparse.Namespace) -> int:
    from streamvae.io.commands import _stop_on_signals
    from streamvae.io.sources import SourceError, open_source

    _logging(args)
    settings = _settings(args)
    with user_errors():
        validate_fleet_id(args.stream_id)
        source = open_source(args.source, size=args.size, resize=args.resize)

    async def main() -> int:
        async with source:
            # A source that cannot come back (a file) is refused before anything reaches NATS.
            if not source.reconnect:
                try:
                    if not await source.opened():
                        return 130
                except SourceError as exc:
                    print(f"streamvae: {exc}", file=sys.stderr)
                    return 1
            task = asyncio.ensure_future(
                ingest(
                    source,
                    settings,
                    stream_id=args.stream_id,
                    codec=args.frame_codec,
                    retain=args.retain,
                    run=args.run_id,
                    max_frames=args.frames,
                    jpeg_quality=args.jpeg_quality,
                    take_over=args.take_over,
                )
            )

            def stop() -> None:
                # The first SIGTERM / Ctrl-C ends the source, so that the frames read so far
                # are published; if that has not finished within STOP_GRACE_S (NATS
                # unreachable, say) it gives up. A second signal cancels at once.
                source.stop()
                asyncio.get_running_loop().call_later(STOP_GRACE_S, task.cancel)

            with _stop_on_signals(stop):
                try:
                    stats = await task
                except asyncio.CancelledError:
                    print(
                        f"streamvae: stopped before every frame reached NATS "
                        f"({settings.display}); frames read but not published are lost",
                        file=sys.stderr,
                    )
                    return 1
                except (ValueError, SourceError, PermissionError) as exc:
                    print(f"streamvae: {exc}", file=sys.stderr)
                    return 1
        summary = {"event": "ingest_done", **stats.summary()}
        _emit(
            args,
            summary,
            f"{args.stream_id}: published {stats.frames} frames ({stats.bytes} bytes) in "
            f"{stats.elapsed:.1f} s, runs {', '.join(stats.runs)}",
        )
        return 0

    return asyncio.run(main())


def run_worker(args: argparse.Namespace) -> int:
    from streamvae.io.commands import model_labels

    _logging(args)
    settings = _settings(args)
    mqtt = None
    if args.mqtt:
        from streamvae.io.mqtt import MqttSettings

        with user_errors():
            mqtt = MqttSettings.from_url(args.mqtt, password_file=args.mqtt_password_file)
    choice = model_from_args(args)
    with user_errors():
        options = WorkerOptions(
            capacity=args.capacity,
            **({"worker_id": args.worker_id} if args.worker_id else {}),
            lease_ttl=args.lease_ttl,
            mode=args.mode,
            latent_dtype=args.latent_dtype,
            labels=model_labels(choice, normalize=True),
            jetstream_latents=not args.no_jetstream_latents,
            mqtt=mqtt,
            output_dir=Path(args.output) if args.output else None,
        )

    def on_event(record: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(record), flush=True)

    worker = FleetWorker(settings, choice.encoder, options, on_event=on_event)

    async def main() -> int:
        stop = asyncio.Event()
        with _on_signals(stop.set):
            try:
                await worker.run(stop)
            except (ValueError, PermissionError) as exc:
                print(f"streamvae: {exc}", file=sys.stderr)
                return 1
        summary = {"event": "worker_done", **worker.summary()}
        _emit(args, summary, json.dumps(summary, indent=2))
        return 0

    return asyncio.run(main())


def run_move(args: argparse.Namespace) -> int:
    _logging(args)
    settings = _settings(args)

    async def main() -> int:
        nc = await connect(settings, name="streamvae-fleet-move")
        try:
            js = nc.jetstream(timeout=2.0)
            leases = await js.key_value(LEASES_BUCKET)
            try:
                owner = json.loads((await leases.get(args.stream_id)).value)["worker"]
            except Exception:
                print(f"streamvae: stream {args.stream_id} has no owner now", file=sys.stderr)
                return 1
            request = {"release": args.stream_id, "to": args.to}
            reply = await nc.request(
                CONTROL_SUBJECT.format(worker=owner), json.dumps(request).encode(), timeout=5
            )
            answer = json.loads(reply.data)
            _emit(args, {"event": "move", "owner": owner, **answer}, f"{owner}: {answer}")
            return 0 if answer.get("ok") else 1
        finally:
            await nc.close()

    return asyncio.run(main())
