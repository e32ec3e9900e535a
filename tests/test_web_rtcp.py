"""SenderClock: a frame's capture time on the sender's wall clock from RTCP sender reports."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from helpers import require

rtp = require("aiortc.rtp")

from streamvae.web.rtcp import NTP_TO_UNIX, SenderClock, ntp_to_unix  # noqa: E402


class FakeReceiver:
    """What SenderClock reads of aiortc 1.16.0's RTCRtpReceiver."""

    def __init__(self, origin: int) -> None:
        self._RTCRtpReceiver__timestamp_mapper = SimpleNamespace(_origin=origin)
        self.handled: list = []

    async def _handle_rtcp_packet(self, packet) -> None:
        self.handled.append(packet)


def report(wall: float, rtp_timestamp: int):
    ntp = (int(wall) + NTP_TO_UNIX) << 32 | int((wall % 1) * 2**32)
    info = rtp.RtcpSenderInfo(
        ntp_timestamp=ntp, rtp_timestamp=rtp_timestamp, packet_count=1, octet_count=1
    )
    return rtp.RtcpSrPacket(ssrc=1, sender_info=info)


def test_ntp_to_unix():
    assert ntp_to_unix((NTP_TO_UNIX + 1_700_000_000) << 32) == 1_700_000_000.0
    assert ntp_to_unix(NTP_TO_UNIX << 32 | 1 << 30) == 0.25


@pytest.mark.parametrize("origin", [1_000, 2**32 - 4_500])  # the second wraps past 2^32
def test_frames_map_to_the_senders_capture_times(origin):
    receiver = FakeReceiver(origin)
    clock = SenderClock(receiver)  # type: ignore[arg-type]
    frame = SimpleNamespace(pts=9_000)  # 0.1 s after the first frame
    assert clock.capture_time(frame) is None  # no report yet
    sent = report(1_700_000_000.5, (origin + 18_000) & 0xFFFFFFFF)  # 0.2 s after the first
    asyncio.run(receiver._handle_rtcp_packet(sent))
    assert receiver.handled == [sent]  # aiortc still gets the packet
    assert clock.reports == 1
    assert clock.capture_time(frame) == pytest.approx(1_700_000_000.5 - 0.1, abs=1e-6)
    later = SimpleNamespace(pts=27_000)
    assert clock.capture_time(later) == pytest.approx(1_700_000_000.5 + 0.1, abs=1e-6)
    assert clock.capture_time(SimpleNamespace(pts=None)) is None


def test_a_receiver_without_aiortcs_internals_gives_no_times():
    receiver = FakeReceiver(0)
    del receiver._RTCRtpReceiver__timestamp_mapper
    clock = SenderClock(receiver)  # type: ignore[arg-type]
    asyncio.run(receiver._handle_rtcp_packet(report(10.0, 0)))
    assert clock.capture_time(SimpleNamespace(pts=0)) is None


@pytest.mark.parametrize(
    "name",
    [
        "streamvae.web.record",
        "streamvae.web.rtcp",
        "streamvae.web.server",
        "streamvae.web.source",
    ],
)
def test_docstring_examples(name: str):
    import doctest
    import importlib

    require("aiohttp")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    # streamvae.web and streamvae.web.commands have no examples: they are not listed.
    assert result.attempted > 0 and result.failed == 0, result
