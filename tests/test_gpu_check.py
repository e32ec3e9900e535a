"""``benchmarks/gpu_check.sh`` end to end on the CPU (``GPU_CHECK_SMOKE=1``), at tiny sizes.

A GPU is lent to few sessions and for minutes: the script must work the first time there.
This runs every step of it (the CUDA tests are collected and skipped here, each bench variant
runs with its real flags at a tiny size), then checks the progress lines, the summary and the
one-file bundle that the device tool brings back. The steps' GPU time limits are checked to
sum to under 7 minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

require("diffusers")
require("matplotlib")

BENCH_STEPS = (
    "bench_16x16_bf16",
    "bench_16x16_bf16_eager",
    "bench_16x16_bf16_contiguous",
    "bench_16x16_bf16_group",
    "bench_wan22_32x32_bf16",
    "bench_16x24_bf16",
)
OTHER_STEPS = (
    "pytest_cuda",
    "pool_bf16",
    "profile_16x16_bf16",
    "precision_16x16",
    "warmup_stall_16x16_bf16",
)
DECODE_STEP = "decode_16x16_bf16"


def test_the_steps_limits_sum_to_under_seven_minutes():
    """On the GPU every step has its own limit (``step``/``bench`` NAME LIMIT): their sum, and
    the default budget, stay under 420 s."""
    text = SCRIPT.read_text()
    limits = [
        int(match.group(1))
        for match in re.finditer(r"^(?:step|bench|bench22) \S+ (\d+) ", text, re.MULTILINE)
    ]
    assert len(limits) == 12, limits
    assert sum(limits) <= 420, (sum(limits), limits)
    assert "GPU_CHECK_BUDGET_S:-420}" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_gpu_check_smoke_runs_every_step_and_bundles_its_results(tmp_path):
    out, bundle = tmp_path / "gpu", tmp_path / "gpu_check.tar.gz"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SMOKE="1")
    for name in ("DEVICE", "SIZE", "SIZE_LARGE", "CONFIG", "SIZE22", "CONFIG22", "POOL_SIZES"):
        env.pop(name, None)
    env.pop("GPU_CHECK_BUDGET_S", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out), str(bundle)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    status = (out / "status.txt").read_text().splitlines()
    steps = {line.split(":")[0]: line for line in status if ": rc=" in line}
    assert set(steps) == {*BENCH_STEPS, *OTHER_STEPS, DECODE_STEP}, status
    assert all(": rc=0 " in line for line in steps.values()), status
    # A progress line per step as it ran (numbered), the benches' own progress, summary last.
    printed = done.stdout
    for i, name in enumerate(["pytest_cuda", "bench_16x16_bf16", "pool_bf16"], start=1):
        assert f"== [{i}/12] {name} (limit " in printed, printed[-3000:]
    assert "   bench [" in printed and "repeat 1/" in printed
    assert printed.index("== summary") > printed.index(f"{DECODE_STEP}: rc=")
    for name in BENCH_STEPS:
        report = json.loads((out / f"{name}.json").read_text())
        assert report["run"]["device"] == "cpu"
    for name in BENCH_STEPS[1:4] + BENCH_STEPS[5:]:  # the variants: streamvae alone
        report = json.loads((out / f"{name}.json").read_text())
        assert all(
            row["status"] != "measured" for n, row in report["peers"].items() if n != "streamvae"
        )
    assert (out / "bench_16x16_bf16.png").stat().st_size > 0

    profile = json.loads((out / "profile_16x16_bf16.json").read_text())
    assert profile["profile"]["time_per_frame_ms"] > 0 and profile["micro"]
    pool = json.loads((out / "pool_bf16.json").read_text())
    assert [row["streams"] for row in pool["streams"]] == [1, 2]
    assert all(row["speedup"] > 0 for row in pool["streams"])
    precision = json.loads((out / "precision_16x16.json").read_text())["precision"]
    assert [row["precision"] for row in precision] == ["float32", "tf32", "float16", "bfloat16"]
    assert json.loads((out / f"{DECODE_STEP}.json").read_text())
    stall = json.loads((out / "warmup_stall_16x16_bf16.json").read_text())["warmup_stall"]
    assert [row["join"] for row in stall] == ["alone", "warmed", "cold"]

    summary = (out / "summary.md").read_text()
    assert sum(line.startswith("| bench_") for line in summary.splitlines()) == len(BENCH_STEPS)
    assert "precision_16x16:" in summary and "bfloat16" in summary
    assert f"{DECODE_STEP}:" in summary and "warmup_stall_16x16_bf16:" in summary
    with tarfile.open(bundle) as archive:
        names = set(archive.getnames())
    assert {"gpu/summary.md", "gpu/status.txt", "gpu/environment.txt"} <= names
    assert {f"gpu/{name}.json" for name in BENCH_STEPS} <= names
    assert {"gpu/profile_16x16_bf16.json", "gpu/pool_bf16.json"} <= names
