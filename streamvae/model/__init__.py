"""The Wan VAE encoders (2.1, 2.2, ...): stepping layers, their streaming state, and the encoder chain."""

from streamvae.model.encoder import EncoderState, WanEncoder, default_memory_format, state_nbytes

__all__ = ["EncoderState", "WanEncoder", "default_memory_format", "state_nbytes"]
