"""Frame time of an encoder built directly (``WanEncoder(config)``) against ``random_encoder``'s.

    python benchmarks/direct_encoder.py [--sizes 64x64,128x128] [--repeats 3]

``WanEncoder(config)`` is a plain ``nn.Module``: its parameters require grad. ``load_encoder``
and ``random_encoder`` return encoders with ``requires_grad_(False)``. Both run every step under
``torch.inference_mode``; this measures whether they also run the same kernels. Full Wan 2.1,
float32, the same weights in both (the direct encoder's are copied into the other), frames pushed
one at a time, mean push time over frames 1..8 of a stream (two whole groups, every phase),
best of ``--repeats`` interleaved runs. "before" is the direct encoder under the rule
``PackedConv.applies`` had before issue 11 (refuse any parameter that requires grad),
reinstated for that measurement only, so before and after come from one run. Prints one line
per size with the ratios, and the conv ops the profiler sees in a direct encoder's first group.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Iterator

import numpy as np
import torch

from streamvae import WAN21, StreamEncoder, WanEncoder
from streamvae.model.kernels import PackedConv

__all__ = ["conv_ops", "frame_ms", "main", "old_rule"]


def frame_ms(encoder: WanEncoder, size: tuple[int, int], frames: int = 9) -> float:
    """Mean ms per push over frames 1..frames-1 of one fresh stream (frame 0 not counted)."""
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    stream = StreamEncoder(encoder)
    stream.push(clip[0])
    start = time.perf_counter()
    for frame in clip[1:]:
        stream.push(frame)
    return (time.perf_counter() - start) * 1000 / (frames - 1)


def conv_ops(encoder: WanEncoder, size: tuple[int, int]) -> dict[str, int]:
    """Convolution op names and counts of a stream's first five pushes (one whole group)."""
    from torch.profiler import ProfilerActivity, profile

    stream = StreamEncoder(encoder)
    frame = np.zeros((*size, 3), dtype=np.uint8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            stream.push(frame)
    counts: dict[str, int] = {}
    for event in prof.events():
        if "conv" in event.name:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


@contextlib.contextmanager
def old_rule() -> Iterator[None]:
    """``PackedConv.applies`` as it was: no oneDNN for parameters that require grad."""
    current = PackedConv.applies

    def applies(self: PackedConv, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return not (x.requires_grad or weight.requires_grad) and current(self, x, weight)

    PackedConv.applies = applies  # type: ignore[method-assign]
    try:
        yield
    finally:
        PackedConv.applies = current  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x64,128x128")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    direct = WanEncoder(WAN21).eval()  # parameters require grad, as any new nn.Module's
    loaded = copy.deepcopy(direct).requires_grad_(False)  # as load_encoder returns it
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    for size in sizes:
        best = {"before": float("inf"), "direct": float("inf"), "loaded": float("inf")}
        frame_ms(direct, size, frames=2)  # warm the packs
        frame_ms(loaded, size, frames=2)
        for _ in range(args.repeats):
            with old_rule():
                best["before"] = min(best["before"], frame_ms(direct, size))
            best["direct"] = min(best["direct"], frame_ms(direct, size))
            best["loaded"] = min(best["loaded"], frame_ms(loaded, size))
        print(
            f"{size[0]}x{size[1]} float32 ms/frame: direct WanEncoder before {best['before']:.1f}, "
            f"after {best['direct']:.1f} (before/after {best['before'] / best['direct']:.2f}x); "
            f"requires_grad_(False) {best['loaded']:.1f} "
            f"(direct after / it {best['direct'] / best['loaded']:.2f})"
        )
    print("conv ops of a direct encoder's first group:", conv_ops(direct, sizes[0]))


if __name__ == "__main__":
    main()
