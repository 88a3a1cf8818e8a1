"""Messages: validation, and encode -> decode round trips through both decoder paths."""

from __future__ import annotations

import hashlib
import random
import zlib
from typing import Any

import numpy as np
import pytest

from meshai.errors import LocalProtocolError, RemoteProtocolError
from meshai.protocol import (
    DTYPES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Control,
    ControlReply,
    Deploy,
    Deployed,
    Error,
    FrameDecoder,
    Goodbye,
    Heartbeat,
    Hello,
    Infer,
    Limits,
    Message,
    Result,
    Undeploy,
    Upload,
    Uploaded,
    encode,
    messages,
)
from meshai.protocol.framing import DIRECT_MIN

MODEL = b"\x08\x07onnx-bytes" * 100


def frame(msg: Message, limits: Limits | None = None) -> bytes:
    return b"".join(bytes(p) for p in encode(msg, limits or Limits()))


def decode_fed(data: bytes, rng: random.Random, max_chunk: int = 64) -> list[Message]:
    """Feed ``data`` in random chunks through ``FrameDecoder.feed``."""
    dec = FrameDecoder()
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_chunk)
        out += dec.feed(data[pos : pos + n])
        pos += n
    assert dec.idle
    return out


def decode_buffered(
    data: bytes, rng: random.Random, max_chunk: int = 64, handed: list[memoryview] | None = None
) -> list[Message]:
    """Simulate a socket: copy random-size chunks into the buffers ``get_buffer`` hands out."""
    dec = FrameDecoder()
    out: list[Message] = []
    src = memoryview(data)
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer(-1)
        assert len(buf) > 0
        if handed is not None:
            handed.append(buf)
        n = min(len(buf), rng.randint(1, max_chunk), len(data) - pos)
        buf[:n] = src[pos : pos + n]
        pos += n
        out += dec.buffer_updated(n)
    assert dec.idle
    return out


def round_trip(msg: Message, seed: int = 0, max_chunk: int = 64) -> None:
    data = frame(msg)
    for decode in (decode_fed, decode_buffered):
        got = decode(data, random.Random(seed), max_chunk)
        assert got == [msg], decode.__name__
        assert type(got[0]) is type(msg)


def sample_messages() -> list[Message]:
    rng = np.random.default_rng(1)
    t: dict[str, np.ndarray[Any, Any]] = {
        "x": rng.standard_normal((2, 3)).astype(np.float32),
        "ids": np.arange(5, dtype=np.int64),
    }
    return [
        Hello(
            "n0", PROTOCOL_VERSION, "node", {"accel": "cpu", "cores": 2, "mem": 1.5, "ops": ["Conv"]}, "h:1"
        ),
        Hello("cli", PROTOCOL_VERSION, "client", {}),
        Deploy(
            "dep1",
            0,
            MODEL,
            hashlib.sha256(MODEL).hexdigest(),
            ("input",),
            ("a", "b"),
            {"a": ("n1",), "b": ("caller", "n2")},
            entry=True,
            options={"providers": ["CPUExecutionProvider"], "threads": 1, "raw": b"\x00\x01", "none": None},
        ),
        Deploy(
            "dep1",
            3,
            b"",
            "",
            ("a",),
            ("y",),
            {},
            package="pkg://dep1@sha",
            cut_inputs=("a",),
            cut_outputs=("y",),
        ),
        Deployed("dep1", 0, True),
        Deployed("dep1", 1, False, "onnxruntime failed: bad op"),
        Undeploy("dep1"),
        Upload("model@1.2.0", bytes(range(256)) * 10),
        Uploaded("model@1.2.0", False, "signature does not verify"),
        Infer(1, "dep1", t),
        Infer(2**64 - 1, "dep1", {}, reply_to="caller"),
        Result(7, "dep1", t),
        Result(8, "dep1", {}),
        Error(None, "bad_frame", "header too large"),
        Error(3, "stage_failed", "stage 1 on n1: shape mismatch", deployment="dep1"),
        Heartbeat(0, 0.0),
        Heartbeat(123, 1.7e9 + 0.25),
        Goodbye(),
        Goodbye("shutting down"),
        Control("list_deployments", {}),
        Control("stats", {"nested": {"a": [1, 2, {"b": -(2**63)}], "f": -0.5, "t": True}}),
        ControlReply("list_deployments", True, {"deployments": ["dep1"]}),
        ControlReply("stats", False, {"error": "unknown op"}),
    ]


def test_every_kind_is_sampled() -> None:
    assert {type(m) for m in sample_messages()} == set(MESSAGE_TYPES.values())
    assert len(set(MESSAGE_TYPES)) == len(MESSAGE_TYPES) == 13
    assert all(kind == cls.KIND for kind, cls in MESSAGE_TYPES.items())


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_every_message(msg: Message) -> None:
    round_trip(msg)
    round_trip(msg, seed=5, max_chunk=3)


