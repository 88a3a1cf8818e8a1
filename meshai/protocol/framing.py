"""Frames: a msgpack header plus raw tensor buffers, with limits checked both ways.

Frame layout (all integers big-endian)::

    offset  size  field
    0       4     magic b"MSH1"
    4       4     uint32 H: header length in bytes (1 <= H <= Limits.max_header_bytes)
    8       8     uint64 B: body length in bytes (16 + H + B <= Limits.max_frame_bytes)
    16      H     header: one msgpack map (see below)
    16+H    B     body: the raw buffers listed in the header, concatenated in header order

The header map has these str keys::

    "k": str                                       the message KIND
    "f": {field: value, ...}                       every field except tensors and body bytes
    "t": [[name, dtype, [dim, ...], nbytes], ...]  the message's tensors, in body order
    "b": [[field, nbytes], ...]                    bytes fields sent raw; only for kinds that have them

``dtype`` is numpy's canonical little-endian string (``"<f4"``, ``"|u1"``, ``"|b1"``, …; see
``DTYPES``), ``nbytes == prod(dims) * itemsize``, and ``B == sum of all nbytes``.  The tensor
buffers come first in body order, then the ``"b"`` buffers.  Large ``bytes`` fields — ``Deploy.model``
— always travel as ``"b"`` buffers, so a model is never copied into the msgpack header; such a
field is copied exactly once on receipt (into the ``bytes`` object the message holds).

Sending: ``encode`` returns scatter-gather pieces for ``transport.writelines()``: one ``bytes``
(prefix + header) followed by a ``memoryview`` of each array as it is (made C-contiguous first only
if it is not), never a ``tobytes()`` copy.  Do not modify the arrays until the pieces are written.

Receiving: ``FrameDecoder`` is incremental and sans-I/O.  ``feed(data)`` copies bytes in;
``get_buffer``/``buffer_updated`` is the ``asyncio.BufferedProtocol`` path: once a header is parsed
each tensor is preallocated with ``np.empty`` and, while at least ``DIRECT_MIN`` bytes of the current
buffer remain, ``get_buffer`` returns a memoryview *into that array*, so the socket writes straight
into the final tensor.  Otherwise (prefixes, small headers, small tensors) it returns a scratch
buffer of ``SCRATCH_BYTES`` that may hold several small frames at once, whose bytes are then copied
into place — this keeps small messages at one ``recv`` for many frames.

Every limit is checked before anything is allocated: the magic, the header length, the declared
frame length, then the header (msgpack with explicit string, bin, array and map caps, no ext types,
str keys only), then each tensor's name, dtype, dims, element count and byte count, and the body
length against their sum.  Any violation raises ``RemoteProtocolError`` naming the bad value, and
the decoder is dead afterwards.  So a decoder never holds more than one frame's header plus
``max_frame_bytes`` of body, and never allocates a body larger than its declared (and checked)
length.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import msgpack
import numpy as np

from meshai.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from meshai.protocol.messages import MESSAGE_TYPES, Message, Tensor

__all__ = [
    "DIRECT_MIN",
    "DTYPES",
    "MAGIC",
    "PREFIX",
    "SCRATCH_BYTES",
    "FrameDecoder",
    "Limits",
    "encode",
]

MAGIC = b"MSH1"
PREFIX = struct.Struct(">4sIQ")
"""magic, header length, body length: 16 bytes."""

DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int8": "|i1",
    "uint8": "|u1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "int64": "<i8",
    "bool": "|b1",
}
"""Every dtype the protocol can carry: numpy name -> canonical wire string."""

_WIRE_DTYPES: dict[str, np.dtype[Any]] = {wire: np.dtype(wire) for wire in DTYPES.values()}
_WIRE_NAMES: dict[str, str] = {wire: name for name, wire in DTYPES.items()}

SCRATCH_BYTES = 256 * 1024
"""Size of the decoder's scratch buffer for prefixes, headers and small tensors."""
DIRECT_MIN = 256 * 1024
"""``get_buffer`` hands out a view into the target array when at least this many bytes of it remain."""

