"""Publish an RTSP (or HTTP MJPEG) stream's latents over MQTT, surviving stream drop-outs.

    python examples/rtsp_to_mqtt.py rtsp://camera.local:554/stream \\
        --mqtt mqtt://127.0.0.1:1883/lab --stream-id door --size 480x832 --weights Wan2.1_VAE.pth

When the stream fails it is reopened with backoff; the first latent after that has gap=True
(the encoder restarted). Add --listen to receive a push instead: this script then listens on
the URL's port (rtsp://0.0.0.0:8554/cam) and a camera or ffmpeg pushes to it
(ffmpeg -re -i clip.mp4 -f rtsp rtsp://HOST:8554/cam).
"""

import argparse
import asyncio
import contextlib

import streamvae


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=streamvae.HelpFormatter
    )
    parser.add_argument("url", help="rtsp://... or http://...")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883/streamvae")
    parser.add_argument("--stream-id", default="rtsp")
    parser.add_argument("--size", default="480x832", help="HxW, multiples of 8")
    parser.add_argument("--listen", action="store_true", help="wait for an RTSP push on url")
    parser.add_argument("--frames", type=int, help="stop after this many frames")
    streamvae.add_model_arguments(parser)
    args = parser.parse_args()
    model = streamvae.model_from_args(args)
    labels = {"model": model.label, "meaningless": str(model.random).lower()}
    options = {"rtsp_flags": "listen"} if args.listen else {"rtsp_transport": "tcp"}
    if not args.url.startswith("rtsp"):
        options = {}

    source = streamvae.open_source(args.url, size=args.size, ffmpeg_options=options)
    settings = streamvae.MqttSettings.from_url(args.mqtt)
    stats = None
    async with (
        source,
        streamvae.MqttSink(settings, stream_id=args.stream_id, labels=labels) as sink,
    ):
        with contextlib.suppress(asyncio.CancelledError):  # Ctrl-C
            encoder = streamvae.StreamEncoder(model.encoder)
            stats = await streamvae.encode_to_sinks(source, encoder, [sink], max_frames=args.frames)
    s, m = source.stats, sink.stats
    if stats:
        print(f"encoded {stats.frames} frames -> {stats.latents} latents, {stats.gaps} gap(s)")
    print(
        f"source: {s.frames_read} frames read, {s.dropped_frames} dropped, "
        f"{s.reconnects} reconnect(s)\nmqtt: {m.published}/{m.sent} published, "
        f"{m.discarded} discarded"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