def _random_array(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return np.asarray(rng.integers(0, 2, size=shape).astype(bool))
    if dt.kind == "f":
        return np.asarray((rng.standard_normal(shape) * 100).astype(dt))
    info = np.iinfo(dt)
    return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 5)])
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{dtype}{shape}".encode()))
    arr = _random_array(dtype, shape, rng)
    msg = Infer(3, "d", {"t": arr, "other": np.float32(2.5) * np.ones(3, np.float32)})
    round_trip(msg, max_chunk=17)
    got = FrameDecoder().feed(frame(msg))[0]
    assert isinstance(got, Infer)
    assert got.tensors["t"].dtype == np.dtype(dtype)
    assert got.tensors["t"].shape == shape
    assert got.tensors["t"].flags.c_contiguous


def test_float_special_values_survive() -> None:
    arr = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    got = FrameDecoder().feed(frame(Result(1, "d", {"y": arr})))[0]
    assert isinstance(got, Result)
    assert got.tensors["y"].tobytes() == arr.tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[:, 1:3],
        lambda a: a[::-1],
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["step", "transpose", "fortran", "slice", "reversed", "broadcast"],
)
def test_non_contiguous_inputs(make: Any) -> None:
    base = np.arange(40, dtype=np.float32).reshape(8, 5)
    arr = make(base)
    msg = Infer(1, "d", {"x": arr})
    round_trip(msg)
    pieces = encode(msg)
    assert len(pieces) == 2
    assert isinstance(pieces[1], memoryview) and pieces[1].nbytes == arr.nbytes


def test_encode_sends_contiguous_arrays_without_copying() -> None:
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
    raw = b"m" * 5000
    cases: list[tuple[Message, Any]] = [
        (Infer(1, "d", {"x": arr}), arr),
        (Deploy("d", 0, raw, hashlib.sha256(raw).hexdigest(), (), (), {}), raw),
    ]
    for msg, source in cases:
        pieces = encode(msg)
        assert isinstance(pieces[0], bytes)
        assert isinstance(pieces[1], memoryview)
        view = np.frombuffer(pieces[1], dtype=np.uint8)
        assert np.shares_memory(view, np.frombuffer(source, dtype=np.uint8))


def test_large_tensor_goes_straight_into_its_array() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal(8 * 1024 * 1024, dtype=np.float32).reshape(2048, 4096)  # 32 MiB
    msg = Result(9, "d", {"big": big, "small": np.ones(3, np.int8)})
    data = frame(msg)
    handed: list[memoryview] = []
    got = decode_buffered(data, random.Random(1), max_chunk=256 * 1024, handed=handed)
    assert got == [msg]
    result = got[0]
    assert isinstance(result, Result)
    out = result.tensors["big"]
    direct = [b for b in handed if np.shares_memory(np.frombuffer(b, dtype=np.uint8), out)]
    # all but the bytes that arrived with the header (at most one scratch buffer) land in place
    assert sum(len(b) for b in direct) >= big.nbytes - 64 * 1024
    assert all(len(b) >= DIRECT_MIN for b in direct)
    assert decode_fed(data, random.Random(2), max_chunk=1 << 20) == [msg]


def test_many_frames_in_one_chunk_and_split_anywhere() -> None:
    msgs = sample_messages()
    data = b"".join(frame(m) for m in msgs)
    assert FrameDecoder().feed(data) == msgs
    for seed in range(5):
        assert decode_fed(data, random.Random(seed), max_chunk=200) == msgs
        assert decode_buffered(data, random.Random(seed), max_chunk=200) == msgs
    dec = FrameDecoder()
    got: list[Message] = []
    for i in range(len(data)):  # one byte at a time
        got += dec.feed(data[i : i + 1])
    assert got == msgs


def test_feed_accepts_bytearray_and_memoryview() -> None:
    msg = Infer(1, "d", {"x": np.ones((2, 2), np.uint16)})
    data = frame(msg)
    assert FrameDecoder().feed(bytearray(data)) == [msg]
    assert FrameDecoder().feed(memoryview(data)) == [msg]
    assert FrameDecoder().feed(np.frombuffer(data, dtype=np.uint8).data) == [msg]


def test_buffer_updated_must_match_the_handed_buffer() -> None:
    dec = FrameDecoder()
    with pytest.raises(LocalProtocolError, match="buffer_updated"):
        dec.buffer_updated(1)
    buf = dec.get_buffer(-1)
    with pytest.raises(LocalProtocolError, match="buffer_updated"):
        dec.buffer_updated(len(buf) + 1)


def test_messages_equality_and_immutability() -> None:
    a = Infer(1, "d", {"x": np.zeros(3, np.float32)})
    assert a == Infer(1, "d", {"x": np.zeros(3, np.float32)})
    assert a != Infer(1, "d", {"x": np.zeros(3, np.float64)})
    assert a != Infer(1, "d", {"x": np.zeros((1, 3), np.float32)})
    assert a != Infer(1, "d", {"y": np.zeros(3, np.float32)})
    assert a != Result(1, "d", {"x": np.zeros(3, np.float32)})
    with pytest.raises(AttributeError):
        a.request_id = 2  # type: ignore[misc]
    tensors = {"x": np.zeros(1)}
    b = Result(1, "d", tensors)
    tensors["y"] = np.zeros(1)
    assert list(b.tensors) == ["x"]  # the dict is copied


