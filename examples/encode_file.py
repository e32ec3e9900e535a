"""Encode a video file into a .latents file, then read it back.

python examples/encode_file.py clip.mp4 clip.latents --size 480x832 --weights Wan2.1_VAE.pth
python examples/encode_file.py clip.mp4 clip.latents --size 64x64 --random-weights
"""

import argparse
import asyncio

from streamvae import StreamEncoder
from streamvae.io import FileSink, encode_to_sinks, open_source, read_latents
from streamvae.model_args import add_model_arguments, model_from_args
from streamvae.usage import HelpFormatter


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("video")
    parser.add_argument("output")
    parser.add_argument("--size", help="HxW, multiples of 8")
    add_model_arguments(parser)
    args = parser.parse_args()
    model = model_from_args(args)

    async with open_source(args.video, size=args.size) as source:  # a file: nothing is dropped
        with FileSink(args.output, labels={"model": model.label}) as sink:
            stats = await encode_to_sinks(source, StreamEncoder(model.encoder), [sink])
    print(stats.summary())

    latents = read_latents(args.output)
    print(f"{args.output}: {len(latents)} latents of shape {tuple(latents[0].data.shape)}")


if __name__ == "__main__":
    asyncio.run(main())
