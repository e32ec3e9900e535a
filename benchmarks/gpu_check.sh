#!/usr/bin/env bash
# The GPU check: CUDA tests, `streamvae bench` for the targets (480x832 bfloat16), many
# streams through one pool, a kernel profile, the bench variants that decide the GPU defaults,
# Wan 2.2 at 704x1280 bfloat16, float32, then 720x1280 if time is left. Under 8 minutes on one
# H100. Everything lands in OUTDIR: logs, JSON, PNG, summary.md.
#
#   bash benchmarks/gpu_check.sh OUTDIR [BUNDLE.tar.gz]
#
# BUNDLE: OUTDIR packed into one file, refreshed after every step (the device tool returns at
# most 8 files, so this is what to ask back). On a lent GPU, from this machine:
#   bash benchmarks/gpu_wheels.sh            # once: the wheels the GPU image lacks, into .whl/
#   device run, carry [".whl"], timeout_s 540:
#       bash benchmarks/gpu_check.sh /tmp/gpu $OUT/gpu_check.tar.gz
# Wheels found in .whl/ are installed first (pip --no-index --target, put on PYTHONPATH).
#
# Environment:
#   WEIGHTS=path        real Wan 2.1 VAE weights (default: --random-weights; speed does not
#                       depend on the values, errors are relative to the same weights)
#   GPU_CHECK_BUDGET_S  seconds for all steps together (default 450; a step that would start
#                       with less than its own limit left is skipped and listed as skipped)
#   PYTHON              interpreter (default python3)
#   WEIGHTS22=path      real Wan 2.2 VAE weights for the Wan 2.2 step (default: random)
#   DEVICE, SIZE, SIZE_LARGE, CONFIG, SIZE22, CONFIG22, POOL_SIZES
#                       cuda, 480x832, 720x1280, wan2.1, 704x1280 (TI2V-5B's 720p), wan2.2,
#                       "240x416,SIZE" by default; a smoke test of this script without a GPU:
#                       DEVICE=cpu SIZE=32x32 SIZE_LARGE=32x48 CONFIG=narrow8 SIZE22=32x32
#                       CONFIG22=wan2.2-narrow8 POOL_SIZES=32x32
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [BUNDLE.tar.gz]}
BUNDLE=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-480x832}
SIZE_LARGE=${SIZE_LARGE:-720x1280}
CONFIG=${CONFIG:-wan2.1}
SIZE22=${SIZE22:-704x1280}
CONFIG22=${CONFIG22:-wan2.2}
POOL_SIZES=${POOL_SIZES:-240x416,$SIZE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
START=$(date +%s)
STATUS="$OUT/status.txt"
: >"$STATUS"

# Wheels carried for a machine without a package index (benchmarks/gpu_wheels.sh).
SITE=""
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/streamvae-site.XXXXXX)
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$REPO"/.whl/*.whl >"$OUT/wheels.log" 2>&1; then
        echo "wheels: installed $(ls "$REPO"/.whl/*.whl | wc -l) from .whl" | tee -a "$STATUS"
    else
        echo "wheels: install failed (see wheels.log)" | tee -a "$STATUS"
        SITE=""
    fi
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# Pack OUTDIR into BUNDLE (atomically: a half-written bundle never replaces a whole one).
bundle() {
    [[ -n "$BUNDLE" ]] || return 0
    tar -czf "$BUNDLE.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$BUNDLE.part" "$BUNDLE"
}

if [[ -n "${WEIGHTS:-}" ]]; then
    MODEL=(--weights "$WEIGHTS")
else
    MODEL=(--random-weights --config "$CONFIG")
fi
if [[ -n "${WEIGHTS22:-}" ]]; then
    MODEL22=(--weights "$WEIGHTS22")
else
    MODEL22=(--random-weights --config "$CONFIG22")
fi

elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT_S COMMAND...: run with a time limit if the budget allows; log and record.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed)))
    if ((left < limit)); then
        echo "$name: skipped (${left}s of the budget left, needs ${limit}s)" | tee -a "$STATUS"
        return 0
    fi
    echo "== $name (limit ${limit}s, $(elapsed)s elapsed)"
    local began
    began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - began))s" | tee -a "$STATUS"
    tail -n 25 "$OUT/$name.log"
    bundle
    return 0
}

bench() { # bench NAME LIMIT_S ARGS... (the model: MODEL, or MODEL22 in bench22)
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PYTHON" -m streamvae.cli bench "${MODEL[@]}" --device "$DEVICE" \
        --json "$OUT/$name.json" --plot "$OUT/$name.png" "$@"
}

bench22() {
    local saved=("${MODEL[@]}")
    MODEL=("${MODEL22[@]}")
    bench "$@"
    MODEL=("${saved[@]}")
}

