"""Subscribe to MQTT latents and decode them live with StreamDecoder (one decoder per stream).

python examples/mqtt_decode.py --mqtt mqtt://127.0.0.1:1883/lab --weights Wan2.1_VAE.pth \\
    [--stream cam1] [--output frames/] [--count 10]

Latents come as ``streamvae live`` / ``serve`` / ``web`` publish them (MqttSink): each stream's
latents are decoded in order by its own StreamDecoder, every frame as soon as it is complete; a
line per latent says which frames it gave and how long after the latent was ready they were.
``--output DIR`` writes the frames as PNGs (``DIR/<stream>/frame_000000.png``, ...). A message
sent twice (QoS 1 after a reconnection) is decoded once; a new run of a stream (its source
restarted) starts its decoder again; a latent missing from a run (discarded by a publisher's
full buffer) is reported, and that run's later frames are then not exact.
"""

import argparse
import asyncio
import contextlib
import time
from pathlib import Path

import streamvae


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=streamvae.HelpFormatter
    )
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883/streamvae", help="the broker")
    parser.add_argument("--stream", default="+", help="stream id (default: all)")
    parser.add_argument("--output", type=Path, help="write the frames as PNGs under this folder")
    parser.add_argument("--count", type=int, help="exit after this many latents")
    parser.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024)
    streamvae.add_model_arguments(parser)
    args = parser.parse_args(argv)
    decoder, label, random = streamvae.decoder_from_args(args)
    meaningless = " (RANDOM WEIGHTS: the frames are meaningless)" if random else ""
    print(f"decoder: {label}{meaningless}", flush=True)

    settings = streamvae.MqttSettings.from_url(args.mqtt)
    streams: dict[str, Decoding] = {}
    received = 0
    async with streamvae.LatentSubscriber(
        settings, streams=args.stream, max_payload_bytes=args.max_bytes
    ) as latents:
        print("subscribed", flush=True)
        async for message in latents:
            if message.stream_id not in streams:
                streams[message.stream_id] = Decoding(decoder, message.stream_id, args.output)
            # Decode in a worker thread: the connection's keep-alive goes on meanwhile.
            line = await asyncio.to_thread(streams[message.stream_id].push, message)
            if line:
                print(line, flush=True)
            received += 1
            if args.count and received >= args.count:
                break
    for decoding in streams.values():
        print(decoding.summary(), flush=True)


class Decoding:
    """One stream's decoder, the runs it has seen and where its frames go."""

    def __init__(self, decoder: streamvae.WanDecoder, stream_id: str, output: Path | None):
        self.decoder = decoder
        self.stream_id = stream_id
        self.folder = None if output is None else output / stream_id
        self.stream: streamvae.StreamDecoder | None = None
        self.run: str | None = None
        self.next_index = 0
        self.latents = self.frames = self.duplicates = self.missed = 0

    def push(self, message: streamvae.ReceivedLatent) -> str | None:
        """Decode one received latent; its line, or ``None`` for a duplicate."""
        latent = message.latent
        run = latent.meta.get("run")
        if self.stream is None or run != self.run or latent.gap:
            # A new run of the stream: a decoder of its own normalisation, from latent 0.
            normalized = latent.meta.get("normalization", "wan") != "none"
            self.stream = streamvae.StreamDecoder(self.decoder, normalized=normalized)
            self.run, self.next_index = run, latent.index
        elif latent.index < self.next_index:
            self.duplicates += 1  # QoS 1: delivered again after a reconnection
            return None
        note = ""
        if latent.index > self.next_index:
            self.missed += latent.index - self.next_index
            note = f" (missed latents {self.next_index}-{latent.index - 1}: not exact from here)"
        self.next_index = latent.index + 1
        started = time.time()
        frames = []
        for frame in self.stream.iter_push(latent):
            frames.append(frame)
            if self.folder is not None:
                from PIL import Image

                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"frame_{self.frames:06d}.png"
                Image.fromarray(frame.to_rgb()).save(path)
            self.frames += 1
        self.latents += 1
        first_ms = (frames[0].ready_time - started) * 1000
        lag_ms = (frames[-1].ready_time - latent.ready_time) * 1000
        height, width = frames[0].data.shape[1:]
        return (
            f"{self.stream_id} #{latent.index} -> frames {frames[0].index}-{frames[-1].index} "
            f"({height}x{width}): first in {first_ms:.0f} ms, last {lag_ms:.0f} ms after the "
            f"latent was ready{note}"
        )

    def summary(self) -> str:
        where = f" into {self.folder}" if self.folder is not None and self.frames else ""
        return (
            f"{self.stream_id}: {self.latents} latents -> {self.frames} frames{where}; "
            f"{self.duplicates} duplicate(s) skipped, {self.missed} latent(s) missed"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
