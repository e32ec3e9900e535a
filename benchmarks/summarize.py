"""Markdown table of ``streamvae bench --json`` reports, one row per report.

python benchmarks/summarize.py out/*.json > out/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["row", "summarize"]

COLUMNS = (
    "report",
    "device",
    "dtype",
    "size",
    "frames",
    "layout / mode / graphs",
    "fps",
    "p50 / p99 ms after a group",
    "first ms",
    "last push share",
    "x diffusers batch",
    "x diffusers group",
    "x diffusers f32",
    "error",
    "GFLOP/s (peak)",
    "targets met",
)


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def row(name: str, report: dict[str, Any]) -> list[str]:
    """One table row of a bench report."""
    run = report["run"]
    vs = report["vs_diffusers"]
    # After a group's last frame (latent 0 left out), as the bench's peer table and targets.
    latency = report.get("latency_after_group_ms") or report["latency_ms"]
    error = report["error"]
    shown_error = (
        error.get("vs_float32") if run["dtype"] != "float32" else error.get("vs_diffusers")
    )
    graphs = {True: "graphs", False: "eager", None: "-"}[run.get("cuda_graphs")]
    targets = report.get("targets", [])
    met = sum(1 for t in targets if t["met"])
    return [
        name,
        f"{run['device_name']}",
        run["dtype"],
        f"{run['size'][0]}x{run['size'][1]}",
        str(run["frames"]),
        f"{run['memory_format']} / {run['mode']} / {graphs}",
        _num(report["fps"]),
        f"{_num(latency['p50'], 1)} / {_num(latency['p99'], 1)}",
        _num(report["first_latent_ms"], 1),
        _num(report["last_push_share"], 3),
        _num(vs.get("batch_speedup")),
        _num(vs.get("group_speedup")),
        _num(vs.get("batch_float32_speedup")),
        "-" if shown_error is None else f"{shown_error:.1e}",
        f"{report['achieved_flops'] / 1e9:,.0f} ({report['peak_flops'] / 1e9:,.0f})",
        f"{met}/{len(targets)}",
    ]


def summarize(paths: list[Path]) -> str:
    """The table for the reports at ``paths`` (unreadable ones are listed below it)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    problems = []
    for path in paths:
        try:
            report = json.loads(path.read_text())
            lines.append("| " + " | ".join(row(path.stem, report)) + " |")
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"- {path}: {error}")
    return "\n".join(lines + (["", *problems] if problems else []))


if __name__ == "__main__":
    print(summarize([Path(p) for p in sys.argv[1:]]))
