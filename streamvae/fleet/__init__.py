"""A worker fleet on NATS JetStream: cameras in, latents out, no latent lost when a worker dies.

- :func:`ingest` (``streamvae fleet ingest``): a source's frames to ``svae.frames.<stream-id>``.
- :class:`FleetWorker` (``streamvae fleet worker``): claims streams by lease, encodes them,
  publishes latents, takes over the streams of dead workers by replaying retained frames.
- :mod:`streamvae.fleet.names`: the subjects, streams, buckets and headers.

Needs ``nats-py`` (``pip install 'streamvae[fleet]'``) and a ``nats-server`` with JetStream.
See ``docs/fleet.md`` for the design and its numbers.
"""

from streamvae.fleet.broker import NATS_PASSWORD_ENV, NatsSettings
from streamvae.fleet.ingest import DEFAULT_RETAIN, IngestRefused, IngestStats, ingest
from streamvae.fleet.messages import FrameMessage, FrameMessageError, decode_frame, encode_frame
from streamvae.fleet.worker import FleetWorker, StreamStats, WorkerOptions, group_start

__all__ = [
    "DEFAULT_RETAIN",
    "NATS_PASSWORD_ENV",
    "FleetWorker",
    "FrameMessage",
    "FrameMessageError",
    "IngestRefused",
    "IngestStats",
    "NatsSettings",
    "StreamStats",
    "WorkerOptions",
    "decode_frame",
    "encode_frame",
    "group_start",
    "ingest",
]
