"""Publish an RTSP (or HTTP MJPEG) stream's latents over MQTT, surviving stream drop-outs.

    python examples/rtsp_to_mqtt.py rtsp://camera.local:554/stream \\
        --mqtt mqtt://127.0.0.1:1883/lab --stream-id door --size 480x832 --weights Wan2.1_VAE.pth

When the stream fails it is reopened with backoff; the first latent after that has gap=True
(the encoder restarted). Add --listen to receive a push instead (ffmpeg ... -f rtsp URL).
"""

import argparse
import asyncio

from streamvae import StreamEncoder
from streamvae.io import MqttSettings, MqttSink, encode_to_sinks, open_source
from streamvae.model_args import add_model_arguments, model_from_args
from streamvae.usage import HelpFormatter


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("url", help="rtsp://... or http://...")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883/streamvae")
    parser.add_argument("--stream-id", default="rtsp")
    parser.add_argument("--size", default="480x832", help="HxW, multiples of 8")
    parser.add_argument("--listen", action="store_true", help="wait for an RTSP push on url")
    add_model_arguments(parser)
    args = parser.parse_args()
    model = model_from_args(args)
    options = {"rtsp_flags": "listen"} if args.listen else {"rtsp_transport": "tcp"}
    if not args.url.startswith("rtsp"):
        options = {}

    source = open_source(args.url, size=args.size, ffmpeg_options=options)
    settings = MqttSettings.from_url(args.mqtt)
    async with source, MqttSink(settings, stream_id=args.stream_id) as sink:
        await encode_to_sinks(source, StreamEncoder(model.encoder), [sink])
    print(f"source: {source.stats}\nmqtt: {sink.stats}")


if __name__ == "__main__":
    asyncio.run(main())
