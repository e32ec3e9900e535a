"""The fleet's pieces without a server: frame messages, NATS settings, names, replay arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from streamvae.fleet import FrameMessageError, NatsSettings, decode_frame, encode_frame, group_start
from streamvae.fleet.ingest import ingest, minimum_retain
from streamvae.fleet.messages import end_headers, is_end
from streamvae.fleet.names import frames_subject, validate_fleet_id
from streamvae.fleet.worker import WorkerOptions
from streamvae.io.sources import synthetic_frame

IMAGE = synthetic_frame(3, 16, 24)


@pytest.mark.parametrize("codec", ["raw", "png", "jpeg"])
def test_frames_round_trip(codec):
    payload, headers = encode_frame(
        IMAGE, index=7, run="r", timestamp=1.5, codec=codec, stream_id="c"
    )
    frame = decode_frame(headers, payload, size=(16, 24))
    assert (frame.index, frame.run, frame.timestamp) == (7, "r", 1.5)
    assert headers["Nats-Msg-Id"] == "c:r:7"
    if codec == "jpeg":  # lossy, but the same bytes always decode to the same frame (replays)
        assert frame.image.shape == IMAGE.shape
        assert np.array_equal(decode_frame(headers, payload).image, frame.image)
    else:
        assert np.array_equal(frame.image, IMAGE)


def test_bad_frame_messages_are_refused_with_the_reason():
    payload, headers = encode_frame(
        IMAGE, index=1, run="r", timestamp=None, codec="png", stream_id="c"
    )
    cases = [
        ({**headers, "Svae-Codec": "webp"}, payload, "unknown frame codec 'webp'"),
        (headers, b"garbage", "does not decode"),
        (
            {**headers, "Svae-Size": "8x8"},
            payload,
            "declares 16x24 in its image header, its message header says 8x8",
        ),
        (
            {k: v for k, v in headers.items() if k != "Svae-Index"},
            payload,
            "lacks the header Svae-Index",
        ),
        ({**headers, "Svae-Index": "-1"}, payload, "out of range"),
        ({**headers, "Svae-Codec": "raw"}, payload, "a 16x24 RGB frame 1152"),
    ]
    for bad_headers, bad_payload, message in cases:
        with pytest.raises(FrameMessageError, match=message):
            decode_frame(bad_headers, bad_payload)
    with pytest.raises(FrameMessageError, match="this stream's frames are 32x32"):
        decode_frame(headers, payload, size=(32, 32))
    with pytest.raises(ValueError, match="frame codec must be one of"):
        encode_frame(IMAGE, index=0, run="r", timestamp=None, codec="gif", stream_id="c")


def test_end_marker():
    headers = end_headers(run="r", frames=10, stream_id="c")
    assert is_end(headers) and not is_end({"Svae-Index": "1"}) and not is_end(None)


def test_nats_settings_keep_the_password_out_of_urls(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMVAE_NATS_PASSWORD", "pw-env")
    settings = NatsSettings.from_url("nats://fleet@a:4222,b")
    assert settings.servers == ("nats://a:4222", "nats://b:4222")
    assert settings.password == "pw-env" and "pw-env" not in repr(settings) + settings.display
    file = tmp_path / "pw"
    file.write_text("pw-file\nignored\n")
    assert NatsSettings.from_url("nats://u@h", password_file=file).password == "pw-file"
    with pytest.raises(ValueError, match="refusing a password inside the NATS URL"):
        NatsSettings.from_url("nats://u:secret@h:4222")
    with pytest.raises(ValueError, match="starts with nats://"):
        NatsSettings.from_url("http://h:4222")
    with pytest.raises(FileNotFoundError, match="credentials file"):
        NatsSettings.from_url("nats://h", creds_file=str(tmp_path / "missing.creds"))
    assert (
        NatsSettings.from_url("nats://u@h", password_file=file).redact("x pw-file y") == "x *** y"
    )


def test_ids_are_one_subject_token():
    assert frames_subject("cam-1") == "svae.frames.cam-1"
    for bad in ("cam.1", "cam*", ">", "", "a b", "x" * 65):
        with pytest.raises(ValueError, match="one NATS subject token"):
            validate_fleet_id(bad)


def test_replay_start_holds_last_frame_minus_r_plus_1():
    r = 113
    for last in (0, 10, 29, 30, 33, 100):
        start = group_start(4 * last - r + 1)
        assert start == 0 or (start - 1) % 4 == 0
        assert start <= max(0, 4 * last - r + 1) < start + 4 or start == 0
    assert minimum_retain() == r + 8


def test_worker_options_are_checked():
    with pytest.raises(ValueError, match="capacity"):
        WorkerOptions(capacity=0, worker_id="w")
    with pytest.raises(ValueError, match="lease_ttl"):
        WorkerOptions(capacity=1, worker_id="w", lease_ttl=0.01)
    with pytest.raises(ValueError, match="worker id"):
        WorkerOptions(capacity=1, worker_id="w.1")
    with pytest.raises(ValueError, match="somewhere to publish"):
        WorkerOptions(capacity=1, worker_id="w", jetstream_latents=False)


async def test_ingest_refuses_a_retention_below_r_plus_8():
    with pytest.raises(ValueError, match="at least R \\+ 8 = 121"):
        await ingest([], NatsSettings.from_url("nats://127.0.0.1:1"), stream_id="c", retain=100)


@pytest.mark.parametrize(
    "name", ["streamvae.fleet.broker", "streamvae.fleet.messages", "streamvae.fleet.worker"]
)
def test_docstring_examples(name):
    """Each module's examples run (``streamvae.fleet.names`` has none: not listed)."""
    import doctest
    import importlib

    results = doctest.testmod(importlib.import_module(name))
    assert results.attempted > 0 and results.failed == 0
