"""Encode a video file into a .latents file, then read it back.

python examples/encode_file.py clip.mp4 clip.latents --size 480x832 --weights Wan2.1_VAE.pth
python examples/encode_file.py clip.mp4 clip.latents --size 64x64 --random-weights
"""

import argparse
import asyncio

import streamvae


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=streamvae.HelpFormatter
    )
    parser.add_argument("video")
    parser.add_argument("output")
    parser.add_argument("--size", help="HxW, multiples of 8")
    streamvae.add_model_arguments(parser)
    args = parser.parse_args()
    model = streamvae.model_from_args(args)
    # As the CLI labels its outputs: random weights make meaningless latents, and they say so.
    labels = {"model": model.label, "meaningless": str(model.random).lower()}

    async with streamvae.open_source(args.video, size=args.size) as source:  # a file: no drops
        with streamvae.FileSink(args.output, labels=labels) as sink:
            encoder = streamvae.StreamEncoder(model.encoder)
            stats = await streamvae.encode_to_sinks(source, encoder, [sink])
    print(
        f"encoded {stats.frames} frames -> {stats.latents} latents in {stats.elapsed:.2f} s "
        f"({stats.frames_per_second:.1f} frames/s)"
    )

    latents = streamvae.read_latents(args.output)
    meaningless = " (meaningless: random weights)" if model.random else ""
    print(
        f"{args.output}: {len(latents)} latents of shape {tuple(latents[0].data.shape)}{meaningless}"
    )


if __name__ == "__main__":
    asyncio.run(main())