{
    nvidia-smi || true
    "$PYTHON" - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for module in ("numpy", "einops", "safetensors", "cv2", "diffusers", "matplotlib", "psutil",
               "pytest", "pytest_asyncio", "hypothesis", "aiomqtt"):
    try:
        imported = __import__(module)
    except ImportError as error:
        print("MISSING", module, f"({error}; bash benchmarks/gpu_wheels.sh, carry .whl)")
    else:
        print(module, getattr(imported, "__version__", "?"))
EOF
} 2>&1 | tee "$OUT/environment.txt"

# 1. The CUDA tests: exactness on the GPU, own CUDA stream per encoder, CUDA graphs.
#    A module that cannot be imported there must not take the CUDA tests down with it; the
#    image's own pytest plugins are not loaded (only pytest-asyncio, which pyproject asks for).
PLUGINS=()
if "$PYTHON" -c "import pytest_asyncio" 2>/dev/null; then
    PLUGINS=(-p pytest_asyncio.plugin)
fi
step pytest_cuda 150 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PYTHON" -m pytest \
    ${PLUGINS[@]+"${PLUGINS[@]}"} -m cuda tests -q -rfEs -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/pytest_cuda.xml"

# If the CUDA graph tests failed, a capture failure would take every bench run down with it:
# then the benches run eagerly (and say so in status.txt).
if [[ -s "$OUT/pytest_cuda.xml" ]] && ! "$PYTHON" - "$OUT/pytest_cuda.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
failed = [
    case.get("name")
    for case in cases
    if "cuda_graph" in (case.get("name") or "")
    and (case.find("failure") is not None or case.find("error") is not None)
]
sys.exit(1 if failed else 0)
EOF
then
    MODEL+=(--no-cuda-graphs)
    MODEL22+=(--no-cuda-graphs)
    echo "benches: without CUDA graphs (a CUDA graph test failed)" | tee -a "$STATUS"
fi

# 2. The targets' configuration: 480x832 bfloat16, frame mode, CUDA graphs, default layout;
#    33 frames (8 groups) per clip so that steady-state steps are measured; everything
#    (peers, live mode, memory against stream length in fresh processes).
bench bench_${SIZE}_bf16 200 --dtype bfloat16 --size "$SIZE" --frames 33

# 2b. Many streams through one StreamPool against as many separate StreamEncoders: 1, 2, 4, 8
#     aligned streams at 240x416 and 480x832, bfloat16, CUDA graphs (one replay per batch),
#     with the device time of each stage at each batch (streamvae/bench/pool.py).
step pool_bf16 90 "$PYTHON" -m streamvae.cli bench "${MODEL[@]}" --device "$DEVICE" \
    --dtype bfloat16 --streams 1,2,4,8 --pool-sizes "$POOL_SIZES" --ticks 8 --repeats 2 \
    --stage-times --json "$OUT/pool_bf16.json"

# 3. Where the step time goes: device time by kernel over two groups, and the widest layer's
#    norm (fused / eager), window shift and conv per layout (benchmarks/gpu_profile.py).
step profile_${SIZE}_bf16 60 "$PYTHON" benchmarks/gpu_profile.py --device "$DEVICE" \
    --dtype bfloat16 --size "$SIZE" --config "$CONFIG" --json "$OUT/profile_${SIZE}_bf16.json"

# 4. The variants that decide the GPU defaults: no graphs, contiguous state (the default in
#    half precision on CUDA is channels-last), group mode.
QUICK=(--dtype bfloat16 --size "$SIZE" --frames 33 --repeats 5 --fps 0 --lengths 0)
bench bench_${SIZE}_bf16_eager 45 "${QUICK[@]}" --no-cuda-graphs
bench bench_${SIZE}_bf16_contiguous 45 "${QUICK[@]}" --memory-format contiguous
bench bench_${SIZE}_bf16_group 45 "${QUICK[@]}" --mode group

# 5. The Wan 2.2 VAE (z 48, stride 16) at TI2V-5B's 704x1280 in bfloat16: 17 frames (4 groups),
#    against diffusers bfloat16 on the same weights; no live mode or memory sweep.
bench22 bench_wan22_${SIZE22}_bf16 60 --dtype bfloat16 --size "$SIZE22" --frames 17 \
    --repeats 5 --fps 0 --lengths 0

# 6. float32 (true float32: TF32 off), without live mode and memory sweep.
bench bench_${SIZE}_fp32 90 --dtype float32 --size "$SIZE" --frames 33 --repeats 5 \
    --fps 0 --lengths 0

# 7. 720x1280 when time allows.
bench bench_${SIZE_LARGE}_bf16 60 --dtype bfloat16 --size "$SIZE_LARGE" --frames 17 --repeats 5 \
    --fps 0 --lengths 0

"$PYTHON" benchmarks/summarize.py "$OUT"/bench_*.json >"$OUT/summary.md" 2>&1 || true
bundle
echo "== summary ($(elapsed)s in all)"
cat "$OUT/summary.md" "$STATUS"
