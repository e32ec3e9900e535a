"""``streamvae web``: a page where the browser's camera is the source, encoded live.

::

    streamvae web --random-weights --config narrow8 --size 64x64        # then open the URL
    streamvae web --weights Wan2.1_VAE.pth --mqtt mqtt://127.0.0.1:1883/lab -o out/

Each browser tab is its own stream (``web-1``, ``web-2``, ...) in one
:class:`~streamvae.StreamPool`, published as ``streamvae serve`` publishes: to
``<prefix>/<ID>/latents`` with a retained status, and/or appended to ``DIR/<ID>.latents``
(a restarted server numbers its sessions on past the ``web-N.latents`` there: no recording
is ever replaced).
The server binds 127.0.0.1 by default. Browsers allow the camera only on a secure origin:
``http://localhost`` / ``http://127.0.0.1`` count as one; from another machine, serve over
HTTPS (``--certfile``/``--keyfile``, or a TLS reverse proxy in front of the loopback port).
Ctrl-C (SIGTERM) ends every session cleanly (flushed, MQTT status offline); a second aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import re
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamvae.io.commands import (
    _add_encoder_arguments,
    _add_mqtt_arguments,
    _add_output_arguments,
    _latency_text,
    _model_choice,
    _print_summary,
    _run_until_done,
    _setup_logging,
    _stop_on_signals,
    add_resize_argument,
    add_warmup_argument,
    cuda_options,
    decoder_for_round_trip,
    model_labels,
    mqtt_settings,
    warmup_wanted,
)
from streamvae.io.pipeline import LatentSink
from streamvae.io.serve import stream_output_path, stream_sinks
from streamvae.io.sources import parse_size
from streamvae.model_args import add_model_arguments
from streamvae.pool import StreamPool
from streamvae.usage import (
    check_output_dir,
    non_negative_seconds,
    positive_int,
    positive_seconds,
    user_errors,
)
from streamvae.web.server import SESSION_PREFIX, PageInfo, SessionSettings, WebServer

__all__ = ["add_web_command", "first_free_session", "run_web"]

DEFAULT_SIZE = "128x128"


def add_web_command(commands: Any) -> argparse.ArgumentParser:
    """``streamvae web [--host H] [--port P] (--weights W | --random-weights) ...``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "web",
        help="a page whose camera (WebRTC) is encoded live, to MQTT and/or files",
        description="Serve a page that sends the browser's camera over WebRTC; each tab is a "
        "stream of one pool, published like `streamvae serve` does. The page shows frames in, "
        "latents out, latency, drops, a picture of the latents and the frames decoded back "
        "from them (the round trip).",
        epilog="Off localhost, browsers give the camera only to HTTPS pages: pass --certfile and "
        "--keyfile, or put a TLS reverse proxy in front of the loopback port.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the page may be reached by besides IP addresses, localhost, --host and "
        "this machine's name (a reverse proxy's public name); other Host headers get 403 "
        "(DNS rebinding). Repeatable",
    )
    parser.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--mqtt", metavar="URL", help="mqtt://[user@]host:port/prefix")
    parser.add_argument(
        "-o",
        "--output-dir",
        metavar="DIR",
        help="write each stream's latents to DIR/ID.latents (a restart numbers its sessions on "
        "past the files there: none is replaced)",
    )
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="also write every frame each stream's encoder got, losslessly, to DIR/ID/ "
        "(PNGs and frames.jsonl: for checking the latents)",
    )
    parser.add_argument(
        "--max-sessions",
        type=positive_int,
        default=4,
        help="streams the pool admits at once; more tabs are told the server is full",
    )
    parser.add_argument(
        "--first-frame-timeout",
        type=positive_seconds,
        default=10.0,
        help="seconds a new session may take to send its first frame",
    )
    parser.add_argument(
        "--frame-timeout",
        type=positive_seconds,
        default=5.0,
        help="seconds without a frame after which a session is ended",
    )
    parser.add_argument(
        "--deadline",
        type=non_negative_seconds,
        default=0.025,
        help="seconds a tick waits for late sessions once one has a frame",
    )
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="do not decode the latents for the page (the round trip beside the camera "
        "preview): the decoder costs more than the encoder",
    )
    group = parser.add_argument_group("source")
    group.add_argument(
        "--size",
        default=DEFAULT_SIZE,
        help="HxW every stream is brought to, multiples of 8; the page asks the camera for it",
    )
    add_resize_argument(group)
    group.add_argument(
        "--max-queued-groups",
        type=positive_int,
        default=2,
        help="groups of 4 frames waiting for the encoder per stream; the oldest are dropped beyond",
    )
    _add_mqtt_arguments(parser)
    _add_encoder_arguments(parser)
    add_warmup_argument(parser)
    add_model_arguments(parser)
    _add_output_arguments(parser)
    parser.set_defaults(run=run_web)
    return parser


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.certfile and not args.keyfile:
        return None
    if not args.certfile:
        raise ValueError("--keyfile needs --certfile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.certfile, args.keyfile)
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_web(args: argparse.Namespace) -> int:
    """The ``web`` command (see the module docstring)."""
    _setup_logging(args)
    # A malformed or conflicting option is a usage error (status 2); a certificate that does not
    # load is a failure (status 1): streamvae.usage's conventions.
    with user_errors("streamvae web"):
        size = parse_size(args.size)
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be 0-65535, got {args.port}")
        if args.output_dir is not None:  # given: '' too is checked (and refused)
            check_output_dir(args.output_dir, "--output-dir")
        if args.record and Path(args.record).exists() and any(Path(args.record).iterdir()):
            raise ValueError(f"--record {args.record}: the directory is not empty")
        context = _ssl_context(args)
        settings = mqtt_settings(args)
    if context is None and not _is_loopback(args.host):
        print(
            f"streamvae web: warning: serving plain HTTP on {args.host}: browsers refuse the "
            "camera to http:// pages other than localhost; use --certfile/--keyfile or a TLS "
            "reverse proxy",
            file=sys.stderr,
        )
    choice = _model_choice(args)
    options = cuda_options(args, choice.encoder.device)
    pool = StreamPool(
        choice.encoder,
        max_streams=args.max_sessions,
        mode=args.mode,
        pad_tail=args.pad_tail,
        normalize=not args.no_normalize,
        cuda_graphs=options["cuda_graphs"],
    )
    if size is not None and warmup_wanted(args, choice.encoder.device):  # before going live
        began = time.monotonic()
        pool.warmup(size)
        print(
            f"streamvae web: warmed up {size[0]}x{size[1]} in {time.monotonic() - began:.1f} s",
            file=sys.stderr,
        )
    decoder = None if args.no_decode else decoder_for_round_trip(args)
    labels = model_labels(choice, normalize=not args.no_normalize)
    kinds = (("mqtt",) if settings is not None else ()) + (("file",) if args.output_dir else ())
    info = PageInfo(
        model=choice.label,
        config=choice.encoder.config.name,
        dtype=args.dtype,
        size=size,
        random_weights=choice.random,
        z_dim=choice.encoder.config.z_dim,
        sinks=kinds,
    )
    sessions = SessionSettings(
        size=size,
        resize=args.resize,
        max_queued_groups=args.max_queued_groups,
        first_frame_timeout=args.first_frame_timeout,
        frame_timeout=args.frame_timeout,
        record_dir=Path(args.record) if args.record else None,
    )

    # A restarted server numbers its sessions on from the recordings there: never web-1 again
    # over the last run's web-1.latents (and an output that is there all the same is refused).
    first = first_free_session(args.output_dir) if args.output_dir else 1

    @contextlib.asynccontextmanager
    async def open_sinks(stream_id: str) -> AsyncIterator[Sequence[LatentSink]]:
        if args.output_dir:
            path = stream_output_path(args.output_dir, stream_id)
            if path.exists():
                raise FileExistsError(f"{path} is there already: not replacing a recording")
        async with stream_sinks(args, settings, stream_id, {**labels, "stream": stream_id}) as s:
            yield s.sinks

    async def main() -> int:
        server = WebServer(
            pool,
            info,
            open_sinks,
            sessions,
            deadline=args.deadline,
            allowed_hosts=args.allow_host,
            first_session=first,
            decoder=decoder,
            normalized=not args.no_normalize,
        )
        async with server:
            with _stop_on_signals(server.stop):
                await server.serve(
                    args.host, args.port, ssl_context=context, listening=_say_listening
                )
            print("streamvae web: stopping: ending every session", file=sys.stderr, flush=True)
        return _summary(args, server, choice.random)

    return _run_until_done(main())


def first_free_session(output_dir: str | Path) -> int:
    """The first session number whose ``web-N.latents`` no earlier run left in ``output_dir``
    (one past the highest there).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for name in ("web-1.latents", "web-7.latents", "door.latents"):
    ...         _ = (Path(folder) / name).write_bytes(b"")
    ...     first_free_session(folder)
    8
    """
    pattern = re.compile(re.escape(SESSION_PREFIX) + r"([0-9]+)\.latents")
    numbers = [
        int(found[1])
        for path in Path(output_dir).glob(f"{SESSION_PREFIX}*.latents")
        if (found := pattern.fullmatch(path.name))
    ]
    return max(numbers, default=0) + 1


def _say_listening(url: str) -> None:
    print(f"streamvae web: {_open_text(url)} (Ctrl-C to stop)", file=sys.stderr, flush=True)


def _open_text(url: str) -> str:
    """``open URL``, with a URL a browser opens: a wildcard bind (``0.0.0.0``, ``::``) is no
    address to browse to, so it becomes 127.0.0.1 here and this machine's name elsewhere."""
    parts = urlsplit(url)
    if parts.hostname not in ("0.0.0.0", "::"):
        return f"open {url}"
    port = f":{parts.port}" if parts.port else ""
    here = parts._replace(netloc=f"127.0.0.1{port}").geturl()
    there = parts._replace(netloc=f"{socket.gethostname()}{port}").geturl()
    return f"open {here} on this machine, or {there} from another (listening on all interfaces)"


def _summary(args: argparse.Namespace, server: WebServer, random: bool) -> int:
    summary: dict[str, Any] = {"sessions": {}, "meaningless": random}
    lines = []
    failed = False
    for sid, session in server.sessions.items():
        numbers = session.numbers()
        summary["sessions"][sid] = numbers
        failed |= session.output_lost()
        lines.append(
            f"{sid}: {numbers['frames_received']} frames received -> {numbers['latents']} "
            f"latents, {numbers['gaps']} gap(s), dropped {numbers['dropped_groups']} group(s), "
            f"{numbers['resets']} reset(s), {_latency_text(list(session.stats.latencies))}, "
            f"{numbers['state']}" + (f": {numbers['error']}" if numbers["error"] else "")
        )
    if server.forgotten:  # finished long ago: freed, their numbers were logged as they ended
        failed |= server.forgotten_lost_output > 0
        summary["earlier_sessions"] = {
            "count": server.forgotten,
            "output_lost": server.forgotten_lost_output,
        }
        lines.insert(
            0,
            f"{server.forgotten} earlier session(s) not listed (logged as they ended; "
            f"{server.forgotten_lost_output} lost output)",
        )
    if not lines:
        lines.append("no sessions")
    _print_summary(args, summary, lines)
    return 1 if failed else 0
