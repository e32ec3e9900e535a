"""streamvae: live video to Wan VAE latents (Wan 2.1, Wan 2.2, LightVAE, Qwen-Image), frame by frame, exactly as the batch encoder.

>>> import streamvae
>>> encoder = streamvae.load_encoder("Wan2.1_VAE.pth")                 # doctest: +SKIP
>>> stream = streamvae.StreamEncoder(encoder)                          # doctest: +SKIP
>>> for frame in frames:                                               # doctest: +SKIP
...     for latent in stream.push(frame):
...         print(latent.index, latent.data.shape)

Scripts that choose their model as the CLI does (``--weights`` or ``--random-weights``,
``--dtype``, ``--device``, ...) use :func:`add_model_arguments` and :func:`model_from_args`
(:func:`decoder_from_args` for the decoder),
with :class:`HelpFormatter` for help that shows every default (see ``examples/``).
"""

from typing import Any as _Any

from streamvae.config import LIGHTVAE, PRESETS, QWEN_IMAGE, WAN21, WAN22, WanConfig, narrow
from streamvae.decoding import DecodedFrame, FrameStream, LatentError, StreamDecoder
from streamvae.frames import Frame, FrameError
from streamvae.io import (
    FileSink,
    FrameSource,
    LatentSink,
    PipelineStats,
    SourceError,
    SourceFrame,
    SourceStats,
    WireError,
    decode_latent,
    encode_latent,
    encode_to_sinks,
    iter_latents,
    open_source,
    read_latents,
)
from streamvae.model import DecoderState, EncoderState, WanDecoder, WanEncoder, state_nbytes
from streamvae.model_args import (
    ModelChoice,
    add_model_arguments,
    decoder_from_args,
    model_from_args,
)
from streamvae.pool import AdmissionError, PoolSourceError, PoolStepError, StreamPool
from streamvae.receptive import latent_dependencies, receptive_field
from streamvae.snapshot import SnapshotError
from streamvae.stream import Latent, LatentStream, StreamBroken, StreamEncoder
from streamvae.usage import HelpFormatter
from streamvae.weights import (
    CheckpointError,
    load_decoder,
    load_encoder,
    random_decoder,
    random_encoder,
)

__all__ = [
    "LIGHTVAE",
    "PRESETS",
    "QWEN_IMAGE",
    "WAN21",
    "WAN22",
    "AdmissionError",
    "CheckpointError",
    "DecodedFrame",
    "DecoderState",
    "EncoderState",
    "FileSink",
    "Frame",
    "FrameError",
    "FrameSource",
    "FrameStream",
    "HelpFormatter",
    "Latent",
    "LatentError",
    "LatentSink",
    "LatentStream",
    "LatentSubscriber",
    "ModelChoice",
    "MqttSettings",
    "MqttSink",
    "PipelineStats",
    "PoolSourceError",
    "PoolStepError",
    "ReceivedLatent",
    "SnapshotError",
    "SourceError",
    "SourceFrame",
    "SourceStats",
    "StreamBroken",
    "StreamDecoder",
    "StreamEncoder",
    "StreamPool",
    "WanConfig",
    "WanDecoder",
    "WanEncoder",
    "WireError",
    "add_model_arguments",
    "decode_latent",
    "decoder_from_args",
    "encode_latent",
    "encode_to_sinks",
    "iter_latents",
    "latent_dependencies",
    "load_decoder",
    "load_encoder",
    "model_from_args",
    "narrow",
    "open_source",
    "random_decoder",
    "random_encoder",
    "read_latents",
    "receptive_field",
    "state_nbytes",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> _Any:
    """The MQTT names need aiomqtt (``pip install 'streamvae[mqtt]'``): imported on first use."""
    import streamvae.io

    if name in streamvae.io._MQTT_NAMES:
        return getattr(streamvae.io, name)
    raise AttributeError(f"module 'streamvae' has no attribute {name!r}")
