"""``streamvae.web``: a browser is a camera. WebRTC ingest (aiortc) and a live page (aiohttp).

- :class:`TrackSource`: a WebRTC video track as a live :class:`~streamvae.io.FrameSource`
  (the same drop policy and capture timestamps as cameras and RTSP streams).
- :class:`WebServer` / :func:`make_app`: the page, the signalling and one stream per browser
  session through one :class:`~streamvae.StreamPool` (``streamvae web`` runs it).
- :class:`SenderClock`: the browser's capture time of each frame, from its RTCP reports.
- :class:`FrameRecorder` / :func:`read_recording`: the frames a stream got, losslessly.

Needs the ``web`` extra: ``pip install 'streamvae[web]'`` (aiohttp and aiortc).
"""

from __future__ import annotations

from streamvae.web.record import FrameRecorder, read_recording
from streamvae.web.rtcp import SenderClock
from streamvae.web.server import PageInfo, SessionSettings, WebServer, latent_picture, make_app
from streamvae.web.source import TrackSource, VideoTrack

__all__ = [
    "FrameRecorder",
    "PageInfo",
    "SenderClock",
    "SessionSettings",
    "TrackSource",
    "VideoTrack",
    "WebServer",
    "latent_picture",
    "make_app",
    "read_recording",
]
