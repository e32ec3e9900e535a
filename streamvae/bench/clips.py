"""The bench's frames: a deterministic synthetic clip, as uint8 frames and as a model video."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["frames_to_video", "synthetic_frame", "synthetic_frames"]


def synthetic_frame(index: int, height: int, width: int) -> np.ndarray:
    """A deterministic ``[H, W, 3]`` uint8 RGB frame: moving gradients plus per-frame noise."""
    ys = np.arange(height, dtype=np.int32)[:, None]
    xs = np.arange(width, dtype=np.int32)[None, :]
    noise = np.random.default_rng(index).integers(0, 32, (height, width, 3), dtype=np.int32)
    frame = np.empty((height, width, 3), dtype=np.int32)
    frame[..., 0] = xs * 2 + index * 5
    frame[..., 1] = ys * 2 + index * 3
    frame[..., 2] = (xs + ys) + index * 7
    return ((frame + noise) % 256).astype(np.uint8)


def synthetic_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    return [synthetic_frame(i, height, width) for i in range(count)]


def frames_to_video(
    frames: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` frames -> ``[1, 3, T, H, W]`` in [-1, 1], as the stream converts them."""
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None]
    return (video.float() / 127.5 - 1.0).to(device=device, dtype=dtype)
