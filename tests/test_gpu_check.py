"""``benchmarks/gpu_check.sh`` end to end on the CPU, at a tiny size.

A GPU is lent to few sessions and for minutes: the script must work the first time there.
This runs every step of it (the CUDA tests are collected and skipped here, each bench variant
runs with its real flags), then checks the summary and the one-file bundle that the device
tool brings back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import require

ROOT = Path(__file__).resolve().parents[1]

require("diffusers")
require("matplotlib")

BENCH_STEPS = (
    "bench_16x16_bf16",
    "bench_16x16_fp32",
    "bench_16x16_bf16_contiguous",
    "bench_16x16_bf16_group",
    "bench_16x16_bf16_eager",
    "bench_16x24_bf16",
    "bench_wan22_32x32_bf16",
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_gpu_check_runs_every_step_and_bundles_its_results(tmp_path):
    out, bundle = tmp_path / "gpu", tmp_path / "gpu_check.tar.gz"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DEVICE="cpu",
        SIZE="16x16",
        SIZE_LARGE="16x24",
        CONFIG="narrow8",
        SIZE22="32x32",
        CONFIG22="wan2.2-narrow8",
        POOL_SIZES="16x16",
        GPU_CHECK_BUDGET_S="400",
    )
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), str(bundle)],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    status = (out / "status.txt").read_text().splitlines()
    steps = {line.split(":")[0]: line for line in status if ": rc=" in line}
    assert set(steps) == {"pytest_cuda", "profile_16x16_bf16", "pool_bf16", *BENCH_STEPS}, status
    assert all(": rc=0 " in line for line in steps.values()), status
    for name in BENCH_STEPS:
        report = json.loads((out / f"{name}.json").read_text())
        assert report["run"]["device"] == "cpu"
        assert (out / f"{name}.png").stat().st_size > 0

    profile = json.loads((out / "profile_16x16_bf16.json").read_text())
    assert profile["profile"]["time_per_frame_ms"] > 0 and profile["micro"]

    pool = json.loads((out / "pool_bf16.json").read_text())
    assert [row["streams"] for row in pool["streams"]] == [1, 2, 4, 8]
    assert all(row["speedup"] > 0 for row in pool["streams"])
    assert set(pool["stage_times_ms"]["16x16"]) == {"1", "2", "4", "8"}

    summary = (out / "summary.md").read_text()
    assert sum(line.startswith("| bench_") for line in summary.splitlines()) == len(BENCH_STEPS)
    with tarfile.open(bundle) as archive:
        names = set(archive.getnames())
    assert {"gpu/summary.md", "gpu/status.txt", "gpu/environment.txt"} <= names
    assert {f"gpu/{name}.json" for name in BENCH_STEPS} <= names
    assert {"gpu/profile_16x16_bf16.json", "gpu/pool_bf16.json"} <= names
