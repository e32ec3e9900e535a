"""CUDA graphs of a stream's steps: capture each kind of step once, then replay it.

A stream's frames all have one size and its state lives in preallocated buffers, so every step
launches the same kernels on the same addresses; only the Python-side state (how many real
frames each causal conv remembers, what each temporal downsample holds) decides which kernels.
That state before a step, with the step's frame count, is the step's *signature*: in frame
mode a stream goes through a handful of signatures while it starts, then cycles through four
(one per frame of a group). A step whose signature is new runs eagerly (it also warms cuDNN
and cuBLAS up); the second time, it is captured into a :class:`torch.cuda.CUDAGraph`; from then
on it is replayed, and the Python-side state is set to what the step leaves behind.

Replays cost one launch instead of hundreds, which matters when the GPU's work per frame is a
few milliseconds. The latents are equal to eager stepping (the same kernels run).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

import torch

__all__ = ["StepGraphs"]

Signature = tuple[Hashable, ...]

# One capture at a time in the process: entering a capture empties the caching allocator's
# cache, which must not happen while another thread's capture is under way.
_CAPTURE_LOCK = threading.Lock()


class StepGraphs:
    """The captured steps of one stream (one :class:`~streamvae.model.EncoderState`).

    ``weights`` identifies the encoder's parameters (their addresses and dtype); if they change
    (the module was moved or cast), the graphs, which read the old addresses, are dropped.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.seen: set[Signature] = set()
        self.graphs: dict[Signature, tuple[torch.cuda.CUDAGraph, torch.Tensor | None, Signature]]
        self.graphs = {}
        self.weights: Hashable = None
        self._side_stream: torch.cuda.Stream | None = None

    def clear(self) -> None:
        self.seen.clear()
        self.graphs.clear()

    def run(
        self,
        key: Signature,
        weights: Hashable,
        step: Callable[[], torch.Tensor | None],
        signature: Callable[[], Signature],
        restore: Callable[[Signature], None],
    ) -> torch.Tensor | None:
        """Run ``step`` eagerly, capture it, or replay it, by ``key`` plus the state's signature."""
        if weights != self.weights:
            self.clear()
            self.weights = weights
        full = (key, signature())
        entry = self.graphs.get(full)
        if entry is not None:
            graph, out, after = entry
            graph.replay()
            restore(after)
            return None if out is None else out.clone()
        if full not in self.seen:
            self.seen.add(full)
            return step()
        graph = torch.cuda.CUDAGraph()
        with (
            _CAPTURE_LOCK,
            torch.cuda.graph(
                graph,
                pool=self.pool,
                stream=self._capture_stream(),
                capture_error_mode="thread_local",
            ),
        ):
            out = step()
        after = signature()
        self.graphs[full] = (graph, out, after)
        graph.replay()
        return None if out is None else out.clone()

    def _capture_stream(self) -> torch.cuda.Stream:
        """The current stream, unless it is the default one (which cannot capture)."""
        current = torch.cuda.current_stream(self.device)
        if current != torch.cuda.default_stream(self.device):
            return current
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        self._side_stream.wait_stream(current)
        return self._side_stream
