"""What a run's report says: the targets that apply to it, the terminal table, the plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CPU_TARGET_SIZE",
    "GPU_TARGET_SIZE",
    "check_targets",
    "format_peers",
    "format_report",
    "write_json",
    "write_plot",
]

# The targets of issues 5 and 6, stated where they apply (device, dtype, size, config).
CPU_TARGET_SIZE = (128, 128)
GPU_TARGET_SIZE = (480, 832)


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue targets that apply to this run, each with its value and whether it is met."""
    run = report["run"]
    vs = report["vs_diffusers"]
    # The CPU targets hold for both full models; the CUDA ones are stated for Wan 2.1.
    full = run["config"] in ("wan2.1", "wan2.2")
    wan21 = run["config"] == "wan2.1"
    size = tuple(run["size"])
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, at_least: bool) -> None:
        met = None if value is None else (value >= bound if at_least else value <= bound)
        sign = ">=" if at_least else "<="
        targets.append({"target": f"{name} {sign} {bound:g}", "value": value, "met": met})

    share = report["last_push_share"]
    add("last push share of a group", share, 0.5, at_least=False)
    sweep = report["memory_vs_length"]
    if sweep and sweep["streamvae_mb"]:
        values = [v for v in sweep["streamvae_mb"] if isinstance(v, (int, float))]
        # Flat: the longest stream costs at most 16 MB (or 10%: allocator noise) more than the
        # shortest one. All points are in the report.
        if len(values) >= 2:
            bound = max(16.0, 0.1 * values[0])
            add(
                "streamvae memory, longest minus shortest stream (MB)",
                round(values[-1] - values[0], 2),
                round(bound, 1),
                at_least=False,
            )
    if run["device"] == "cpu" and full and size == CPU_TARGET_SIZE:
        if run["dtype"] == "float32":
            add("float32 speedup vs diffusers float32 batch", vs.get("batch_speedup"), 1.3, True)
        else:
            add(
                f"{run['dtype']} speedup vs diffusers float32 batch",
                vs.get("batch_float32_speedup"),
                2.5,
                True,
            )
            add(f"{run['dtype']} error vs float32", report["error"]["vs_float32"], 3e-2, False)
    if (
        run["device"].startswith("cuda")
        and wan21
        and run["dtype"] == "bfloat16"
        and size == GPU_TARGET_SIZE
    ):
        add("frames/s, one stream", report["fps"], 200, True)
        add(
            "p99 latency after a group's last frame (ms)",
            report["latency_after_group_ms"]["p99"],
            10,
            False,
        )
        add("speedup vs diffusers bfloat16 batch", vs.get("batch_speedup"), 2, True)
    if run["dtype"] == "float32" and report["error"]["vs_diffusers"] is not None:
        add("float32 error vs diffusers", report["error"]["vs_diffusers"], 1e-5, False)
    if run["dtype"] == "float32" and report["error"].get("vs_official") is not None:
        add("float32 error vs Wan's official code", report["error"]["vs_official"], 1e-5, False)
    return targets


# -- output ----


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


_VS_TEXT = {
    "batch_speedup": "{v}x the frames/s of its {dtype} batch encode",
    "group_speedup": "{v}x the frames/s of its {dtype} group-by-group encode",
    "group_latency_ratio": "its group-by-group latency after a group's last frame {v}x streamvae's",
    "batch_float32_speedup": "{v}x the frames/s of its float32 batch encode",
}


def _vs_text(key: str, value: float, dtype: str) -> str:
    """One ``vs diffusers`` figure, saying against what (which encode, which dtype)."""
    return _VS_TEXT.get(key, key + " {v}x").format(v=value, dtype=dtype)