_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what one frame may hold; both encoding and decoding enforce them."""

    max_frame_bytes: int = 256 * _MiB
    max_header_bytes: int = 1 * _MiB
    max_tensors: int = 64
    max_dims: int = 8
    max_elements: int = 2**28
    max_str_len: int = 4096
    max_bin_len: int = 1 * _MiB
    max_array_len: int = 65536
    max_map_len: int = 4096
    allowed_dtypes: frozenset[str] = frozenset(DTYPES)
    """numpy dtype names, a subset of ``DTYPES``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "allowed_dtypes" and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"Limits.{f.name} must be a positive int, got {value!r}")
        if not isinstance(self.allowed_dtypes, frozenset) or not self.allowed_dtypes <= DTYPES.keys():
            raise ConfigError(
                f"Limits.allowed_dtypes must be a frozenset of {sorted(DTYPES)}, got {self.allowed_dtypes!r}"
            )
        if self.max_header_bytes + PREFIX.size > self.max_frame_bytes:
            raise ConfigError(
                f"Limits.max_header_bytes {self.max_header_bytes} does not fit in "
                f"max_frame_bytes {self.max_frame_bytes}"
            )


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- header (un)packing


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _unpack_header(header: bytes | bytearray | memoryview, limits: Limits) -> Any:
    """Unpack one header with every msgpack limit set explicitly; raises ValueError and friends."""
    # The header's length was checked against max_header_bytes before it was read, which is what
    # Unpacker(max_buffer_size=...) would enforce; unpackb avoids allocating an Unpacker buffer per frame.
    return msgpack.unpackb(
        header,
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_refuse_ext,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
    )


def _wire_fields(cls: type[Message]) -> tuple[str, ...]:
    skip = {cls.TENSOR_FIELD, *cls.BODY_FIELDS}
    return tuple(f.name for f in fields(cls) if f.name not in skip)  # type: ignore[arg-type]


_FIELDS: dict[str, tuple[str, ...]] = {kind: _wire_fields(cls) for kind, cls in MESSAGE_TYPES.items()}


