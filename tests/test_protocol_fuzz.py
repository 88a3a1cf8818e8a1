"""Fuzzing the frame decoder without sockets: only ProtocolError may ever escape.

Two parts: hypothesis (random bytes, random header maps) and a seeded mutation loop over valid
frames (bit flips, truncation, insertion, deletion, prefix and header-field changes, splices) fed
in random chunk sizes through both decoder paths.  Every decode is timed, and every allocation the
decoder makes through ``np.empty`` is counted against the frame limit.
"""

from __future__ import annotations

import hashlib
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshai.errors import ProtocolError
from meshai.protocol import (
    DTYPES,
    MESSAGE_TYPES,
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
    encode,
)
from meshai.protocol.framing import MAGIC, PREFIX

LIMITS = Limits(max_frame_bytes=1 << 20, max_header_bytes=16 << 10, max_elements=1 << 18)
MUTATED_FRAMES = 100_000
MAX_SECONDS_PER_FRAME = 1.0


@contextmanager
def counting_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Record the bytes of every ``np.empty`` the decoder makes (framing calls ``np.empty``)."""
    sizes: list[int] = []
    real = np.empty

    def empty(shape: Any, dtype: Any = float, *args: Any, **kw: Any) -> Any:
        arr = real(shape, dtype, *args, **kw)
        sizes.append(arr.nbytes)
        return arr

    with monkeypatch.context() as m:
        m.setattr(np, "empty", empty)
        yield sizes


def decode(data: bytes, rng: random.Random, *, buffered: bool, limits: Limits = LIMITS) -> list[Message]:
    """Push ``data`` through a fresh decoder in random chunks; stop at the first ProtocolError."""
    dec = FrameDecoder(limits)
    out: list[Message] = []
    src = memoryview(data)
    pos = 0
    try:
        while pos < len(data):
            n = rng.choice((1, 2, 3, 7, 16, 64, 500, 4096, len(data)))
            if buffered:
                buf = dec.get_buffer(-1)
                n = min(n, len(buf), len(data) - pos)
                buf[:n] = src[pos : pos + n]
                out += dec.buffer_updated(n)
            else:
                out += dec.feed(src[pos : pos + n])
            pos += n
    except ProtocolError:
        pass
    assert all(isinstance(m, Message) for m in out)
    return out


# --------------------------------------------------------------------------- corpus


def corpus() -> list[Message]:
    rng = np.random.default_rng(7)
    model = bytes(range(256)) * 2
    tensors = {name: np.asarray(rng.integers(0, 2, size=(2, 3)).astype(name)) for name in sorted(DTYPES)}
    return [
        Hello("n0", 1, "node", {"accel": "cpu", "cores": 2, "ops": ["Conv", "Relu"], "x": None}, "h:9"),
        Hello("c", 1, "client", {}),
        Deploy("d", 0, model, hashlib.sha256(model).hexdigest(), ("in",), ("a",), {"a": ("n1", "caller")}),
        Deploy("d", 1, b"", "", ("a",), ("y",), {}, package="p", cut_inputs=("a",), options={"k": [1.5]}),
        Deployed("d", 0, False, "no"),
        Undeploy("d"),
        Infer(1, "d", {"x": rng.standard_normal((4, 8)).astype(np.float32)}, reply_to="n2"),
        Infer(2, "d", tensors),
        Infer(3, "d", {"s": np.array(1.5), "e": np.zeros((0, 4), np.int8)}),
        Result(4, "d", {"y": np.arange(20, dtype=np.int64).reshape(4, 5)}),
        Error(5, "c", "m", "d"),
        Heartbeat(6, 12.5),
        Goodbye("r"),
        Control("op", {"a": {"b": [1, 2, b"\x00"]}}),
        ControlReply("op", True, {"n": -3}),
    ]


def frame_bytes(msg: Message) -> bytes:
    return b"".join(bytes(p) for p in encode(msg, LIMITS))


# --------------------------------------------------------------------------- mutators

Mutator = Callable[[bytes, random.Random], bytes]

JUNK_VALUES: list[Any] = [
    None, True, -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"), "", "x" * 50,
    b"\x00\xff", [], [1, [2]], {}, {"a": 1}, msgpack.ExtType(1, b"e"),
]  # fmt: skip
DTYPE_STRS = [*DTYPES.values(), "|O", ">f4", "<U2", "f4", "<c8", "|V4", ""]


def bit_flips(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def prefix_flips(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        buf[rng.randrange(PREFIX.size)] = rng.randrange(256)
    return bytes(buf)


def set_lengths(data: bytes, rng: random.Random) -> bytes:
    magic, hlen, blen = PREFIX.unpack_from(data)
    choices = [0, 1, hlen - 1, hlen + 1, 2**32 - 1, LIMITS.max_header_bytes + 1]
    if rng.random() < 0.5:
        hlen = rng.choice(choices) % 2**32
    else:
        blen = rng.choice([0, blen - 1, blen + 1, 2**64 - 1, LIMITS.max_frame_bytes, 2**40]) % 2**64
    return PREFIX.pack(magic, hlen, blen) + data[PREFIX.size :]


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.randint(1, 16)) + data[i:]


def delete(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16) :]


def _mutate_value(value: Any, rng: random.Random, depth: int = 0) -> Any:
    if isinstance(value, dict) and value and rng.random() < 0.7:
        value = dict(value)
        key = rng.choice(list(value))
        action = rng.randrange(4)
        if action == 0:
            del value[key]
        elif action == 1:
            value[rng.choice(["zz", key + "_", 1, b"k"])] = rng.choice(JUNK_VALUES)
        else:
            value[key] = _mutate_value(value[key], rng, depth + 1)
        return value
    if isinstance(value, list) and value and rng.random() < 0.7:
        value = list(value)
        i = rng.randrange(len(value))
        action = rng.randrange(4)
        if action == 0:
            del value[i]
        elif action == 1:
            value.insert(i, rng.choice(JUNK_VALUES))
        else:
            value[i] = _mutate_value(value[i], rng, depth + 1)
        return value
    return rng.choice(JUNK_VALUES)


def header_change(data: bytes, rng: random.Random) -> bytes:
    """Decode the header, change one thing in it, re-encode with consistent (or stale) lengths."""
    try:
        _, hlen, blen = PREFIX.unpack_from(data)
        head = msgpack.unpackb(data[PREFIX.size : PREFIX.size + hlen], raw=False, strict_map_key=False)
    except Exception:  # an already-mutated frame: fall back to flipping bits
        return bit_flips(data, rng) if data else data
    if not isinstance(head, dict) or not isinstance(head.get("t"), list):
        return bit_flips(data, rng)
    body = data[PREFIX.size + hlen :]
    action = rng.randrange(8)
    if action == 5 and isinstance(head.get("f"), dict) and head["f"]:
        head["f"][rng.choice(list(head["f"]))] = rng.choice(JUNK_VALUES)
    elif action == 0:
        head["k"] = rng.choice([*MESSAGE_TYPES, "nope", 3, None])
    elif action == 1 and head["t"]:
        entry = rng.choice(head["t"])
        entry[1] = rng.choice(DTYPE_STRS)
    elif action == 2 and head["t"]:
        entry = rng.choice(head["t"])
        entry[2] = rng.choice([[], [-1], [2**40], [0, 2**63], [1] * 12, [3, 3], [1.0], [True], "x"])
    elif action == 3 and head["t"]:
        entry = rng.choice(head["t"])
        entry[3] = rng.choice([entry[3] + 1, entry[3] - 1, 0, 2**40, -5, "1"])
    elif action == 4:
        head["t"] = head["t"] + [
            ["x", rng.choice(DTYPE_STRS), [rng.randint(0, 4)], rng.randint(0, 16)]
        ] * rng.randint(1, 70)
    else:
        head = _mutate_value(head, rng)
    try:
        header: bytes = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return data
    if rng.random() < 0.2:
        body = body + rng.randbytes(rng.randint(0, 64))
    if rng.random() < 0.7:
        blen = len(body)
    return PREFIX.pack(MAGIC, len(header), blen) + header + body


def splice(data: bytes, rng: random.Random) -> bytes:
    other = rng.choice(FRAMES)
    return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]


def sandwich(data: bytes, rng: random.Random) -> bytes:
    """A valid frame, then the frame mutated, then another valid frame."""
    inner = rng.choice(MUTATORS[:-1])(data, rng)
    return rng.choice(FRAMES) + inner + rng.choice(FRAMES)


MUTATORS: list[Mutator] = [
    bit_flips, prefix_flips, set_lengths, truncate, insert, delete,
    header_change, header_change, splice, sandwich,
]  # fmt: skip
MESSAGES = corpus()
FRAMES = [frame_bytes(m) for m in MESSAGES]


# --------------------------------------------------------------------------- the tests


def test_corpus_round_trips() -> None:
    rng = random.Random(0)
    for msg, data in zip(MESSAGES, FRAMES, strict=True):
        assert decode(data, rng, buffered=False) == [msg]
        assert decode(data, rng, buffered=True) == [msg]


def test_mutation_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(20240607)
    frames = 0
    slowest = 0.0
    decoded = 0
    started = time.perf_counter()
    with counting_allocations(monkeypatch) as sizes:
        while frames < MUTATED_FRAMES:
            data = rng.choice(FRAMES)
            mutate = rng.choice(MUTATORS)
            data = mutate(data, rng)
            if rng.random() < 0.1:  # stack a second mutation now and then
                data = rng.choice([bit_flips, truncate, insert, delete])(data, rng) if data else data
            sizes.clear()
            t0 = time.perf_counter()
            decoded += len(decode(data, rng, buffered=rng.random() < 0.5))
            elapsed = time.perf_counter() - t0
            slowest = max(slowest, elapsed)
            assert elapsed < MAX_SECONDS_PER_FRAME, (mutate.__name__, data[:64])
            assert sum(sizes) <= 3 * LIMITS.max_frame_bytes  # at most the frames fed in at once
            assert all(s <= LIMITS.max_frame_bytes for s in sizes), (mutate.__name__, max(sizes))
            frames += 1
    total = time.perf_counter() - started
    print(
        f"\nmutation fuzz: {frames} frames in {total:.1f} s, "
        f"slowest {slowest * 1e3:.1f} ms, {decoded} decoded"
    )
    assert decoded > 0  # some mutations leave valid frames; the decoder must still deliver them


def test_memory_stays_under_the_frame_limit() -> None:
    """Real allocations (tracemalloc) while decoding mutated frames never exceed the frame limit."""
    rng = random.Random(99)
    tracemalloc.start()
    try:
        for _ in range(1500):
            data = rng.choice([set_lengths, header_change, bit_flips])(rng.choice(FRAMES), rng)
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            decode(data, rng, buffered=rng.random() < 0.5)
            _, peak = tracemalloc.get_traced_memory()
            assert peak - base <= LIMITS.max_frame_bytes + LIMITS.max_header_bytes + (256 << 10)
    finally:
        tracemalloc.stop()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), magic=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_bytes(data: bytes, magic: bool, seed: int) -> None:
    if magic:
        data = MAGIC + data
    rng = random.Random(seed)
    t0 = time.perf_counter()
    decode(data, rng, buffered=seed % 2 == 0)
    assert time.perf_counter() - t0 < MAX_SECONDS_PER_FRAME


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
_dims = st.lists(st.integers(-3, 2**20) | st.sampled_from([2**40, 2**64 - 1]) | _scalars, max_size=10)
_entry = st.lists(_values, max_size=5) | st.tuples(
    st.text(max_size=6) | _scalars,
    st.sampled_from(DTYPE_STRS) | _scalars,
    st.lists(st.integers(0, 9), max_size=4) | _dims,
    st.integers(-1, 10_000) | _scalars,
).map(list)


def _fields_for(kind: Any) -> st.SearchStrategy[dict[str, Any]]:
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    names = [f for f in getattr(cls, "__dataclass_fields__", {}) if f not in ("tensors", "model")]
    return st.fixed_dictionaries({n: _values for n in names}, optional={"zz": _values})


_header = st.sampled_from([*MESSAGE_TYPES, "zzz"]).flatmap(
    lambda kind: st.fixed_dictionaries(
        {"k": st.just(kind), "f": _fields_for(kind) | _values, "t": st.lists(_entry, max_size=5) | _values},
        optional={"b": st.lists(st.lists(_values, max_size=3), max_size=2), "x": _values},
    )
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=_header | _values, body=st.binary(max_size=256), exact=st.booleans(), seed=st.integers(0, 2**32 - 1)
)
def test_random_header_maps(head: Any, body: bytes, exact: bool, seed: int) -> None:
    try:
        header = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    blen = len(body)
    if exact and isinstance(head, dict) and isinstance(head.get("t"), list):
        # make the body match what the tensor entries declare, so decoding gets past the length check
        declared = [e[3] for e in head["t"] if isinstance(e, list) and len(e) == 4 and isinstance(e[3], int)]
        blen = max(0, min(sum(declared), 4096))
        body = (body * (blen // max(len(body), 1) + 1))[:blen] if body else bytes(blen)
    data = PREFIX.pack(MAGIC, len(header), blen) + header + body
    rng = random.Random(seed)
    t0 = time.perf_counter()
    decode(data, rng, buffered=seed % 2 == 0)
    assert time.perf_counter() - t0 < MAX_SECONDS_PER_FRAME
