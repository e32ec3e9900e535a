"""The web server in-process, with aiortc as the browser: signalling, admission, timeouts, a
camera switch, the data channel's numbers, and no secrets on the page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from helpers import rel_err, require

aiohttp = require("aiohttp")
aiortc = require("aiortc")
av = require("av")

from aiohttp.test_utils import TestServer  # noqa: E402
from aiortc.mediastreams import MediaStreamTrack  # noqa: E402

from streamvae import StreamEncoder, StreamPool  # noqa: E402
from streamvae.io.pipeline import SinkError  # noqa: E402
from streamvae.io.sources import synthetic_frame  # noqa: E402
from streamvae.web.record import read_recording  # noqa: E402
from streamvae.web.server import PageInfo, SessionSettings, WebServer, latent_picture  # noqa: E402

TOLERANCE = 1e-5


class Pattern(MediaStreamTrack):
    """The built-in moving pattern at 30 fps; from frame ``switch_at`` on, at ``second`` size."""

    kind = "video"

    def __init__(self, first=(64, 64), second=None, switch_at=None, silent=False):
        super().__init__()
        self.first, self.second, self.switch_at, self.silent = first, second, switch_at, silent
        self.number = 0

    async def recv(self):
        if self.silent:
            await asyncio.Event().wait()  # a camera that never gives a frame
        await asyncio.sleep(1 / 30)
        switched = self.switch_at is not None and self.number >= self.switch_at
        h, w = self.second if switched else self.first
        frame = av.VideoFrame.from_ndarray(synthetic_frame(self.number, h, w), format="rgb24")
        frame.pts, frame.time_base = self.number * 3000, Fraction(1, 90000)
        self.number += 1
        return frame


class ListSink:
    def __init__(self) -> None:
        self.latents: list = []

    async def send(self, latent) -> None:
        self.latents.append(latent)


class Sinks:
    """The sink factory: a ListSink per stream; records which were opened and closed."""

    def __init__(self) -> None:
        self.by_stream: dict[str, ListSink] = {}
        self.closed: list[str] = []

    @contextlib.asynccontextmanager
    async def __call__(self, stream_id: str):
        sink = self.by_stream[stream_id] = ListSink()
        try:
            yield [sink]
        finally:
            self.closed.append(stream_id)


INFO = PageInfo(
    model="RANDOM WEIGHTS wan2.1-narrow8",
    config="wan2.1-narrow8",
    dtype="float32",
    size=(64, 64),
    random_weights=True,
    sinks=("mqtt",),
)


@contextlib.asynccontextmanager
async def running(encoder, sinks, *, max_streams=2, **settings):
    pool = StreamPool(encoder, max_streams=max_streams)
    settings.setdefault("size", (64, 64))
    server = WebServer(pool, INFO, sinks, SessionSettings(**settings))
    async with server, TestServer(server.app) as http, aiohttp.ClientSession() as client:
        yield server, http, client, pool


class Peer:
    """A browser stand-in: an aiortc peer that sends ``track`` and reads the data channel."""

    def __init__(self, track) -> None:
        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        self.messages: list[dict] = []
        self.ended = asyncio.Event()
        self.channel = self.pc.createDataChannel("streamvae")
        self.channel.on("message", self._on_message)
        if track is not None:
            self.pc.addTransceiver(track, direction="sendonly")

    def _on_message(self, text) -> None:
        message = json.loads(text)
        self.messages.append(message)
        if message["type"] == "ended":
            self.ended.set()

    async def connect(self, client, http) -> tuple[int, dict]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        async with client.post(http.make_url("/api/offer"), json=offer) as response:
            body = await response.json()
            if response.status == 200:
                await self.pc.setRemoteDescription(
                    aiortc.RTCSessionDescription(sdp=body["sdp"], type=body["type"])
                )
            return response.status, body

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    async def close(self) -> None:
        await self.pc.close()


async def until(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.network
async def test_a_peer_streams_and_a_camera_switch_resets_its_stream_with_a_gap(
    narrow_encoder, tmp_path: Path
):
    sinks = Sinks()
    async with running(narrow_encoder, sinks, record_dir=tmp_path / "rec") as (
        server,
        http,
        client,
        pool,
    ):
        peer = Peer(Pattern(first=(64, 64), second=(48, 80), switch_at=30))
        status, body = await peer.connect(client, http)
        assert status == 200 and body["session"] == "web-1"
        await until(
            lambda: peer.of_type("latent") and peer.of_type("latent")[-1]["gap"], 60, "a gap"
        )
        await until(lambda: len(peer.of_type("latent")) >= 12, 60, "12 latents")
        await until(
            lambda: peer.of_type("latent")[-1]["capture_to_ready_ms"] is not None,
            30,
            "a latent timed by the sender's RTCP reports",
        )
        peer.channel.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(peer.ended.wait(), 30)
        api = await (await client.get(http.make_url("/api/sessions"))).json()
        await peer.close()
    session = server.sessions["web-1"]
    assert sinks.closed == ["web-1"] and len(pool) == 0
    final = peer.of_type("ended")[0]
    assert final["state"] == "ended" and final["error"] is None
    assert final["resets"] == 1 and final["gaps"] == 1 and final["resolution"] == "48x80"
    assert api["web-1"]["latents"] == final["latents"] == session.stats.latents
    latents = sinks.by_stream["web-1"].latents
    pictures = peer.of_type("latent")
    assert [m["index"] for m in pictures] == [x.index for x in latents]  # none lost on the way
    assert [m["count"] for m in pictures] == list(range(1, len(latents) + 1))
    assert peer.of_type("hello")[0]["random_weights"] is True
    # The latents equal a StreamEncoder over the frames the server got (recorded losslessly).
    frames = read_recording(tmp_path / "rec" / "web-1")
    assert len(frames) == final["frames_encoded"]
    assert all(f.image.shape == (64, 64, 3) for f in frames)  # both sizes brought to --size
    assert sum(f.gap for f in frames) == 1
    own = StreamEncoder(narrow_encoder)
    expected = [x for f in frames for x in own.push(f)] + own.flush()
    assert len(latents) == len(expected) == final["latents"]
    for got, want in zip(latents, expected):
        assert (got.index, got.gap, got.source_frames) == (want.index, want.gap, want.source_frames)
        assert rel_err(got.data, want.data) < TOLERANCE
    for m in pictures:
        assert len(m["rgb"]) > 0 and (m["height"], m["width"]) == (8, 8)
        assert m["latency_ms"] is not None and m["latency_ms"] >= 0
    # From the sender's first RTCP report on, timestamps are its capture times (one clock here).
    clocks = [x.meta["capture_clock"] for x in latents]
    assert clocks[0] == "server-receive" and clocks[-1] == "browser-capture"
    assert clocks == sorted(clocks, reverse=True)  # once known, always known
    timed = [m for m in pictures if m["capture_to_ready_ms"] is not None]
    assert timed and all(m["capture_to_ready_ms"] > 0 for m in timed)


@pytest.mark.network
async def test_a_full_pool_refuses_a_session_and_a_silent_one_times_out(narrow_encoder):
    sinks = Sinks()
    async with running(narrow_encoder, sinks, max_streams=1, first_frame_timeout=1.0) as (
        server,
        http,
        client,
        pool,
    ):
        silent = Peer(Pattern(silent=True))
        status, _ = await silent.connect(client, http)
        assert status == 200
        refused = Peer(Pattern())
        status, body = await refused.connect(client, http)
        assert status == 503
        assert "server is full" in body["error"] and "max_streams=1" in body["error"]
        assert list(server.sessions) == ["web-1"]  # the refusal left nothing behind
        await asyncio.wait_for(silent.ended.wait(), 30)
        final = silent.of_type("ended")[0]
        assert final["state"] == "failed"
        assert "web-1: the browser sent no frame for 1 s" in final["error"]
        assert sinks.closed == ["web-1"] and len(pool) == 0  # its outputs were closed
        # The slot is free again: a new session is admitted.
        again = Peer(Pattern())
        status, body = await again.connect(client, http)
        assert status == 200 and body["session"] == "web-3"
        await until(lambda: again.of_type("latent"), 60, "a latent from the new session")
        for peer in (silent, refused, again):
            await peer.close()
        await until(lambda: server.sessions["web-3"].state == "ended", 30, "a closed peer's end")
    assert sinks.closed == ["web-1", "web-3"]


async def test_bad_offers_are_refused_clearly(narrow_encoder):
    async with running(narrow_encoder, Sinks()) as (server, http, client, _):
        url = http.make_url("/api/offer")
        async with client.post(url, data=b"x", headers={"Content-Type": "text/plain"}) as plain:
            assert plain.status == 415  # a cross-site form or no-preflight fetch takes no slot
            assert "application/json" in (await plain.json())["error"]
        rebound = {"Host": "attacker.example:8000"}  # DNS rebinding: another site's name
        for path in ("/", "/api/sessions", "/api/info"):
            async with client.get(http.make_url(path), headers=rebound) as response:
                assert response.status == 403
        async with client.post(url, json={}, headers=rebound) as response:
            assert response.status == 403
        async with client.get(http.make_url("/"), headers={"Host": "localhost:1"}) as response:
            assert response.status == 200
        server.allowed_hosts = ("attacker.example",)  # --allow-host: a proxy's public name
        async with client.get(http.make_url("/"), headers=rebound) as response:
            assert response.status == 200
        json_type = {"Content-Type": "application/json"}
        async with client.post(url, data=b"not json", headers=json_type) as response:
            assert response.status == 400
            assert "expected JSON" in (await response.json())["error"]
        no_video = Peer(None)
        status, body = await no_video.connect(client, http)
        await no_video.close()
        assert status == 400 and "no video track" in body["error"]
        assert server.sessions == {}


async def test_the_page_and_its_info_hold_no_secrets(narrow_encoder):
    async with running(narrow_encoder, Sinks()) as (_, http, client, _pool):
        page = await (await client.get(http.make_url("/"))).text()
        script = await (await client.get(http.make_url("/app.js"))).text()
        info = await (await client.get(http.make_url("/api/info"))).json()
        icon = await client.get(http.make_url("/favicon.ico"))
    assert "RANDOM WEIGHTS" in page and 'src="/app.js"' in page
    assert '"Content-Type": "application/json"' in script  # what /api/offer requires
    assert "RTCPeerConnection" in script and "http" not in script.replace("/api/", "")
    assert info["size"] == "64x64" and info["random_weights"] and info["sinks"] == ["mqtt"]
    assert set(info) == {
        "model",
        "config",
        "dtype",
        "size",
        "random_weights",
        "z_dim",
        "sinks",
        "clocks",
        "decodes",
    }
    assert info["decodes"] is False  # no decoder given: no round trip
    assert "monotonic" in info["clocks"]
    assert icon.status == 204


def test_the_latent_picture_is_a_fixed_projection():
    data = np.random.default_rng(0).standard_normal((16, 4, 6)).astype(np.float32)
    picture = latent_picture(data)
    assert picture.shape == (4, 6, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture, latent_picture(data.copy()))  # the same every time
    assert not np.array_equal(picture, latent_picture(-data))  # and it shows the latent
    assert latent_picture(np.zeros((16, 2, 2), np.float32)).tolist() == [[[128] * 3] * 2] * 2
    with pytest.raises(ValueError, match=r"a latent is \[z, h, w\]"):
        latent_picture(np.zeros((16, 4)))


class RefusingSink:
    async def send(self, latent) -> None:
        raise ValueError("labels may not use the wire format's own keys")


@pytest.mark.network
async def test_a_failing_output_ends_only_its_own_session(narrow_encoder):
    sinks = Sinks()
    opened = sinks.__call__

    @contextlib.asynccontextmanager
    async def factory(stream_id: str):
        async with opened(stream_id) as good:
            yield [RefusingSink()] if stream_id == "web-1" else good

    async with running(narrow_encoder, factory) as (server, http, client, _pool):
        bad, good = Peer(Pattern()), Peer(Pattern())
        assert (await bad.connect(client, http))[0] == 200
        assert (await good.connect(client, http))[0] == 200
        await asyncio.wait_for(bad.ended.wait(), 30)
        final = bad.of_type("ended")[0]
        assert final["state"] == "failed"
        assert (
            final["error"] == "output failed (RefusingSink, sending a latent): see the server log"
        )
        assert server.sessions["web-1"].output_failed
        count = len(good.of_type("latent"))
        await until(lambda: len(good.of_type("latent")) >= count + 3, 60, "web-2 going on")
        for peer in (bad, good):
            await peer.close()
        await until(lambda: server.sessions["web-2"].state == "ended", 30, "web-2's end")
    assert sorted(sinks.closed) == ["web-1", "web-2"]


@pytest.mark.network
async def test_closing_the_server_ends_streaming_sessions_cleanly(narrow_encoder):
    sinks = Sinks()
    async with running(narrow_encoder, sinks) as (server, http, client, pool):
        peer = Peer(Pattern())
        assert (await peer.connect(client, http))[0] == 200
        await until(lambda: len(peer.of_type("latent")) >= 3, 60, "3 latents")
        session = server.sessions["web-1"]
        samples = list(session.rates)
        for _ in range(20):  # reading the numbers (GET /api/sessions) leaves the rates' window
            (await client.get(http.make_url("/api/sessions"))).close()
        assert len([r for r in session.rates if r not in samples]) <= 1  # a tick's, at most
    # Leaving the server (Ctrl-C in `streamvae web`) flushed the stream and closed its outputs.
    assert server.sessions["web-1"].state == "ended" and sinks.closed == ["web-1"]
    assert len(pool) == 0
    latents = sinks.by_stream["web-1"].latents
    assert [x.index for x in latents] == list(range(len(latents)))
    await asyncio.wait_for(peer.ended.wait(), 10)
    final = peer.of_type("ended")[0]
    assert final["latents"] == len(latents)
    await asyncio.sleep(0.05)  # its duration stopped at its end (frames per second stay right)
    assert server.sessions["web-1"].numbers()["seconds"] == final["seconds"]
    await peer.close()


class PoolBroke(Exception):
    pass


@pytest.mark.network
async def test_an_encoder_error_fails_every_session_and_refuses_new_ones(narrow_encoder):
    sinks = Sinks()
    async with running(narrow_encoder, sinks) as (server, http, client, pool):
        peers = [Peer(Pattern()), Peer(Pattern())]
        for peer in peers:
            assert (await peer.connect(client, http))[0] == 200
        await until(lambda: all(len(p.of_type("latent")) >= 2 for p in peers), 60, "latents")

        def broken(frames):
            raise PoolBroke("the step went wrong")

        pool.push = broken  # what pool.push may raise (FrameError, PoolStepError, ...)
        for peer in peers:
            await asyncio.wait_for(peer.ended.wait(), 30)
            final = peer.of_type("ended")[0]
            assert final["state"] == "failed"
            assert final["error"] == "the encoder stopped: PoolBroke: the step went wrong"
        late = Peer(Pattern())
        status, body = await late.connect(client, http)
        assert status == 503
        assert body["error"] == "the encoder stopped: PoolBroke: the step went wrong"
        for peer in [*peers, late]:
            await peer.close()
    # Leaving the server did not raise; every session's outputs were closed, the pool is empty.
    assert sorted(sinks.closed) == ["web-1", "web-2"] and len(pool) == 0
    assert server._ticker is not None and server._ticker.done()


@pytest.mark.network
async def test_a_camera_size_the_encoder_cannot_take_ends_only_its_session(narrow_encoder):
    sinks = Sinks()
    async with running(narrow_encoder, sinks, size=None) as (server, http, client, _pool):
        odd, good = Peer(Pattern(first=(60, 64))), Peer(Pattern())
        assert (await odd.connect(client, http))[0] == 200
        assert (await good.connect(client, http))[0] == 200
        await asyncio.wait_for(odd.ended.wait(), 30)
        final = odd.of_type("ended")[0]
        assert final["state"] == "failed"
        assert "web-1: the camera sends 60x64, which the encoder cannot take" in final["error"]
        count = len(good.of_type("latent"))
        await until(lambda: len(good.of_type("latent")) >= count + 3, 60, "web-2 going on")
        assert server.failure is None
        for peer in (odd, good):
            await peer.close()
        await until(lambda: server.sessions["web-2"].state == "ended", 30, "web-2's end")


@pytest.mark.network
async def test_an_offer_cancelled_once_admitted_frees_its_slot(narrow_encoder):
    sinks = Sinks()
    pool = StreamPool(narrow_encoder, max_streams=1)
    server = WebServer(pool, INFO, sinks, SessionSettings(size=(64, 64)))
    async with server:
        assert server._latents is not None
        admit = server._latents.add

        async def admitted_then_cancelled(*args, **kwargs):
            await admit(*args, **kwargs)
            assert len(pool) == 1
            raise asyncio.CancelledError  # the offer cancelled as the admission comes back

        server._latents.add = admitted_then_cancelled
        peer = Peer(Pattern())
        await peer.pc.setLocalDescription(await peer.pc.createOffer())
        with pytest.raises(asyncio.CancelledError):
            await server.offer(peer.pc.localDescription.sdp, "offer")
        await until(lambda: len(pool) == 0, 30, "the slot freed")
        await peer.close()
    assert server.sessions == {}


URL = "mqtt://alice:s3cret-pw@127.0.0.1:47123/streams"


class LeakySink:
    """Fails as an MQTT sink does: its message names the broker, the user, a raw error."""

    async def send(self, latent) -> None:
        raise SinkError(f"the MQTT sink for {URL} stopped: ConnectionRefusedError({URL!r})")


@pytest.mark.network
async def test_an_output_failure_shows_no_broker_user_or_password(narrow_encoder, caplog):
    @contextlib.asynccontextmanager
    async def factory(stream_id: str):
        if stream_id == "web-1":
            raise OSError(f"could not connect to {URL}: [Errno 111] Connection refused")
        yield [LeakySink()]

    async with running(narrow_encoder, factory) as (_server, http, client, _pool):
        peers = [Peer(Pattern()), Peer(Pattern())]
        for peer in peers:
            assert (await peer.connect(client, http))[0] == 200
        for peer in peers:
            await asyncio.wait_for(peer.ended.wait(), 30)
        api = await (await client.get(http.make_url("/api/sessions"))).text()
        for peer in peers:
            await peer.close()
    shown = api + json.dumps([p.messages for p in peers])
    for secret in ("alice", "s3cret", "127.0.0.1:47123", "47123", "Connection refused"):
        assert secret not in shown
    errors = [json.loads(api)[sid]["error"] for sid in ("web-1", "web-2")]
    assert errors == [
        "output failed (outputs, opening its outputs): see the server log",
        "output failed (LeakySink, sending a latent): see the server log",
    ]
    assert "47123" in caplog.text  # the detail is in the server's log


async def test_malformed_offers_get_400_with_a_clear_message(narrow_encoder, caplog):
    """Issue 21 item 12: deeply nested JSON (RecursionError), ``a=setup:x`` in the SDP
    (KeyError) and a bad ``a=candidate`` (AssertionError) got HTTP 500 and a traceback in the
    log. They are the client's mistakes: 400, saying what was wrong, nothing left behind."""
    async with running(narrow_encoder, Sinks()) as (server, http, client, pool):
        url = http.make_url("/api/offer")
        json_type = {"Content-Type": "application/json"}
        nested = b"[" * 100_000 + b"]" * 100_000
        async with client.post(url, data=nested, headers=json_type) as response:
            assert response.status == 400
            assert "expected JSON" in (await response.json())["error"]
        peer = Peer(Pattern())
        await peer.pc.setLocalDescription(await peer.pc.createOffer())
        sdp = peer.pc.localDescription.sdp
        await peer.close()
        assert "a=setup:" in sdp and "a=candidate:" in sdp
        lines = sdp.splitlines()
        setup = "\r\n".join("a=setup:x" if x.startswith("a=setup:") else x for x in lines)
        candidate = "\r\n".join(
            "a=candidate:1 1 udp" if x.startswith("a=candidate:") else x for x in lines
        )
        for bad in (setup + "\r\n", candidate + "\r\n"):
            async with client.post(url, json={"sdp": bad, "type": "offer"}) as response:
                body = await response.json()
                assert response.status == 400, body
                assert "the offer's SDP could not be read" in body["error"]
        assert server.sessions == {} and len(pool) == 0
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


