"""Limits: every violation is refused, on receipt with RemoteProtocolError naming the bad value."""

from __future__ import annotations

import re
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest

from meshai.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshai.protocol import FrameDecoder, Hello, Infer, Limits, Message, Result, encode
from meshai.protocol.framing import MAGIC, PREFIX

HELLO_F = {"node_id": "n", "protocol_version": 1, "role": "node", "capabilities": {}, "listen": ""}
INFER_F = {"request_id": 1, "deployment": "d", "reply_to": "", "meta": {}}


def raw_frame(
    head: Any,
    body: bytes = b"",
    *,
    magic: bytes = MAGIC,
    hlen: int | None = None,
    blen: int | None = None,
    header: bytes | None = None,
) -> bytes:
    """A frame built by hand, so that any field can be wrong."""
    if header is None:
        header = msgpack.packb(head, use_bin_type=True)
    return (
        PREFIX.pack(magic, len(header) if hlen is None else hlen, len(body) if blen is None else blen)
        + header
        + body
    )


def infer_frame(entries: Any, body: bytes = b"", **kw: Any) -> bytes:
    return raw_frame({"k": "infer", "f": INFER_F, "t": entries}, body, **kw)


def refused(data: bytes, pattern: str, limits: Limits | None = None) -> RemoteProtocolError:
    dec = FrameDecoder(limits or Limits())
    with pytest.raises(RemoteProtocolError, match=pattern) as info:
        dec.feed(data)
    # the decoder is dead afterwards
    with pytest.raises(RemoteProtocolError, match="dead"):
        dec.feed(b"")
    with pytest.raises(RemoteProtocolError, match="dead"):
        dec.get_buffer(-1)
    return info.value


def test_valid_hand_built_frames_decode() -> None:
    # the helpers build what encode builds, so the refusals below are about the one bad field
    assert FrameDecoder().feed(raw_frame({"k": "hello", "f": HELLO_F, "t": []})) == [
        Hello("n", 1, "node", {})
    ]
    arr = np.arange(6, dtype=np.float32)
    got = FrameDecoder().feed(infer_frame([["x", "<f4", [2, 3], 24]], arr.tobytes()))
    assert got == [Infer(1, "d", {"x": arr.reshape(2, 3)})]


def test_bad_magic() -> None:
    refused(raw_frame({}, magic=b"HTTP"), re.escape("bad frame magic b'HTTP'"))


def test_oversized_header() -> None:
    refused(raw_frame({}, hlen=5_000_000), "frame header of 5000000 bytes exceeds limit 1048576")


def test_empty_header() -> None:
    refused(raw_frame({}, header=b""), "header of 0 bytes")


