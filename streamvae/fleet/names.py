"""Where a fleet keeps things in NATS: JetStream streams, subjects, KV buckets and headers.

====================  ===========================================================================
``SVAE_FRAMES``       stream of every camera's frames, subject ``svae.frames.<stream-id>``; the
                      last ``retain`` messages of each subject are kept (``max_msgs_per_subject``)
``SVAE_LATENTS``      stream of latents in the wire format (:mod:`streamvae.io.wire`), subject
                      ``svae.latents.<stream-id>``; ``Nats-Msg-Id`` is ``<stream>:<run>:<index>``
``svae_streams``      KV: stream id -> what its ingest publishes (run, size, codec, first seq)
``svae_leases``       KV with a TTL: stream id -> the worker that owns it (renewed while alive)
``svae_progress``     KV: stream id -> the last latent published and where its replay starts
``svae_workers``      KV with a TTL: worker id -> capacity and load (for least-loaded claims)
``svae_ingests``      KV with a TTL: stream id -> the ingest publishing it (one at a time)
``svae.control.<w>``  requests to worker ``w`` (planned moves)
====================  ===========================================================================
"""

from __future__ import annotations

import re

__all__ = [
    "CONTROL_SUBJECT",
    "FRAMES_STREAM",
    "HEADER_CODEC",
    "HEADER_END",
    "HEADER_INDEX",
    "HEADER_RUN",
    "HEADER_SIZE",
    "HEADER_TIME",
    "INGESTS_BUCKET",
    "LATENTS_STREAM",
    "LEASES_BUCKET",
    "PROGRESS_BUCKET",
    "STREAMS_BUCKET",
    "WORKERS_BUCKET",
    "frames_subject",
    "latents_subject",
    "validate_fleet_id",
]

FRAMES_STREAM = "SVAE_FRAMES"
LATENTS_STREAM = "SVAE_LATENTS"
STREAMS_BUCKET = "svae_streams"
LEASES_BUCKET = "svae_leases"
PROGRESS_BUCKET = "svae_progress"
WORKERS_BUCKET = "svae_workers"
INGESTS_BUCKET = "svae_ingests"
CONTROL_SUBJECT = "svae.control.{worker}"

HEADER_INDEX = "Svae-Index"
HEADER_RUN = "Svae-Run"
HEADER_TIME = "Svae-Time"
HEADER_CODEC = "Svae-Codec"
HEADER_SIZE = "Svae-Size"
HEADER_END = "Svae-End"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def validate_fleet_id(value: str, what: str = "stream id") -> str:
    """One NATS subject token and KV key: 1-64 letters, digits, ``_`` or ``-`` (no ``.``)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(
            f"{what} must be 1-64 letters, digits, '_' or '-', starting with a letter or digit "
            f"(one NATS subject token: no '.', '*', '>' or spaces); got {value!r}"
        )
    return value


def frames_subject(stream_id: str) -> str:
    """``svae.frames.<stream-id>``"""
    return f"svae.frames.{validate_fleet_id(stream_id)}"


def latents_subject(stream_id: str) -> str:
    """``svae.latents.<stream-id>``"""
    return f"svae.latents.{validate_fleet_id(stream_id)}"
