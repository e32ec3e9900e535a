"""The browser's capture time of each received frame, from its RTCP sender reports.

A WebRTC sender stamps each video frame with an RTP timestamp on a 90 kHz clock driven by the
frame's capture time, and about once a second sends an RTCP *sender report* pairing an RTP
timestamp with its own wall-clock (NTP) time. From the latest report, a frame's RTP timestamp
gives its capture time on the sender's wall clock::

    capture = report_wall + (frame_rtp - report_rtp) / 90000

That is the browser's clock, not the server's: it equals ``time.time()`` here only where both
run on one machine (or on NTP-synchronised machines, to their sync error). Before the first
report (about a second into a session) nothing is known and :meth:`SenderClock.capture_time`
returns ``None``.

aiortc (1.16.0, pinned) does not expose the reports' RTP timestamps nor the origin it subtracts
from frames' ``pts``; this module alone reaches into the receiver for them, and returns
``None`` if they are not where 1.16.0 keeps them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtcpSrPacket

__all__ = ["SenderClock", "ntp_to_unix"]

NTP_TO_UNIX = 2_208_988_800
"""Seconds from the NTP epoch (1900) to the Unix epoch (1970)."""

VIDEO_CLOCK_RATE = 90_000


def ntp_to_unix(ntp: int) -> float:
    """A 64-bit NTP timestamp (32.32 fixed point) -> seconds since the Unix epoch.

    >>> ntp_to_unix((2_208_988_800 + 10) << 32 | 1 << 31)
    10.5
    """
    return (ntp >> 32) - NTP_TO_UNIX + (ntp & 0xFFFFFFFF) / 2**32


class SenderClock:
    """Watches ``receiver``'s RTCP sender reports; maps its frames to the sender's capture times."""

    def __init__(self, receiver: RTCRtpReceiver, clock_rate: int = VIDEO_CLOCK_RATE) -> None:
        self.receiver = receiver
        self.clock_rate = clock_rate
        self.reports = 0
        self._report: tuple[float, int] | None = None  # (sender wall time, RTP timestamp)
        handle: Callable[[Any], Awaitable[None]] = receiver._handle_rtcp_packet

        async def watch(packet: Any) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                self._report = (ntp_to_unix(info.ntp_timestamp), info.rtp_timestamp)
                self.reports += 1
            await handle(packet)

        receiver._handle_rtcp_packet = watch  # type: ignore[method-assign]

    def _origin(self) -> int | None:
        mapper = getattr(self.receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        origin = getattr(mapper, "_origin", None)
        return origin if isinstance(origin, int) else None

    def capture_time(self, frame: Any) -> float | None:
        """The sender's wall-clock capture time of a decoded ``frame`` (its ``pts`` is aiortc's
        RTP timestamp minus the first), or ``None`` before the first report."""
        report, origin, pts = self._report, self._origin(), getattr(frame, "pts", None)
        if report is None or origin is None or not isinstance(pts, int):
            return None
        wall, report_rtp = report
        delta = ((pts + origin) - report_rtp) & 0xFFFFFFFF
        if delta >= 1 << 31:  # the frame is older than the report
            delta -= 1 << 32
        return wall + delta / self.clock_rate