def test_oversized_declared_body_is_refused_before_allocation() -> None:
    data = raw_frame({}, hlen=10, blen=2**40)[: PREFIX.size]
    tracemalloc.start()
    try:
        refused(data, f"body {2**40}.* exceeds limit {256 * 2**20}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_frame_limit_counts_header_and_body() -> None:
    limits = Limits(max_frame_bytes=2048, max_header_bytes=1024)
    refused(raw_frame({}, hlen=1000, blen=1033)[: PREFIX.size], "frame of 2049 bytes", limits)
    ok = encode(Infer(1, "d", {"x": np.zeros(400, np.uint8)}), limits)
    assert FrameDecoder(limits).feed(b"".join(bytes(p) for p in ok))


def test_too_many_tensors() -> None:
    entries = [[f"t{i}", "<f4", [0], 0] for i in range(65)]
    refused(infer_frame(entries), "65 tensors exceed limit 64")


def test_too_many_dims() -> None:
    refused(infer_frame([["x", "<f4", [1] * 9, 4]], b"\0" * 4), "'x': 9 dims exceed limit 8")


@pytest.mark.parametrize("dim", [-1, -(2**63), 1.0, True, "3", None, [2]])
def test_bad_dims(dim: Any) -> None:
    refused(infer_frame([["x", "<f4", [2, dim], 8]]), re.escape(f"dim {dim!r} is not a non-negative int"))


def test_dim_and_element_limits() -> None:
    refused(infer_frame([["x", "|u1", [0, 2**64 - 1], 0]]), f"dim {2**64 - 1} exceeds limit")
    refused(infer_frame([["x", "|u1", [2**15, 2**14], 2**29]]), f"{2**29} elements exceed limit {2**28}")
    small = Limits(max_elements=10)
    refused(infer_frame([["x", "|u1", [11], 11]], b"\0" * 11), "dim 11 exceeds limit 10", small)
    refused(infer_frame([["x", "|u1", [4, 3], 12]], b"\0" * 12), "12 elements exceed limit 10", small)


@pytest.mark.parametrize(
    "dtype", ["|O", ">f4", "f4", "=f4", "float32", "<U4", "|V8", "<c8", "<M8[s]", 5, None]
)
def test_bad_dtypes(dtype: Any) -> None:
    refused(infer_frame([["x", dtype, [1], 4]], b"\0" * 4), re.escape(f"dtype {dtype!r} is not allowed"))


def test_dtype_not_allowed_by_limits() -> None:
    limits = Limits(allowed_dtypes=frozenset({"float32"}))
    refused(infer_frame([["x", "|i1", [1], 1]], b"\0"), "dtype '|i1' is not allowed", limits)
    with pytest.raises(LocalProtocolError, match="int8 is not allowed"):
        encode(Infer(1, "d", {"x": np.zeros(1, np.int8)}), limits)


def test_nbytes_mismatch() -> None:
    refused(
        infer_frame([["x", "<f4", [3], 11]], b"\0" * 11), re.escape("'x': nbytes 11 != 3 elements * 4 bytes")
    )
    refused(infer_frame([["x", "<f4", [3], "12"]], b"\0" * 12), re.escape("nbytes '12'"))


def test_body_length_must_equal_buffers() -> None:
    refused(
        infer_frame([["x", "<f4", [3], 12]], b"\0" * 16), "frame body of 16 bytes does not match .* 12 bytes"
    )
    refused(
        infer_frame([["x", "<f4", [3], 12]], b"\0" * 8), "frame body of 8 bytes does not match .* 12 bytes"
    )


def test_bad_tensor_entries() -> None:
    refused(infer_frame([["x", "<f4", [1]]]), "tensor entry must be")
    refused(infer_frame("x"), "tensor list must be an array")
    refused(infer_frame([["", "<f4", [0], 0]]), "non-empty str")
    refused(infer_frame([[b"x", "<f4", [0], 0]]), "non-empty str, got b'x'")
    refused(infer_frame([["x", "<f4", [0], 0], ["x", "<f4", [0], 0]]), "duplicate tensor name 'x'")
    refused(infer_frame([["x", "<f4", 3, 12]], b"\0" * 12), "dims must be an array, got 3")
    refused(
        raw_frame({"k": "hello", "f": HELLO_F, "t": [["x", "<f4", [0], 0]]}), "'hello' carries no tensors"
    )


def test_bool_tensors_hold_only_zero_and_one() -> None:
    refused(infer_frame([["m", "|b1", [3], 3]], b"\x00\x01\x02"), "'m': bool tensor")


def test_unknown_kind() -> None:
    refused(raw_frame({"k": "nope", "f": {}, "t": []}), "unknown message kind 'nope'")
    refused(raw_frame({"k": 3, "f": {}, "t": []}), "unknown message kind 3")


def test_missing_extra_and_mistyped_fields() -> None:
    f = {k: v for k, v in HELLO_F.items() if k != "role"}
    refused(raw_frame({"k": "hello", "f": f, "t": []}), re.escape("missing ['role']"))
    refused(raw_frame({"k": "hello", "f": {**HELLO_F, "zzz": 1}, "t": []}), re.escape("unexpected ['zzz']"))
    refused(
        raw_frame({"k": "hello", "f": {**HELLO_F, "protocol_version": "1"}, "t": []}), "protocol_version.*'1'"
    )
    refused(raw_frame({"k": "hello", "f": {**HELLO_F, "capabilities": {b"k": 1}}, "t": []}), "key.*b'k'")
    refused(raw_frame({"k": "hello", "f": [1], "t": []}), "fields must be a map")
    refused(raw_frame({"k": "heartbeat", "f": {"seq": 1, "sent_at": None}, "t": []}), "sent_at")


def test_header_shape() -> None:
    refused(raw_frame([1, 2]), "header must be a map, got list")
    refused(raw_frame({"k": "hello", "f": HELLO_F}), "header keys")
    refused(raw_frame({"k": "hello", "f": HELLO_F, "t": [], "x": 1}), "header keys")
    refused(raw_frame({}, header=msgpack.packb({}) + b"\x00"), "ExtraData")
    refused(raw_frame({}, header=b"\xa2\xff\xfe"), "UnicodeDecodeError")
    refused(raw_frame({}, header=b"\xc1"), "bad frame header")
    refused(raw_frame({}, header=b"\x91" * 5000), "bad frame header")


def test_ext_types_are_refused() -> None:
    for ext in (msgpack.ExtType(5, b"abc"), msgpack.ExtType(5, b""), msgpack.Timestamp(1, 0)):
        head = {"k": "control", "f": {"op": "x", "body": {"e": ext}}, "t": []}
        refused(raw_frame(head), "ext")


def test_non_str_map_keys_are_refused() -> None:
    refused(raw_frame({1: "hello"}), "int is not allowed for map key")
    refused(raw_frame({"k": "control", "f": {"op": "x", "body": {1.5: 1}}, "t": []}), "float is not allowed")
    refused(raw_frame({"k": "control", "f": {"op": "x", "body": {b"b": 1}}, "t": []}), "key.*b'b'")


def test_msgpack_length_caps() -> None:
    limits = Limits(max_str_len=10, max_bin_len=10, max_array_len=10, max_map_len=10)

    def control(body: Any) -> bytes:
        return raw_frame({"k": "control", "f": {"op": "x", "body": body}, "t": []})

    refused(control({"s": "a" * 11}), re.escape("11 exceeds max_str_len(10)"), limits)
    refused(control({"s": b"a" * 11}), re.escape("11 exceeds max_bin_len(10)"), limits)
    refused(control({"s": [0] * 11}), re.escape("11 exceeds max_array_len(10)"), limits)
    refused(control({str(i): 0 for i in range(11)}), re.escape("11 exceeds max_map_len(10)"), limits)
    # a tiny header that declares a huge array is refused before msgpack allocates it
    refused(raw_frame({}, header=b"\xdd\xff\xff\xff\xff"), "4294967295 exceeds max_array_len")
    refused(raw_frame({}, header=b"\xdf\xff\xff\xff\xff"), "4294967295 exceeds max_map_len")


def test_deploy_body_fields() -> None:
    f = {
        "deployment": "d",
        "stage_id": 0,
        "sha256": "0" * 64,
        "inputs": [],
        "outputs": [],
        "routes": {},
        "entry": False,
        "package": "",
        "cut_inputs": [],
        "cut_outputs": [],
        "options": {},
    }
    ok = raw_frame({"k": "deploy", "f": f, "t": [], "b": [["model", 3]]}, b"abc")
    assert len(FrameDecoder().feed(ok)) == 1
    refused(raw_frame({"k": "deploy", "f": f, "t": []}, b"abc"), re.escape("must name ['model']"))
    refused(raw_frame({"k": "deploy", "f": f, "t": [], "b": [["pkg", 3]]}, b"abc"), "must be \\['model'")
    refused(raw_frame({"k": "deploy", "f": f, "t": [], "b": [["model", 9]]}, b"abc"), "nbytes 9 is not in")
    refused(raw_frame({"k": "deploy", "f": f, "t": [], "b": [["model", -1]]}, b"abc"), "nbytes -1")
    refused(raw_frame({"k": "hello", "f": HELLO_F, "t": [], "b": [["model", 0]]}), "must name \\[\\]")
    refused(
        raw_frame({"k": "deploy", "f": {**f, "sha256": "x"}, "t": [], "b": [["model", 3]]}, b"abc"), "sha256"
    )


def test_truncated_frames_wait_for_more_data() -> None:
    data = b"".join(bytes(p) for p in encode(Result(1, "d", {"y": np.arange(10, dtype=np.int32)})))
    for cut in range(len(data)):
        dec = FrameDecoder()
        assert dec.feed(data[:cut]) == []
        assert dec.idle == (cut == 0)
        assert len(dec.feed(data[cut:])) == 1


def test_garbage() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        junk = rng.integers(0, 256, size=int(rng.integers(16, 200)), dtype=np.uint8).tobytes()
        if junk[:4] == MAGIC:
            continue
        refused(junk, "bad frame magic")
    refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", re.escape("bad frame magic b'GET '"))
    # good frame, then garbage: the message is not delivered with the error, the error is raised
    good = b"".join(bytes(p) for p in encode(Hello("n", 1, "node", {})))
    dec = FrameDecoder()
    assert len(dec.feed(good)) == 1
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"x" * 16)


