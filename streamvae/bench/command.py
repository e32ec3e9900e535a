"""``streamvae bench``: latency, throughput, memory and roofline of streaming encode, against its peers.

The argparse subcommand and what it runs: one stream against its peers
(:func:`streamvae.bench.run.run_bench`), or many streams and sizes (``--streams`` / ``--sweep``,
:mod:`streamvae.bench.pool`). See :mod:`streamvae.bench` for what is measured and how.

    streamvae bench --random-weights --device cpu --size 128x128 --frames 9 \\
        --json out/bench.json --plot out/bench.png
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from streamvae.bench.options import (
    DEFAULT_LENGTHS,
    DEFAULT_LIVE_FPS,
    MEMORY_FORMATS,
    BenchOptions,
    parse_counts,
    parse_lengths,
    parse_numbers,
    parse_size,
)
from streamvae.bench.pool import (
    PHASES,
    bench_streams,
    bench_sweep,
    format_breakdown,
    format_stages,
    format_streams,
    format_sweep,
    stage_times,
    start_ticks,
)
from streamvae.bench.precision import PRECISIONS, bench_precision, format_precision
from streamvae.bench.report import format_report, write_json, write_plot
from streamvae.bench.run import run_bench
from streamvae.bench.stall import bench_warmup_stall, format_stall
from streamvae.model import WanEncoder
from streamvae.model_args import DTYPES, add_model_arguments, model_from_args
from streamvae.usage import check_output_file, positive_int, usage_error

__all__ = ["add_bench_command", "add_pool_arguments", "bench_command", "pool_bench_command"]


def add_bench_command(subparsers: Any, **parser_options: Any) -> None:
    """Add ``streamvae bench`` to the CLI's subcommands (``parser_options``: more
    ``add_parser`` options, e.g. ``prog``)."""
    parser = subparsers.add_parser(
        "bench",
        help="latency, throughput, memory and roofline against every peer",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **parser_options,
    )
    add_model_arguments(parser)
    parser.add_argument("--size", type=parse_size, default="128x128", help="HxW")
    parser.add_argument("--frames", type=positive_int, default=9, help="frames per clip")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed passes per encoder (CPU 3, CUDA 10)",
    )
    parser.add_argument(
        "--fps",
        type=parse_numbers,
        default=",".join(str(v) for v in DEFAULT_LIVE_FPS),
        help="live mode rates, comma-separated; 0 skips live mode",
    )
    parser.add_argument(
        "--live-frames",
        type=positive_int,
        default=None,
        help="frames per live run (max(frames, 33))",
    )
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=",".join(str(v) for v in DEFAULT_LENGTHS),
        help="stream lengths for memory vs length, comma-separated; 0 skips it",
    )
    parser.add_argument(
        "--memory-size",
        type=parse_size,
        default=None,
        help="frame size for memory vs length (CPU 32x32, CUDA: --size; --decode: one latent)",
    )
    parser.add_argument(
        "--mode",
        choices=["frame", "group"],
        default="frame",
        help="streamvae's step: frame (one frame a push) or group (four frames a push)",
    )
    parser.add_argument(
        "--memory-format",
        choices=["auto", *MEMORY_FORMATS],
        default="auto",
        help="state layout (auto: the device's default)",
    )
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the peers (diffusers, Wan's official code, StreamDiffusionV2)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (float32 runs)")
    parser.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="on CUDA, cuDNN's default algorithms instead of the fastest measured per shape",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, launch every step's kernels instead of replaying captured CUDA graphs",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="bench the decoder instead: streamvae's against diffusers', Wan's and "
        "StreamDiffusionV2's decode (--size, --frames, --repeats, --no-peers, --json, "
        "--memory-latents, --memory-size)",
    )
    parser.add_argument(
        "--memory-latents",
        type=parse_lengths,
        default="100,1000",
        help="with --decode: stream lengths (latents) at which one stream's memory is read, "
        "comma-separated, at --memory-size (with --decode, unless given: one latent, 8x8 "
        "pixels for Wan 2.1); 0 skips it",
    )
    parser.add_argument(
        "--precision",
        nargs="?",
        const=",".join(PRECISIONS),
        default=None,
        metavar="LIST",
        help="precision mode: one stream in each of float32 (TF32 off), tf32, float16, "
        "bfloat16 (or LIST, comma-separated) at --size: frames/s and error against float32, "
        "global and per latent channel (--frames, --repeats, --json)",
    )
    parser.add_argument(
        "--warmup-stall",
        nargs="?",
        type=float,
        const=30.0,
        default=None,
        metavar="FPS",
        help="what a starting stream costs a live one: a stream fed at FPS frames/s (30 unless "
        "given) alone, then while another joins warmed up and cold, at --size; its latency, "
        "the stall, the other's warm-up (--live-frames, --json)",
    )
    add_pool_arguments(parser)  # --streams, --phases, --ticks, --sweep
    parser.set_defaults(run=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    """Run ``streamvae bench`` from parsed arguments."""
    # Outputs and names are checked before a run that may take many minutes.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, option)
    for phase in (p for p in getattr(args, "phases", "").split(",") if p):
        try:
            start_ticks(1, phase)
        except ValueError as exc:
            usage_error(f"--phases {args.phases}: {exc}")
    if getattr(args, "decode", False):
        from streamvae.bench.decode import decode_bench_command

        return decode_bench_command(args)
    dtype = DTYPES[args.dtype]
    args32 = copy.copy(args)
    args32.dtype = "float32"
    choice = model_from_args(args32)
    reference = None
    encoder = choice.encoder
    if dtype != torch.float32:
        reference = encoder
        encoder = copy.deepcopy(reference).to(dtype)
    if getattr(args, "streams", None) or getattr(args, "sweep", None):
        return pool_bench_command(args, encoder)
    if getattr(args, "precision", None):
        return precision_command(args, choice.encoder)
    if getattr(args, "warmup_stall", None) is not None:
        return stall_command(args, encoder)
    cuda = encoder.device.type == "cuda"
    options = BenchOptions(
        size=args.size,
        frames=args.frames,
        repeats=args.repeats or (10 if cuda else 3),
        live_fps=tuple(args.fps),
        live_frames=args.live_frames or max(args.frames, 33),
        lengths=args.lengths,
        memory_size=args.memory_size or (args.size if cuda else (32, 32)),
        mode=args.mode,
        memory_format=args.memory_format,
        peers=not args.no_peers,
        tf32=args.tf32,
        cuda_graphs=not args.no_cuda_graphs,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        label=choice.label,
        command="streamvae " + " ".join(sys.argv[1:]) if sys.argv else "",
    )
    if options.frames < 1 + encoder.config.temporal_stride:
        usage_error(
            f"--frames {options.frames}: at least {1 + encoder.config.temporal_stride} "
            "(frame 0 and one group)"
        )
    for flag, size in (("--size", options.size), ("--memory-size", options.memory_size)):
        problem = encoder.config.size_error(*size)
        if problem is not None:
            usage_error(f"{flag} {size[0]}x{size[1]}: {problem}")
    report = run_bench(encoder, options, reference)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def precision_command(args: argparse.Namespace, reference: WanEncoder) -> int:
    """``--precision``: the table of :mod:`streamvae.bench.precision`; ``--json`` writes it."""
    names = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown or not names:
        usage_error(f"--precision {args.precision}: choose from {', '.join(PRECISIONS)}")
    problem = reference.config.size_error(*args.size)
    if problem is not None:
        usage_error(f"--size {args.size[0]}x{args.size[1]}: {problem}")
    cuda = reference.device.type == "cuda"
    rows = bench_precision(
        reference,
        args.size,
        args.frames,
        args.repeats or (5 if cuda else 2),
        precisions=names,
        cuda_graphs=cuda and not args.no_cuda_graphs,
    )
    print(format_precision(rows), flush=True)
    if args.json:
        report = {
            "device": str(reference.device),
            "config": reference.config.name,
            "size": list(args.size),
            "frames": args.frames,
            "precision": rows,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def stall_command(args: argparse.Namespace, encoder: WanEncoder) -> int:
    """``--warmup-stall``: the table of :mod:`streamvae.bench.stall`; ``--json`` writes it."""
    if not args.warmup_stall > 0:
        usage_error(f"--warmup-stall {args.warmup_stall:g}: frames/s > 0")
    problem = encoder.config.size_error(*args.size)
    if problem is not None:
        usage_error(f"--size {args.size[0]}x{args.size[1]}: {problem}")
    frames = args.live_frames or max(args.frames, 33)
    rows = bench_warmup_stall(
        encoder,
        args.size,
        args.warmup_stall,
        frames,
        cuda_graphs=not args.no_cuda_graphs,
    )
    print(format_stall(rows), flush=True)
    if args.json:
        report = {
            "device": str(encoder.device),
            "dtype": str(encoder.dtype).removeprefix("torch."),
            "config": encoder.config.name,
            "size": list(args.size),
            "warmup_stall": [
                asdict(row) | {"within_one_frame": row.within_one_frame} for row in rows
            ],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """``--streams``, ``--phases``, ``--ticks``, ``--sweep`` of ``streamvae bench``."""
    parser.add_argument(
        "--streams",
        type=parse_counts,
        default=None,
        help="many streams: stream counts, comma-separated (e.g. 1,2,4,8): pool vs separate encoders",
    )
    parser.add_argument(
        "--phases",
        default="aligned",
        help=f"with --streams: phase schedules, comma-separated, of {', '.join(PHASES)}",
    )
    parser.add_argument("--ticks", type=positive_int, default=8, help="with --streams: timed ticks")
    parser.add_argument(
        "--pool-sizes",
        type=lambda text: [parse_size(v) for v in text.split(",")],
        default=None,
        help="with --streams: frame sizes, comma-separated (default: --size)",
    )
    parser.add_argument(
        "--reference-size",
        type=parse_size,
        default=None,
        help="with --streams: also one stream at this size, for throughput per pixel (e.g. 128x128)",
    )
    parser.add_argument(
        "--stage-times",
        action="store_true",
        help="with --streams: time per stage of the encoder at each stream count (aligned)",
    )
    parser.add_argument(
        "--sweep",
        type=lambda text: [parse_size(v) for v in text.split(",")],
        default=None,
        help="single-stream GFLOP/s at these sizes, comma-separated (e.g. 32x32,64x64)",
    )


def pool_bench_command(args: argparse.Namespace, encoder: WanEncoder) -> int:
    """Run ``--streams`` and/or ``--sweep``; print markdown tables; ``--json`` writes them."""
    repeats = args.repeats or 3
    report: dict[str, Any] = {
        "device": str(encoder.device),
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "config": encoder.config.name,
        "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.streams:
        phases = [p for p in args.phases.split(",") if p]  # names checked by bench_command
        graphs = encoder.device.type == "cuda" and not getattr(args, "no_cuda_graphs", False)
        common = {"ticks": args.ticks, "repeats": repeats, "cuda_graphs": graphs}
        report["cuda_graphs"] = graphs
        results = []
        for size in args.pool_sizes or [args.size]:
            results += bench_streams(encoder, size, args.streams, phases=phases, **common)
        if args.reference_size:
            results += bench_streams(encoder, args.reference_size, [1], **common)
        print(format_streams(results), flush=True)
        print("where the pool's tick goes (ms per tick):", flush=True)
        print(format_breakdown(results), flush=True)
        if args.stage_times:
            report["stage_times_ms"] = {}
            for size in args.pool_sizes or [args.size]:
                rows = {n: stage_times(encoder, size, n, ticks=args.ticks) for n in args.streams}
                print(f"stage times per tick at {size[0]}x{size[1]}:", flush=True)
                print(format_stages(rows), flush=True)
                report["stage_times_ms"][f"{size[0]}x{size[1]}"] = rows
        report["streams"] = [
            asdict(r) | {"speedup": r.speedup, "pixels_per_s": r.pixels_per_s()} for r in results
        ]
    if args.sweep:
        sweep = bench_sweep(encoder, args.sweep, repeats=repeats)
        print(format_sweep(sweep), flush=True)
        report["sweep"] = [asdict(r) for r in sweep]
    if args.json:
        write_json(Path(args.json), report)
    return 0