def test_wire_data_is_normalised() -> None:
    c = Control("op", {"t": (1, (2, 3)), "d": {"k": ()}})
    assert c.body == {"t": [1, [2, 3]], "d": {"k": []}}
    d = M.Deploy("d", 0, b"", "", ["a"], ["b"], {"b": ["caller"]}, package="p")
    assert d.inputs == ("a",) and d.outputs == ("b",) and d.routes == {"b": ("caller",)}
    digest = "AB" * 32
    assert Deploy("d", 0, b"x", digest, (), (), {}).sha256 == digest.lower()
    assert Heartbeat(1, 5).sent_at == 5.0 and isinstance(Heartbeat(1, 5).sent_at, float)
    long = Error(None, "x", "é" * 5000)
    assert len(long.message) == 1000 and long.message.endswith("…")
    round_trip(long)


# the constructors are called untyped: these arguments are wrong on purpose
M: Any = messages

BAD: list[tuple[Any, str]] = [
    (lambda: M.Hello("", 1, "node", {}), "node_id"),
    (lambda: M.Hello("n", 1, "server", {}), "role"),
    (lambda: M.Hello("n", -1, "node", {}), "protocol_version"),
    (lambda: M.Hello("n", True, "node", {}), "protocol_version"),
    (lambda: M.Hello("n", 1, "node", {1: 2}), "key"),
    (lambda: M.Hello("n", 1, "node", {"x": object()}), "msgpack-native"),
    (lambda: M.Hello("n", 1, "node", {"x": np.int64(3)}), "msgpack-native"),
    (lambda: M.Hello("n", 1, "node", {"x": 2**64}), "int in"),
    (lambda: M.Hello("n", 1, "node", {}, listen="nohost"), "listen"),
    (lambda: M.Hello("n", 1, "node", {}, listen="h:99999"), "listen"),
    (lambda: M.Deploy("d", 0, b"m", "00", (), (), {}), "sha256"),
    (lambda: M.Deploy("d", 0, b"m", "g" * 64, (), (), {}), "sha256"),
    (lambda: M.Deploy("d", 0, b"", "", (), (), {}), "exactly one"),
    (lambda: M.Deploy("d", 0, b"m", "0" * 64, (), (), {}, package="p"), "exactly one"),
    (lambda: M.Deploy("d", 0, "m", "0" * 64, (), (), {}), "bytes"),
    (lambda: M.Deploy("d", -1, b"m", "0" * 64, (), (), {}), "stage_id"),
    (lambda: M.Deploy("d", 0, b"m", "0" * 64, ("a", "a"), (), {}), "duplicates"),
    (lambda: M.Deploy("d", 0, b"m", "0" * 64, ("a",), ("b",), {"c": ("n",)}), "routes key"),
    (lambda: M.Deploy("d", 0, b"m", "0" * 64, ("a",), ("b",), {"b": "n1"}), "routes"),
    (lambda: M.Deploy("d", 0, b"m", "0" * 64, (), (), {}, entry=1), "entry"),
    (lambda: M.Deployed("d", 0, "yes"), "ok"),
    (lambda: M.Undeploy(""), "deployment"),
    (lambda: M.Infer(-1, "d", {}), "request_id"),
    (lambda: M.Infer(1, "d", {"x": [1, 2]}), "ndarray"),
    (lambda: M.Infer(1, "d", {"": np.zeros(1)}), "key"),
    (lambda: M.Infer(1, "d", []), "dict"),
    (lambda: M.Result(1, "", {}), "deployment"),
    (lambda: M.Error("1", "c", "m"), "request_id"),
    (lambda: M.Error(None, "", "m"), "code"),
    (lambda: M.Heartbeat(1, "now"), "sent_at"),
    (lambda: M.Goodbye(None), "reason"),
    (lambda: M.Control("", {}), "op"),
    (lambda: M.ControlReply("op", None, {}), "ok"),
    (lambda: M.Control("op", {"deep": _nest(40)}), "nested"),
]


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("make,what", BAD)
def test_constructors_validate(make: Any, what: str) -> None:
    with pytest.raises(LocalProtocolError, match=what):
        make()


def test_decoder_refuses_a_message_its_constructor_refuses() -> None:
    import msgpack

    from meshai.protocol.framing import MAGIC, PREFIX

    header = msgpack.packb(
        {
            "k": "hello",
            "f": {"node_id": "n", "protocol_version": 1, "role": "king", "capabilities": {}, "listen": ""},
            "t": [],
        },
        use_bin_type=True,
    )
    data = PREFIX.pack(MAGIC, len(header), 0) + header
    with pytest.raises(RemoteProtocolError, match="'king'"):
        FrameDecoder().feed(data)