@pytest.mark.network
async def test_finished_sessions_are_freed_beyond_a_bounded_history(narrow_encoder):
    """Issue 21 item 11: finished sessions were never freed (800 offers: RSS 295 -> 566 MB,
    568 dead sessions in /api/sessions). The newest ``history`` finished ones are kept; older
    ones are freed (counted, and gone from memory), however many come and go."""
    import gc
    import weakref

    async with running(narrow_encoder, Sinks(), first_frame_timeout=0.3) as (
        server,
        http,
        client,
        pool,
    ):
        server.history = 2
        kept = []
        for n in range(1, 7):
            peer = Peer(Pattern(silent=True))  # each session ends at its first-frame timeout
            status, body = await peer.connect(client, http)
            assert status == 200 and body["session"] == f"web-{n}"
            kept.append(weakref.ref(server.sessions[body["session"]]))
            await asyncio.wait_for(peer.ended.wait(), 30)
            await peer.close()
            await until(lambda n=n: server.forgotten == max(0, n - 2), 30, "the old ones freed")
            assert len(server.sessions) == min(n, 2)
        api = await (await client.get(http.make_url("/api/sessions"))).json()
        assert sorted(api) == ["web-5", "web-6"] and len(pool) == 0
        assert server.forgotten == 4 and server.forgotten_lost_output == 0
        gc.collect()
        assert [ref() is None for ref in kept] == [True] * 4 + [False] * 2  # freed, not kept


