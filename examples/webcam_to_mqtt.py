"""Publish a webcam's latents over MQTT (to <prefix>/<stream-id>/latents).

    python examples/webcam_to_mqtt.py --camera 0 --mqtt mqtt://127.0.0.1:1883/lab \\
        --size 480x640 --weights Wan2.1_VAE.pth

The camera is read in a thread; when the encoder falls behind, whole groups of 4 frames are
dropped (never single frames) and counted. Ctrl-C stops: the last latents are published and
the stream's retained status becomes offline. The password (if any) comes from
$STREAMVAE_MQTT_PASSWORD.
"""

import argparse
import asyncio
import contextlib

import streamvae


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=streamvae.HelpFormatter
    )
    parser.add_argument("--camera", default="0", help="index or device path (/dev/video0)")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883/streamvae")
    parser.add_argument("--stream-id", default="webcam")
    parser.add_argument("--size", default="480x640", help="HxW, multiples of 8")
    parser.add_argument("--frames", type=int, help="stop after this many frames")
    streamvae.add_model_arguments(parser)
    args = parser.parse_args()
    model = streamvae.model_from_args(args)
    labels = {"model": model.label, "meaningless": str(model.random).lower()}

    source = streamvae.open_source(args.camera, kind="webcam", size=args.size, resize="crop")
    settings = streamvae.MqttSettings.from_url(args.mqtt)
    stats = None
    async with (
        source,
        streamvae.MqttSink(settings, stream_id=args.stream_id, labels=labels) as sink,
    ):
        with contextlib.suppress(asyncio.CancelledError):  # Ctrl-C
            encoder = streamvae.StreamEncoder(model.encoder)
            stats = await streamvae.encode_to_sinks(source, encoder, [sink], max_frames=args.frames)
    print(summary(stats, source, sink))


def summary(
    stats: streamvae.PipelineStats | None, source: streamvae.FrameSource, sink: streamvae.MqttSink
) -> str:
    """What happened, in three lines."""
    encoded = (
        f"encoded {stats.frames} frames -> {stats.latents} latents in {stats.elapsed:.1f} s"
        if stats
        else "stopped"
    )
    s, m = source.stats, sink.stats
    return (
        f"{encoded}\n"
        f"source: {s.frames_read} frames read, {s.dropped_frames} dropped in "
        f"{s.dropped_groups} whole groups, {s.reconnects} reconnect(s)\n"
        f"mqtt: {m.published}/{m.sent} published, {m.discarded} discarded"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