# --------------------------------------------------------------------------- encoding


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Encode ``msg`` as frame pieces (header, then zero-copy views); LocalProtocolError if over limits."""
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.KIND) is not cls:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: not a registered message type")
    body: list[memoryview] = []
    tensor_meta: list[list[Any]] = []
    body_len = 0
    if cls.TENSOR_FIELD:
        tensors: dict[str, Tensor] = getattr(msg, cls.TENSOR_FIELD)
        if len(tensors) > limits.max_tensors:
            raise LocalProtocolError(f"{len(tensors)} tensors exceed limit {limits.max_tensors}")
        for name, arr in tensors.items():
            wire = _check_out_tensor(name, arr, limits)
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            tensor_meta.append([name, wire, list(arr.shape), arr.nbytes])
            body_len += arr.nbytes
            if arr.nbytes:
                body.append(arr.data.cast("B"))
    raw_meta: list[list[Any]] = []
    for fname in cls.BODY_FIELDS:
        data: bytes = getattr(msg, fname)
        raw_meta.append([fname, len(data)])
        body_len += len(data)
        if data:
            body.append(memoryview(data))
    head: dict[str, Any] = {
        "k": cls.KIND,
        "f": {name: getattr(msg, name) for name in _FIELDS[cls.KIND]},
        "t": tensor_meta,
    }
    if raw_meta:
        head["b"] = raw_meta
    try:
        header = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot pack {cls.KIND!r} header: {exc}") from exc
    if len(header) > limits.max_header_bytes:
        raise LocalProtocolError(
            f"frame header of {len(header)} bytes exceeds limit {limits.max_header_bytes}"
        )
    total = PREFIX.size + len(header) + body_len
    if total > limits.max_frame_bytes:
        raise LocalProtocolError(f"frame of {total} bytes exceeds limit {limits.max_frame_bytes}")
    # The peer's msgpack caps (string, bin, array, map lengths): a header of N bytes cannot hold a
    # string, bin, array or map longer than N, so a short one needs no check (the common case).
    if len(header) > min(limits.max_str_len, limits.max_bin_len, limits.max_array_len, limits.max_map_len):
        try:
            _unpack_header(header, limits)
        except Exception as exc:
            raise LocalProtocolError(f"{cls.KIND!r} header breaks a limit: {exc}") from exc
    return [PREFIX.pack(MAGIC, len(header), body_len) + header, *body]


def _check_out_tensor(name: str, arr: Tensor, limits: Limits) -> str:
    dt = arr.dtype
    wire = dt.str
    if wire not in _WIRE_NAMES:
        if dt.byteorder == ">" and dt.newbyteorder("<").str in _WIRE_NAMES:
            raise LocalProtocolError(f"tensor {name!r}: big-endian dtype {wire!r} is not allowed")
        raise LocalProtocolError(f"tensor {name!r}: dtype {dt} is not allowed")
    if _WIRE_NAMES[wire] not in limits.allowed_dtypes:
        raise LocalProtocolError(f"tensor {name!r}: dtype {dt} is not allowed by these limits")
    if arr.ndim > limits.max_dims:
        raise LocalProtocolError(f"tensor {name!r}: {arr.ndim} dims exceed limit {limits.max_dims}")
    if arr.size > limits.max_elements:
        raise LocalProtocolError(f"tensor {name!r}: {arr.size} elements exceed limit {limits.max_elements}")
    return wire


# --------------------------------------------------------------------------- decoding

_PREFIX, _HEADER, _BODY = 0, 1, 2
_U8 = np.dtype(np.uint8)
_Spec = tuple[str, np.dtype[Any], tuple[int, ...]]


class FrameDecoder:
    """Incremental sans-I/O frame decoder: bytes in (``feed`` or the buffered pair), messages out."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._error: RemoteProtocolError | None = None
        self._out: list[Message] = []
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._prefix = memoryview(bytearray(PREFIX.size))
        self._handed: memoryview | None = None  # the buffer get_buffer handed out last
        self._handed_direct = False
        self._start_frame()

    # ----- public

    @property
    def frame_bytes(self) -> int:
        """Declared size of the frame being received (0 before its prefix is complete)."""
        return self._frame_total

    @property
    def idle(self) -> bool:
        """True between frames (no partial frame buffered); False also once the decoder is dead."""
        return self._error is None and self._phase == _PREFIX and self._filled == 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Decode a chunk of the stream; return the messages it completed; RemoteProtocolError if bad."""
        self._check_alive()
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        self._guard(self._consume, view)
        return self._take()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return a writable buffer for the next bytes: a view into a large target tensor, else scratch."""
        self._check_alive()
        remaining = len(self._target) - self._filled
        if self._phase != _PREFIX and remaining >= DIRECT_MIN:
            self._handed = self._target[self._filled :]
            self._handed_direct = True
        else:
            self._handed = self._scratch
            self._handed_direct = False
        return self._handed

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """Account for ``nbytes`` written into the last ``get_buffer`` buffer; return messages completed."""
        self._check_alive()
        handed = self._handed
        if handed is None or not 0 <= nbytes <= len(handed):
            size = -1 if handed is None else len(handed)
            raise LocalProtocolError(
                f"buffer_updated({nbytes}) does not match the buffer of {size} bytes handed out"
            )
        self._handed = None
        if self._handed_direct:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._guard(self._advance)
        else:
            self._guard(self._consume, handed[:nbytes])
        return self._take()

    # ----- machinery

    def _check_alive(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(f"decoder is dead after an earlier error: {self._error}")

    def _take(self) -> list[Message]:
        out, self._out = self._out, []
        return out

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except RemoteProtocolError as exc:
            self._error = exc
            self._out = []
            self._release()
            raise

    def _bad(self, text: str) -> NoReturn:
        raise RemoteProtocolError(text)

    def _release(self) -> None:
        self._header: memoryview | None = None
        self._buffers: list[memoryview] = []
        self._tensors: list[tuple[str, Tensor]] = []
        self._raw: list[tuple[str, Tensor]] = []
        self._handed = None
        self._target = self._prefix

    def _start_frame(self) -> None:
        self._release()
        self._phase = _PREFIX
        self._filled = 0
        self._head: dict[str, Any] = {}
        self._body_len = 0
        self._frame_total = 0
        self._index = 0

    def _consume(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            target = self._target
            n = min(end - pos, len(target) - self._filled)
            target[self._filled : self._filled + n] = data[pos : pos + n]
            self._filled += n
            pos += n
            if self._filled == len(target):
                self._advance()

    def _advance(self) -> None:
        """The current target is full: move to the next one, finishing frames as they complete."""
        if self._phase == _PREFIX:
            self._parse_prefix()
        elif self._phase == _HEADER:
            self._parse_header()
        else:
            self._index += 1
        if self._phase == _BODY:
            while self._index < len(self._buffers) and len(self._buffers[self._index]) == 0:
                self._index += 1
            if self._index == len(self._buffers):
                self._finish()
                return
            self._target = self._buffers[self._index]
            self._filled = 0

    def _parse_prefix(self) -> None:
        magic, hlen, blen = PREFIX.unpack(self._prefix)
        lim = self.limits
        if magic != MAGIC:
            self._bad(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}")
        if hlen == 0:
            self._bad("frame header of 0 bytes: a header is required")
        if hlen > lim.max_header_bytes:
            self._bad(f"frame header of {hlen} bytes exceeds limit {lim.max_header_bytes}")
        total = PREFIX.size + hlen + blen
        if total > lim.max_frame_bytes:
            self._bad(f"frame of {total} bytes (body {blen}) exceeds limit {lim.max_frame_bytes}")
        self._body_len = blen
        self._frame_total = total
        self._header = memoryview(bytearray(hlen))
        self._target = self._header
        self._filled = 0
        self._phase = _HEADER

    def _parse_header(self) -> None:
        assert self._header is not None
        try:
            head = _unpack_header(self._header, self.limits)
        except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, its own errors
            self._bad(f"bad frame header: {type(exc).__name__}: {exc}")
        self._header = None
        if not isinstance(head, dict):
            self._bad(f"frame header must be a map, got {type(head).__name__}")
        extra = head.keys() - {"k", "f", "t", "b"}
        if extra or not {"k", "f", "t"} <= head.keys():
            self._bad(
                f"frame header keys must be 'k', 'f', 't' and optionally 'b', got {sorted(head, key=repr)}"
            )
        kind = head["k"]
        cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            self._bad(f"unknown message kind {kind!r}")
        f = head["f"]
        if not isinstance(f, dict):
            self._bad(f"{kind!r} fields must be a map, got {type(f).__name__}")
        want = _FIELDS[kind]
        if f.keys() != set(want):
            missing = sorted(set(want) - f.keys())
            extra_f = sorted(f.keys() - set(want), key=repr)
            self._bad(f"{kind!r} fields wrong: missing {missing}, unexpected {extra_f}")
        self._head = head
        specs = self._parse_tensors(kind, cls, head["t"]) + self._parse_raw(kind, cls, head.get("b", []))
        declared = sum(math.prod(shape) * dt.itemsize for _, dt, shape in specs)
        if declared != self._body_len:
            self._bad(f"frame body of {self._body_len} bytes does not match its buffers' {declared} bytes")
        # Only now, with every size checked and their sum equal to the checked body length, allocate.
        arrays = [(name, np.empty(shape, dtype=dt)) for name, dt, shape in specs]
        n_tensors = len(head["t"])
        self._tensors = arrays[:n_tensors]
        self._raw = arrays[n_tensors:]
        self._buffers = [_flat(a) for _, a in arrays]
        self._phase = _BODY
        self._index = 0

    def _parse_tensors(self, kind: str, cls: type[Message], meta: Any) -> list[_Spec]:
        lim = self.limits
        if not isinstance(meta, list):
            self._bad(f"{kind!r} tensor list must be an array, got {type(meta).__name__}")
        if not cls.TENSOR_FIELD and meta:
            self._bad(f"{kind!r} carries no tensors, got {len(meta)}")
        if len(meta) > lim.max_tensors:
            self._bad(f"{len(meta)} tensors exceed limit {lim.max_tensors}")
        specs: list[_Spec] = []
        names: set[str] = set()
        for entry in meta:
            if not isinstance(entry, list) or len(entry) != 4:
                self._bad(f"tensor entry must be [name, dtype, dims, nbytes], got {_show(entry)}")
            name, wire, dims, nbytes = entry
            if not isinstance(name, str) or not name:
                self._bad(f"tensor name must be a non-empty str, got {_show(name)}")
            if name in names:
                self._bad(f"duplicate tensor name {name!r}")
            names.add(name)
            dt = _WIRE_DTYPES.get(wire) if isinstance(wire, str) else None
            if dt is None or _WIRE_NAMES[wire] not in lim.allowed_dtypes:
                self._bad(f"tensor {name!r}: dtype {_show(wire)} is not allowed")
            if not isinstance(dims, list):
                self._bad(f"tensor {name!r}: dims must be an array, got {_show(dims)}")
            if len(dims) > lim.max_dims:
                self._bad(f"tensor {name!r}: {len(dims)} dims exceed limit {lim.max_dims}")
            for d in dims:
                if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                    self._bad(f"tensor {name!r}: dim {_show(d)} is not a non-negative int")
                if d > lim.max_elements:
                    self._bad(f"tensor {name!r}: dim {d} exceeds limit {lim.max_elements} elements")
            count = math.prod(dims)
            if count > lim.max_elements:
                self._bad(f"tensor {name!r}: {count} elements exceed limit {lim.max_elements}")
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes != count * dt.itemsize:
                self._bad(
                    f"tensor {name!r}: nbytes {_show(nbytes)} != {count} elements * {dt.itemsize} bytes"
                )
            specs.append((name, dt, tuple(dims)))
        return specs

    def _parse_raw(self, kind: str, cls: type[Message], meta: Any) -> list[_Spec]:
        if not isinstance(meta, list) or len(meta) != len(cls.BODY_FIELDS):
            self._bad(f"{kind!r} body field list must name {list(cls.BODY_FIELDS)}, got {_show(meta)}")
        specs: list[_Spec] = []
        for entry, want in zip(meta, cls.BODY_FIELDS, strict=True):
            if not isinstance(entry, list) or len(entry) != 2 or entry[0] != want:
                self._bad(f"{kind!r} body field entry must be [{want!r}, nbytes], got {_show(entry)}")
            nbytes = entry[1]
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= self._body_len:
                self._bad(
                    f"{kind!r} body field {want!r}: nbytes {_show(nbytes)} is not in [0, {self._body_len}]"
                )
            specs.append((want, _U8, (nbytes,)))
        return specs

    def _finish(self) -> None:
        head = self._head
        kind: str = head["k"]
        cls = MESSAGE_TYPES[kind]
        kwargs: dict[str, Any] = dict(head["f"])
        if cls.TENSOR_FIELD:
            for name, arr in self._tensors:
                if arr.dtype.kind == "b" and arr.size and int(arr.view(np.uint8).max()) > 1:
                    self._bad(f"tensor {name!r}: bool tensor holds bytes other than 0 and 1")
            kwargs[cls.TENSOR_FIELD] = dict(self._tensors)
        for name, arr in self._raw:
            kwargs[name] = bytes(_flat(arr))  # the one copy of a received bytes field
        try:
            msg = cls(**kwargs)
        except ProtocolError as exc:
            self._bad(f"invalid {kind!r} message: {exc}")
        except (TypeError, ValueError) as exc:
            self._bad(f"invalid {kind!r} message: {exc}")
        self._out.append(msg)
        self._start_frame()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _flat(arr: Tensor) -> memoryview:
    """A writable flat byte view of a fresh C-contiguous array (empty for zero-size arrays)."""
    if arr.size == 0:
        return memoryview(b"")
    return arr.data.cast("B")
