"""streamvae: live video to Wan 2.1 VAE latents, frame by frame, exactly as the batch encoder.

>>> import streamvae
>>> encoder = streamvae.load_encoder("Wan2.1_VAE.pth")                 # doctest: +SKIP
>>> stream = streamvae.StreamEncoder(encoder)                          # doctest: +SKIP
>>> for frame in frames:                                               # doctest: +SKIP
...     for latent in stream.push(frame):
...         print(latent.index, latent.data.shape)
"""

from streamvae.config import WAN21, WanConfig, narrow
from streamvae.frames import Frame, FrameError
from streamvae.model import EncoderState, WanEncoder, state_nbytes
from streamvae.stream import Latent, LatentStream, StreamBroken, StreamEncoder
from streamvae.weights import CheckpointError, load_encoder

__all__ = [
    "WAN21",
    "CheckpointError",
    "EncoderState",
    "Frame",
    "FrameError",
    "Latent",
    "LatentStream",
    "StreamBroken",
    "StreamEncoder",
    "WanConfig",
    "WanEncoder",
    "load_encoder",
    "narrow",
    "state_nbytes",
]

__version__ = "0.1.0"
