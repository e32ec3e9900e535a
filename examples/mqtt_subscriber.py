"""Receive latents from MQTT and decode them (safetensors; nothing is unpickled).

python examples/mqtt_subscriber.py --mqtt mqtt://127.0.0.1:1883/lab [--stream cam1] [--count 10]
"""

import argparse
import asyncio

import streamvae


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=streamvae.HelpFormatter
    )
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883/streamvae", help="the broker")
    parser.add_argument("--stream", default="+", help="stream id (default: all)")
    parser.add_argument("--count", type=int, help="exit after this many latents")
    parser.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024)
    args = parser.parse_args()

    settings = streamvae.MqttSettings.from_url(args.mqtt)
    received = 0
    async with streamvae.LatentSubscriber(
        settings, streams=args.stream, max_payload_bytes=args.max_bytes
    ) as latents:
        print("subscribed", flush=True)
        async for message in latents:
            latent = message.latent
            lag_ms = (message.received_time - latent.ready_time) * 1000
            print(
                f"{message.stream_id} #{latent.index} frames {latent.frames.start}-"
                f"{latent.frames.stop - 1} {tuple(latent.data.shape)} gap={latent.gap} "
                f"lag {lag_ms:.1f} ms {'(meaningless)' if latent.meta.get('meaningless') == 'true' else ''}",
                flush=True,
            )
            received += 1
            if args.count and received >= args.count:
                break


if __name__ == "__main__":
    asyncio.run(main())
