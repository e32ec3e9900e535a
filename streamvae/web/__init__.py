"""``streamvae.web``: a browser is a camera. WebRTC ingest (aiortc) and a live page (aiohttp).

- :class:`TrackSource`: a WebRTC video track as a live :class:`~streamvae.io.FrameSource`
  (the same drop policy and capture timestamps as cameras and RTSP streams).
- :class:`WebServer` / :func:`make_app`: the page, the signalling and one stream per browser
  session through one :class:`~streamvae.StreamPool` (``streamvae web`` runs it).

Needs the ``web`` extra: ``pip install 'streamvae[web]'`` (aiohttp and aiortc).
"""

from __future__ import annotations

from streamvae.web.source import TrackSource, VideoTrack

__all__ = ["TrackSource", "VideoTrack"]