@pytest.mark.network
async def test_the_page_gets_the_round_trip_from_the_servers_decoder(narrow_encoder, monkeypatch):
    import io

    from PIL import Image

    from streamvae import StreamDecoder, narrow, random_decoder
    from streamvae.web import server as server_module

    monkeypatch.setattr(server_module, "ROUND_TRIP_QUEUE", 10_000)  # never behind: exact
    decoder = random_decoder(narrow(8), seed=0)
    sinks = Sinks()
    pool = StreamPool(narrow_encoder, max_streams=2)
    server = WebServer(pool, INFO, sinks, SessionSettings(size=(64, 64)), decoder=decoder)
    async with server, TestServer(server.app) as http, aiohttp.ClientSession() as client:
        peer = Peer(Pattern())
        status, _ = await peer.connect(client, http)
        assert status == 200
        await until(lambda: len(peer.of_type("decoded")) >= 3, 60, "3 decoded frames")
        peer.channel.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(peer.ended.wait(), 30)
        await peer.close()
    hello = peer.of_type("hello")[0]
    assert hello["decodes"] is True and hello["random_weights"] is True
    latents = sinks.by_stream["web-1"].latents
    decoded = peer.of_type("decoded")
    frames = 1 + 4 * (len(latents) - 1)
    assert peer.of_type("ended")[0]["decoded"] == {
        "latents": len(latents), "frames": frames, "restarts": 0, "skipped": 0, "error": None,
    }  # fmt: skip
    # Every latent decoded in order (all before "ended"); each message its latent's last frame.
    assert [m["latent"] for m in decoded] == [x.index for x in latents]
    assert [m["frame"] for m in decoded] == [0, *range(4, frames, 4)]
    assert all(m["exact"] for m in decoded) and decoded[-1]["count"] == frames
    # The pictures are StreamDecoder's frames of the latents the sinks got (JPEG: close).
    expected = {f.index: f.to_rgb() for f in StreamDecoder(decoder).push_many(latents)}
    for m in decoded:
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(m["jpeg"]))).convert("RGB"))
        assert (m["height"], m["width"]) == picture.shape[:2] == (64, 64)
        assert np.abs(picture.astype(int) - expected[m["frame"]].astype(int)).mean() < 12


async def test_a_decoder_that_falls_behind_restarts_at_the_next_latent():
    import torch

    from streamvae import Latent, narrow, random_decoder
    from streamvae.web import server as server_module

    latents = [
        Latent(data=torch.randn(16, 2, 2), index=i, frames=range(max(0, 4 * i - 3), 4 * i + 1))
        for i in range(6)
    ]
    sent: list[dict] = []

    class Session:
        id = "web-1"
        send = staticmethod(sent.append)

    trip = server_module._RoundTrip(random_decoder(narrow(8)), True, Session())  # type: ignore[arg-type]
    for latent in latents[:4]:  # taken as they come: nothing runs before the next await
        trip.offer(latent)
    trip.offer(latents[4])  # a 5th waiting, more than ROUND_TRIP_QUEUE: 0-3 go, 4 restarts it
    trip.offer(latents[5])
    await trip.finish()
    assert server_module.ROUND_TRIP_QUEUE == 4
    assert [m["latent"] for m in sent] == [4, 5]
    assert [m["frames"] for m in sent] == [1, 4]  # latent 4 decoded as a first latent
    assert not any(m["exact"] for m in sent)
    assert trip.numbers() == {"latents": 2, "frames": 5, "restarts": 1, "skipped": 4, "error": None}