def test_buffered_path_enforces_limits_too() -> None:
    dec = FrameDecoder()
    data = raw_frame({}, hlen=5_000_000)
    buf = dec.get_buffer(-1)
    buf[: len(data)] = data
    with pytest.raises(RemoteProtocolError, match="5000000"):
        dec.buffer_updated(len(data))
    with pytest.raises(RemoteProtocolError, match="dead"):
        dec.buffer_updated(0)


# ----- encoding refuses what the peer would refuse


def _hello(caps: dict[str, Any]) -> Message:
    return Hello("n", 1, "node", caps)


@pytest.mark.parametrize(
    "msg,limits,pattern",
    [
        (Infer(1, "d", {f"t{i}": np.zeros(1) for i in range(65)}), Limits(), "65 tensors exceed limit 64"),
        (Infer(1, "d", {"x": np.zeros([1] * 9)}), Limits(), "9 dims exceed limit 8"),
        (
            Infer(1, "d", {"x": np.zeros(11, np.uint8)}),
            Limits(max_elements=10),
            "11 elements exceed limit 10",
        ),
        (Infer(1, "d", {"x": np.array([None])}), Limits(), "dtype object is not allowed"),
        (Infer(1, "d", {"x": np.array(["a"])}), Limits(), "dtype <U1 is not allowed"),
        (Infer(1, "d", {"x": np.zeros(2, ">f4")}), Limits(), "big-endian dtype '>f4'"),
        (Infer(1, "d", {"x": np.zeros(2, np.complex64)}), Limits(), "complex64 is not allowed"),
        (
            Infer(1, "d", {"x": np.zeros(2000, np.uint8)}),
            Limits(max_frame_bytes=2048, max_header_bytes=96),
            "frame of",
        ),
        (_hello({"x": "a" * 5000}), Limits(), "5000 exceeds max_str_len"),
        (_hello({"x": list(range(20))}), Limits(max_array_len=10), "exceeds max_array_len"),
        (_hello({"x": b"b" * 2000}), Limits(max_header_bytes=1024), "frame header of .* exceeds limit 1024"),
    ],
)
def test_encode_refuses(msg: Message, limits: Limits, pattern: str) -> None:
    with pytest.raises(LocalProtocolError, match=pattern):
        encode(msg, limits)


def test_encode_refuses_foreign_types() -> None:
    with pytest.raises(LocalProtocolError, match="not a registered message type"):
        encode(Message())


@pytest.mark.parametrize(
    "kw",
    [
        {"max_frame_bytes": 0},
        {"max_tensors": -1},
        {"max_dims": True},
        {"max_str_len": 1.5},
        {"allowed_dtypes": frozenset({"complex64"})},
        {"allowed_dtypes": {"float32"}},
        {"max_frame_bytes": 100, "max_header_bytes": 100},
    ],
)
def test_limits_are_validated(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Limits(**kw)