def format_report(report: dict[str, Any]) -> str:
    """The terminal table."""
    run = report["run"]
    lines = [
        f"streamvae bench: {run['config']} {run['dtype']} {run['size'][0]}x{run['size'][1]}, "
        f"{run['frames']} frames x {run['repeats']} repeats on {run['device']} "
        f"({run['device_name']}, {run['threads']} threads), {run['memory_format']}, "
        f"mode={run['mode']}",
        f"weights: {run['weights']}",
        f"norm kernels: {run.get('norm_kernels') or '-'}",
        f"load average before/after: {run['load_average_before'][0]:.2f} / "
        f"{run['load_average_after'][0]:.2f}",
        "",
        f"{'encoder':<26}{'clip s':>9}{'frames/s':>10}{'p50 ms':>10}{'p95 ms':>10}"
        f"{'p99 ms':>10}{'GFLOP/s':>10}",
    ]
    for name, entry in report["encoders"].items():
        latency = entry.get("latency_ms") or {}
        lines.append(
            f"{name:<26}{entry['clip_s']:>9.3f}{entry['fps']:>10.2f}{_ms(latency.get('p50')):>10}"
            f"{_ms(latency.get('p95')):>10}{_ms(latency.get('p99')):>10}"
            f"{_gflops(entry.get('achieved_flops')):>10}"
        )
    lines += ["", *format_peers(report["peers"])]
    vs = report["vs_diffusers"]
    dtype = report["run"]["dtype"]
    lines += [
        "",
        "streamvae: first latent {} ms (cold {} ms), last push share of a group {}, state {:.2f} MB".format(
            _ms(report["first_latent_ms"]),
            _ms(report["cold_first_latent_ms"]),
            report["last_push_share"],
            report["state_bytes"] / 2**20,
        ),
        "vs diffusers: " + ", ".join(_vs_text(k, v, dtype) for k, v in vs.items() if v is not None),
        "error: " + ", ".join(f"{k} {v:.2e}" for k, v in report["error"].items() if v is not None),
        "roofline: {} GFLOP/frame, streamvae {} GFLOP/s, device peak {} GFLOP/s "
        "(conv3d {}, matmul {})".format(
            f"{report['flops_per_frame'] / 1e9:.2f}",
            _gflops(report["achieved_flops"]),
            _gflops(report["peak_flops"]),
            _gflops(report["peak_flops_by_kernel"]["conv3d"]),
            _gflops(report["peak_flops_by_kernel"]["matmul"]),
        ),
        "peak memory MB (rss / cuda): "
        + ", ".join(
            f"{name} {values['rss']} / {values['cuda'] if values['cuda'] is not None else '-'}"
            for name, values in report["peak_memory_mb"].items()
        ),
    ]
    sweep = report["memory_vs_length"]
    if sweep:
        lines.append(
            f"memory vs stream length at {sweep['size'][0]}x{sweep['size'][1]} "
            f"({sweep['measure']}, MB): "
            + ", ".join(
                f"{n} frames: streamvae {s} / batch {b}"
                for n, s, b in zip(
                    sweep["lengths"], sweep["streamvae_mb"], sweep["diffusers_batch_mb"]
                )
            )
        )
    for live in report["live"]:
        latency = live["latency_ms"]
        lines.append(
            f"live {live['fps']:g} fps: p50 {_ms(latency['p50'])} ms, p99 {_ms(latency['p99'])} ms, "
            f"{live['dropped_groups']}/{live['groups']} groups dropped, "
            f"on time {live['on_time_fraction']}"
        )
    if report["targets"]:
        lines.append("")
        lines.append("targets:")
        for target in report["targets"]:
            mark = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
            value = target["value"]
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {target['target']:<58} {shown:>10}  {mark}")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def format_peers(peers: dict[str, dict[str, Any]]) -> list[str]:
    """streamvae and every peer: latency after a group's last frame (p50), frames/s, error
    against Wan's official code, and the peer's ratios to streamvae (or why it did not run)."""
    lines = [
        f"{'every peer, same weights and frames':<26}{'group p50 ms':>13}{'frames/s':>10}"
        f"{'err vs official':>16}{'latency x':>11}{'streamvae fps x':>16}"
    ]
    for name, row in peers.items():
        if row["status"] != "measured":
            lines.append(f"{name:<26}{row['status']}")
            continue
        error = row["error_vs_official"]
        shown = {
            "latency": row.get("latency_ratio"),
            "throughput": row.get("throughput_ratio"),
        }
        lines.append(
            f"{name:<26}{_ms(row['latency_after_group_ms']['p50']):>13}{row['fps']:>10.2f}"
            f"{'-' if error is None else f'{error:.2e}':>16}"
            f"{'-' if shown['latency'] is None else shown['latency']:>11}"
            f"{'-' if shown['throughput'] is None else shown['throughput']:>16}"
        )
    lines.append(
        "(group p50: from a group's last frame to its latent; latency x: the peer's over "
        "streamvae's; streamvae fps x: streamvae's frames/s over the peer's)"
    )
    return lines


def _plot_cdf(ax: Any, samples: Sequence[float], **style: Any) -> None:
    xs = np.sort(np.asarray(samples, dtype=np.float64))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(np.r_[xs[0], xs], np.r_[0.0, ys], where="post", **style)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Latency CDF per encoder (and live rate), memory against stream length, roofline bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    run = report["run"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for name, entry in report["encoders"].items():
        samples = entry.get("latency_samples_ms")
        if samples:
            _plot_cdf(ax, samples, label=name)
    for live in report["live"]:
        if live.get("latency_samples_ms"):
            _plot_cdf(
                ax,
                live["latency_samples_ms"],
                label=f"streamvae live {live['fps']:g} fps",
                linestyle="--",
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("latency after a latent's last frame (ms, log)")
    ax.set_ylabel("fraction of latents")
    ax.set_title("latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    sweep = report["memory_vs_length"]
    if sweep:
        lengths = sweep["lengths"]
        for key, label in (
            ("streamvae_mb", "streamvae"),
            ("diffusers_batch_mb", "diffusers batch"),
        ):
            values = [v if isinstance(v, (int, float)) else np.nan for v in sweep[key]]
            if not all(np.isnan(values)):
                ax.plot(lengths, values, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(bottom=0)
        ax.set_title(f"peak memory vs stream length ({sweep['size'][0]}x{sweep['size'][1]})")
        ax.set_ylabel("peak MB above the loaded model")
        ax.legend(fontsize=8)
    else:
        ax.set_title("memory vs stream length: not measured")
    ax.set_xlabel("frames")
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    names = list(report["encoders"])
    values = [report["encoders"][n]["achieved_flops"] / 1e9 for n in names]
    ax.barh(names, values, color="tab:blue")
    for kernel, value in report["peak_flops_by_kernel"].items():
        ax.axvline(
            value / 1e9,
            linestyle="--",
            color="tab:red" if kernel == "conv3d" else "k",
            label=f"measured {kernel} peak",
        )
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("GFLOP/s")
    ax.set_title("achieved vs measured device peak")
    ax.grid(True, axis="x", alpha=0.3)

    fig.suptitle(
        f"streamvae bench: {run['config']} {run['dtype']} {run['size'][0]}x{run['size'][1]} "
        f"on {run['device_name']} ({run['device']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """``report`` as indented JSON at ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
