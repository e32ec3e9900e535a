"""Live sources and sinks: cameras, RTSP/HTTP streams and files in; MQTT and files out.

>>> from streamvae import StreamEncoder, load_encoder
>>> from streamvae.io import MqttSettings, MqttSink, encode_to_sinks, open_source
>>> async def main():                                                       # doctest: +SKIP
...     encoder = StreamEncoder(load_encoder("Wan2.1_VAE.pth"))
...     settings = MqttSettings.from_url("mqtt://127.0.0.1:1883/lab")
...     async with open_source("rtsp://camera.local/live", size="480x832") as source:
...         async with MqttSink(settings, stream_id="cam1") as sink:
...             await encode_to_sinks(source, encoder, [sink])

- :mod:`streamvae.io.sources`: :func:`open_source` (webcam, rtsp/http, files, synthetic://)
- :mod:`streamvae.io.wire`: the safetensors wire format, :func:`decode_latent`
- :mod:`streamvae.io.mqtt`: :class:`MqttSink`, :class:`LatentSubscriber`
- :mod:`streamvae.io.filesink`: :class:`FileSink`, :func:`read_latents`
- :mod:`streamvae.io.pipeline`: :func:`encode_to_sinks`

The MQTT parts need ``aiomqtt`` (``pip install 'streamvae[mqtt]'``); they are imported on first
use, so the rest works without it.
"""

from __future__ import annotations

from typing import Any

from streamvae.io.backoff import Backoff
from streamvae.io.filesink import FileSink, iter_latents, read_latents
from streamvae.io.pipeline import LatentSink, PipelineStats, SinkError, encode_to_sinks
from streamvae.io.sources import (
    FrameSource,
    SourceError,
    SourceFrame,
    SourceStats,
    open_source,
    parse_size,
)
from streamvae.io.wire import CONTENT_TYPE, WireError, decode_latent, encode_latent

__all__ = [
    "CONTENT_TYPE",
    "Backoff",
    "FileSink",
    "FrameSource",
    "LatentSink",
    "LatentSubscriber",
    "MqttSettings",
    "MqttSink",
    "PipelineStats",
    "ReceivedLatent",
    "SinkError",
    "SourceError",
    "SourceFrame",
    "SourceStats",
    "WireError",
    "decode_latent",
    "encode_latent",
    "encode_to_sinks",
    "iter_latents",
    "open_source",
    "parse_size",
    "read_latents",
]

_MQTT_NAMES = frozenset({"LatentSubscriber", "MqttSettings", "MqttSink", "ReceivedLatent"})


def __getattr__(name: str) -> Any:
    if name in _MQTT_NAMES:
        from streamvae.io import mqtt

        return getattr(mqtt, name)
    raise AttributeError(f"module 'streamvae.io' has no attribute {name!r}")
