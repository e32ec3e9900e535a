"""The harness behind ``streamvae bench``: latency, throughput, memory and roofline of streaming
encode, against every peer, in one run.

One run, with the same weights, device, dtype and frames for every encoder:

1. **streamvae**: a :class:`~streamvae.stream.StreamEncoder` fed uint8 frames one push at a time.
   Per-latent latency is the time from the push of the last frame a latent needs to that latent
   being on the host; the device is idle before each push (on CUDA each push is followed by a
   synchronisation), so the latency is not inflated by queued work. First-latent latency, the
   share of a group's push time spent in its last push, and sustained frames/s (frames pushed
   back to back, from the first push to the last latent on the host) come from the same runs.
2. **Peers**, on a float video already on the device (which favours them), each holding the
   same weights (mapped from streamvae's state dict: diffusers' names by its converter's map,
   Wan's own ``.pth`` names for the official and StreamDiffusionV2 code):

   - ``diffusers_batch``: diffusers' ``AutoencoderKLWan.encode`` over the whole clip;
   - ``diffusers_group``: diffusers driven group by group with its own cache (chunks of 1, 4,
     4, ... frames through ``vae.encoder(chunk, feat_cache=..., feat_idx=[0])`` and
     ``quant_conv``, as its ``_encode`` does: what a diffusers user would write to stream);
   - ``official_wan``: Wan's own ``WanVAE_.encode`` (``wan/modules/vae2_1.py``, or ``vae2_2.py``
     for Wan 2.2, from PyPI ``wan22``), the reference every error is measured against;
   - ``streamdiffusionv2``: StreamDiffusionV2's ``WanVAE_.stream_encode`` (PyPI
     ``streamdiffusionv2``, ``models/wan/wan_base/modules/vae.py``), the streaming encoder of
     its real-time pipeline: its first call takes frame 0 plus four frames, then four a call.

   The official and StreamDiffusionV2 files are loaded by path (they need only torch and
   einops; their packages are installed ``--no-deps``). A peer whose package is missing is
   reported as not installed. Each peer's *latency after a group's last frame* is what a user
   waits once the last frame of a group (frames 1-4, 5-8, ...) has arrived: for streamvae the
   push of that frame, for a peer that encodes a group per call the whole call, for a batch
   encoder the whole clip. In a lower precision, diffusers in float32 runs too on the CPU
   (``diffusers_batch_float32``): the CPU target is stated against it.
3. **Memory against stream length**: peak memory while encoding 17, 65, 257 frames (at a small
   size on the CPU), streamvae against the batch encoder holding its clip.
4. **Live mode**: what ``streamvae live`` runs (:mod:`streamvae.bench.live`): a paced
   ``synthetic://`` source at 16, 24, 30 frames/s through ``encode_to_sinks`` into a sink that
   records latency from a group's last frame's capture to its latent; whole groups dropped by
   the source's own rule when the encoder cannot keep up.
5. **Roofline**: FLOPs per frame counted with :class:`torch.utils.flop_counter.FlopCounterMode`
   on the meta device, achieved FLOP/s of each encoder, and the device's own peak measured in
   the same run (a large conv3d and a large matmul in the same dtype).

Timing: wall clock around synchronised work (``torch.cuda.synchronize`` on CUDA), plus CUDA
events for the peers' device time; every encoder is warmed up first (on CUDA twice: the second
pass captures the CUDA graphs) and the repeats are interleaved (streamvae, batch, group,
streamvae, ...) so that load from other processes hits all of them alike. Times are medians
over the repeats. On CUDA, TF32 is off unless ``--tf32`` (float32 means float32) and cuDNN picks
its fastest algorithm per shape (``--no-cudnn-benchmark`` to not). Memory is, on CUDA,
``max_memory_allocated`` above the level before the run and, on every device, the process RSS
above its level before the run (the kernel's high-water mark, reset at the start).

    streamvae bench --random-weights --device cpu --size 128x128 --frames 9 \\
        --json out/bench.json --plot out/bench.png

Modules: :mod:`~streamvae.bench.options` (what a run measures), :mod:`~streamvae.bench.clips`
(its frames), :mod:`~streamvae.bench.timing` (clocks, statistics), :mod:`~streamvae.bench.peers`
(streamvae's driver and the peers), :mod:`~streamvae.bench.probes` (memory),
:mod:`~streamvae.bench.flops` (FLOPs, device peak), :mod:`~streamvae.bench.live` (live mode),
:mod:`~streamvae.bench.run` (the run), :mod:`~streamvae.bench.report` (targets, table, plots),
:mod:`~streamvae.bench.pool` (many streams, ``--streams`` / ``--sweep``),
:mod:`~streamvae.bench.precision` (``--precision``), :mod:`~streamvae.bench.decode`
(``--decode``), :mod:`~streamvae.bench.stall` (what a starting stream costs a live one,
``--warmup-stall``) and
:mod:`~streamvae.bench.command` (the CLI subcommand, imported by :mod:`streamvae.cli` only).
"""

from __future__ import annotations

from streamvae.bench.clips import frames_to_video, synthetic_frame, synthetic_frames
from streamvae.bench.flops import count_flops, diffusers_flops, measure_peak_flops, streamvae_flops
from streamvae.bench.options import BenchOptions, parse_numbers, parse_size
from streamvae.bench.peers import (
    DiffusersPeer,
    OfficialWanPeer,
    PeerUnavailable,
    StreamDiffusionV2Peer,
    run_stream,
)
from streamvae.bench.probes import track_memory
from streamvae.bench.run import run_bench
from streamvae.bench.timing import Clock, percentiles_ms, rel_err

__all__ = [
    "BenchOptions",
    "Clock",
    "DiffusersPeer",
    "OfficialWanPeer",
    "PeerUnavailable",
    "StreamDiffusionV2Peer",
    "count_flops",
    "diffusers_flops",
    "frames_to_video",
    "measure_peak_flops",
    "parse_numbers",
    "parse_size",
    "percentiles_ms",
    "rel_err",
    "run_bench",
    "run_stream",
    "streamvae_flops",
    "synthetic_frame",
    "synthetic_frames",
    "track_memory",
]
