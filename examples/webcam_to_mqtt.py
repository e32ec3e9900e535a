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

from streamvae import StreamEncoder
from streamvae.io import MqttSettings, MqttSink, encode_to_sinks, open_source
from streamvae.model_args import add_model_arguments, model_from_args
from streamvae.usage import HelpFormatter


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--camera", default="0", help="index or device path (/dev/video0)")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883/streamvae")
    parser.add_argument("--stream-id", default="webcam")
    parser.add_argument("--size", default="480x640", help="HxW, multiples of 8")
    parser.add_argument("--frames", type=int, help="stop after this many frames")
    add_model_arguments(parser)
    args = parser.parse_args()
    model = model_from_args(args)
    labels = {"model": model.label, "meaningless": str(model.random).lower()}

    source = open_source(args.camera, kind="webcam", size=args.size, resize="crop")
    async with (
        source,
        MqttSink(MqttSettings.from_url(args.mqtt), stream_id=args.stream_id, labels=labels) as sink,
    ):
        try:
            stats = await encode_to_sinks(
                source, StreamEncoder(model.encoder), [sink], max_frames=args.frames
            )
        except asyncio.CancelledError:  # Ctrl-C
            stats = None
    print(stats.summary() if stats else "stopped")
    print(f"source: {source.stats}")
    print(
        f"mqtt: {sink.stats.published}/{sink.stats.sent} published, {sink.stats.discarded} discarded"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
