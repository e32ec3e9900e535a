"""The wire format: exact round trips, and refusal of anything that is not a latent (issue 7 §4)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvae import Latent
from streamvae.io.wire import (
    CONTENT_TYPE,
    MAX_HEADER_BYTES,
    WIRE_FORMAT,
    WireError,
    decode_latent,
    encode_latent,
)


def make_latent(index: int = 3, h: int = 4, w: int = 6, gap: bool = False) -> Latent:
    data = torch.randn(16, h, w, generator=torch.Generator().manual_seed(index))
    frames = range(0, 1) if index == 0 else range(4 * index - 3, 4 * index + 1)
    stamps = tuple(1_700_000_000.0 + 0.04 * f for f in frames)
    return Latent(data, index, frames, stamps, ready_time=1_700_000_001.25, gap=gap)


def test_round_trip_is_exact_with_all_fields():
    latent = make_latent(gap=True)
    latent = Latent(**{**latent.__dict__, "timestamps": (None, 1.5, 2.5, None), "padded": 2})
    payload = encode_latent(latent, {"stream": "cam1", "model": "Wan2.1_VAE.pth"})
    decoded = decode_latent(payload)
    assert torch.equal(decoded.data, latent.data)
    assert decoded.data.dtype == torch.float32
    assert (decoded.index, decoded.frames, decoded.timestamps) == (
        3,
        range(9, 13),
        (None, 1.5, 2.5, None),
    )
    assert (decoded.ready_time, decoded.padded, decoded.gap) == (latent.ready_time, 2, True)
    assert decoded.meta == {"stream": "cam1", "model": "Wan2.1_VAE.pth"}
    assert CONTENT_TYPE.endswith("+safetensors")


def test_payload_is_a_plain_safetensors_file(tmp_path: Path):
    """Any safetensors reader opens it: one tensor ``latent`` and string metadata."""
    path = tmp_path / "one.safetensors"
    path.write_bytes(encode_latent(make_latent(), {"stream": "cam1"}))
    with safetensors.safe_open(str(path), "pt") as file:
        assert list(file.keys()) == ["latent"]
        assert file.get_tensor("latent").shape == (16, 4, 6)
        meta = file.metadata()
    assert meta["format"] == WIRE_FORMAT and meta["stream"] == "cam1" and meta["frames"] == "9:13"


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_storage_dtypes(dtype: str, tolerance: float):
    latent = make_latent()
    payload = encode_latent(latent, dtype=dtype)
    assert len(payload) < len(encode_latent(latent)) - 16 * 4 * 6
    decoded = decode_latent(payload)
    assert decoded.data.dtype == torch.float32
    assert torch.allclose(decoded.data, latent.data, rtol=tolerance, atol=tolerance)


def test_labels_cannot_override_the_format_keys():
    with pytest.raises(ValueError, match="own keys"):
        encode_latent(make_latent(), {"index": "0"})
    with pytest.raises(TypeError):
        encode_latent(make_latent(), {"stream": 1})  # type: ignore[dict-item]


def _payload_with_header(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _valid_parts() -> tuple[dict, bytes]:
    payload = encode_latent(make_latent())
    size = struct.unpack("<Q", payload[:8])[0]
    return json.loads(payload[8 : 8 + size]), payload[8 + size :]


class Boom:
    """A pickle that would write a file if it were ever unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def _hostile_payloads(tmp_path: Path) -> dict[str, bytes]:
    header, data = _valid_parts()
    valid = encode_latent(make_latent())

    def edited(**changes) -> bytes:
        new = json.loads(json.dumps(header))
        for key, value in changes.items():
            if key == "meta":
                new["__metadata__"].update(value)
            else:
                new["latent"][key] = value
        return _payload_with_header(new, data)

    extra = dict(header, other=dict(header["latent"]))
    no_meta = {k: v for k, v in header.items() if k != "__metadata__"}
    deep = b"[" * 50_000 + b"]" * 50_000
    return {
        "empty": b"",
        "seven bytes": valid[:7],
        "truncated header": valid[:40],
        "truncated data": valid[:-1],
        "one byte too many": valid + b"\0",
        "header length 2**63": struct.pack("<Q", 2**63) + valid[8:],
        "header over the limit": _payload_with_header(None, raw=b" " * (MAX_HEADER_BYTES + 1)),
        "header not json": _payload_with_header(None, raw=b"\xff\xfe{not json"),
        "header a list": _payload_with_header([1, 2, 3]),
        "deeply nested header": _payload_with_header(None, raw=deep[: MAX_HEADER_BYTES - 2]),
        "a pickle": pickle.dumps(Boom(tmp_path / "pwned.txt")),
        "a torch.save file": _torch_save_bytes(tmp_path),
        "two tensors": _payload_with_header(extra, data + data),
        "wrong tensor name": _payload_with_header(
            {"x": header["latent"], "__metadata__": header["__metadata__"]}, data
        ),
        "no metadata": _payload_with_header(no_meta, data),
        "dtype F64": edited(dtype="F64"),
        "dtype object": edited(dtype="O"),
        "shape rank 4": edited(shape=[1, 16, 4, 6]),
        "negative shape": edited(shape=[16, -4, -6]),
        "huge shape": edited(shape=[16, 2**31, 2**31]),
        "offsets past the end": edited(data_offsets=[0, 2**40]),
        "offsets mismatch": edited(data_offsets=[4, 16 * 4 * 6 * 4 + 4]),
        "metadata not strings": _payload_with_header(dict(header, __metadata__={"index": 1}), data),
        "wrong format": edited(meta={"format": "something/else"}),
        "bad index": edited(meta={"index": "-1"}),
        "bad frames": edited(meta={"frames": "9"}),
        "bad timestamps": edited(meta={"timestamps": '["now"]'}),
        "nan ready time": edited(meta={"ready_time": "nan"}),
        "a 400-digit timestamp": edited(meta={"timestamps": "[" + "9" * 400 + "]"}),
        "a 400-digit index": edited(meta={"index": "9" * 400}),
        "an infinite timestamp": edited(meta={"timestamps": "[1e999]"}),
        "a boolean timestamp": edited(meta={"timestamps": "[true]"}),
        "bad gap": edited(meta={"gap": "maybe"}),
    }


