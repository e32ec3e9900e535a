"""The Wan VAE encoders and decoders (2.1, 2.2, ...): stepping layers, their streaming state, the chains."""

from streamvae.model.decoder import DecoderState, WanDecoder
from streamvae.model.encoder import EncoderState, WanEncoder, default_memory_format, state_nbytes

__all__ = [
    "DecoderState",
    "EncoderState",
    "WanDecoder",
    "WanEncoder",
    "default_memory_format",
    "state_nbytes",
]
