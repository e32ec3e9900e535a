"""Batch encode of one clip: streamvae against diffusers' AutoencoderKLWan, same weights, one process.

    python benchmarks/batch_vs_diffusers.py --frames 17 --size 64x64 --repeats 3

Random weights with the real 194 tensor names, converted for diffusers by its own
``convert_wan_vae_to_diffusers``; prints both times (best of ``repeats``), their ratio and the
relative error of the normalised latents.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import (
    diffusers_reference,
    random_video,
    random_wan_state_dict,
    rel_err,
    to_model_video,
)
from streamvae import WAN21, load_encoder


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = random_wan_state_dict(seed=0)
    reference = diffusers_reference(WAN21)
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(state)), strict=True)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / "Wan2.1_VAE.pth")
        encoder = load_encoder(Path(folder) / "Wan2.1_VAE.pth")
    video = to_model_video(random_video(args.frames, height, width, seed=1))
    mean = torch.tensor(WAN21.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = (reference.encode(video).latent_dist.mean - mean) / std
    got = encoder.encode(video)
    ours = best_time(lambda: encoder.encode(video), args.repeats)
    with torch.no_grad():
        theirs = best_time(lambda: reference.encode(video), args.repeats)
    print(
        json.dumps(
            {
                "clip": f"{args.frames}x{height}x{width}",
                "threads": torch.get_num_threads(),
                "streamvae_s": round(ours, 3),
                "diffusers_s": round(theirs, 3),
                "speedup": round(theirs / ours, 2),
                "rel_err": rel_err(got, expected),
            }
        )
    )


if __name__ == "__main__":
    main()