def _torch_save_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "tensor.pt"
    torch.save({"latent": torch.zeros(16, 4, 6)}, path)
    return path.read_bytes()


def test_hostile_and_broken_payloads_are_refused(tmp_path: Path):
    for name, payload in _hostile_payloads(tmp_path).items():
        with pytest.raises(WireError):
            decode_latent(payload)
            pytest.fail(f"{name}: accepted")
    assert not (tmp_path / "pwned.txt").exists()


def test_payload_size_limit():
    payload = encode_latent(make_latent(h=32, w=32))
    assert decode_latent(payload, max_bytes=len(payload)).index == 3
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_latent(payload, max_bytes=len(payload) - 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
)
def test_mangled_payloads_raise_only_wire_error(cut: int, flips: list[tuple[int, int]]):
    payload = bytearray(encode_latent(make_latent(index=1, h=2, w=3), {"stream": "s"}))
    for position, value in flips:
        payload[position % len(payload)] = value
    payload = payload[: len(payload) - cut % len(payload)] if cut else payload
    try:
        latent = decode_latent(bytes(payload))
    except WireError:
        return
    assert latent.data.shape == (16, 2, 3)  # a flip in the tensor data or a harmless place


def hostile_overflow_payload() -> bytes:
    """A valid latent whose timestamps hold a 400-digit integer: ``math.isfinite`` overflows."""
    header, data = _valid_parts()
    header["__metadata__"]["timestamps"] = "[" + "9" * 400 + "]"
    return _payload_with_header(header, data)


def test_a_huge_integer_timestamp_is_a_wire_error_not_an_overflow():
    """Issue 17 item 1: it raised OverflowError, which ended every LatentSubscriber."""
    with pytest.raises(WireError, match="timestamps"):
        decode_latent(hostile_overflow_payload())


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(["index", "frames", "timestamps", "ready_time", "padded", "gap"]),
    value=_json_values | st.text(max_size=40),
)
def test_any_metadata_value_is_accepted_or_a_wire_error(key: str, value: object):
    """Issue 17 item 1: every decode failure is a WireError, whatever a metadata value holds."""
    header, data = _valid_parts()
    header["__metadata__"][key] = value if isinstance(value, str) else json.dumps(value)
    try:
        latent = decode_latent(_payload_with_header(header, data))
    except WireError:
        return
    assert latent.data.shape == (16, 4, 6)


def test_source_numbers_and_drops_travel_and_old_payloads_still_decode():
    """Issue 17 item 6: the source's frame numbers and the drop count are in the metadata."""
    latent = Latent(
        torch.zeros(16, 2, 2), 2, range(5, 9), source_frames=(9, 10, None, 12), dropped_before=4
    )
    decoded = decode_latent(encode_latent(latent))
    assert (decoded.source_frames, decoded.dropped_before) == ((9, 10, None, 12), 4)
    header, data = _valid_parts()
    for key in ("source_frames", "dropped_before"):
        del header["__metadata__"][key]  # a payload from before these keys existed
    old = decode_latent(_payload_with_header(header, data))
    assert (old.source_frames, old.dropped_before) == ((), 0)
    with pytest.raises(ValueError, match="labels may not use"):
        encode_latent(latent, {"dropped_before": "0"})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_latents_are_never_sent_nor_accepted(dtype: str):
    """Issue 17 (lesser): latents were never checked for NaN/inf (a float16 overflow)."""
    big = Latent(torch.full((16, 2, 2), 70_000.0), 1, range(1, 5))
    if dtype == "float16":
        with pytest.raises(ValueError, match=r"latent 1 has 64 NaN or infinite.*float16 overflows"):
            encode_latent(big, dtype=dtype)
    else:
        assert decode_latent(encode_latent(big, dtype=dtype)).data.max() >= 69_000
    nan = Latent(
        torch.zeros(16, 2, 2).index_fill_(1, torch.tensor([0]), float("nan")), 1, range(1, 5)
    )
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_latent(nan, dtype=dtype)
    header, _ = _valid_parts()
    raw = torch.zeros(16, 4, 6)
    raw[3, 2, 1] = float("inf")
    with pytest.raises(WireError, match="NaN or infinite"):
        decode_latent(_payload_with_header(header, raw.numpy().tobytes()))


def test_approximate_flag_round_trips_and_is_absent_otherwise():
    from streamvae import Latent
    from streamvae.io.wire import decode_latent, encode_latent

    exact = Latent(torch.zeros(16, 2, 2), index=3, frames=range(9, 13))
    payload = encode_latent(exact)
    assert b"approximate" not in payload[:2000] and not decode_latent(payload).approximate
    flagged = decode_latent(encode_latent(Latent(exact.data, 3, exact.frames, approximate=True)))
    assert flagged.approximate and "approximate" not in flagged.meta
