"""The wire messages of meshai: frozen, validated dataclasses, one per ``KIND``.

Constructors check every field's type and value and raise ``LocalProtocolError``
(in the manner of h11's events): building a message the protocol forbids is the
builder's bug.  The frame decoder builds received messages through the same
constructors and turns that error into ``RemoteProtocolError``.

Fields typed ``dict[str, Any]`` (capabilities, options, control bodies) must hold
msgpack-native data only: ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``,
``bytes``, lists and str-keyed dicts, nested at most ``MAX_DEPTH`` deep.  They are
copied at construction and tuples in them become lists, so that a message equals
itself after a round trip.  ``tuple[str, ...]`` fields accept a list as well.

Tensor fields are ``dict[str, numpy.ndarray]``; the dict is copied, the arrays are
not.  Messages are frozen but numpy arrays are not: treat them as read-only while a
message that holds them is being sent.  Messages holding tensors compare equal when
their arrays have equal dtypes, shapes and values (NaNs compare equal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from meshai.errors import LocalProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_TEXT_CHARS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "ROLES",
    "Control",
    "ControlReply",
    "Deploy",
    "Deployed",
    "Error",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Infer",
    "Message",
    "Result",
    "Tensor",
    "Undeploy",
    "Upload",
    "Uploaded",
]

PROTOCOL_VERSION = 1
"""The version this code speaks; a peer's ``Hello`` must carry the same."""

ROLES = ("node", "client")
"""What a ``Hello`` may say its sender is."""

MAX_DEPTH = 32
"""How deeply ``dict[str, Any]`` fields may nest."""

MAX_TEXT_CHARS = 1000
"""Free-text diagnostics (``Error.message``, ``Deployed.message``) are cut to this many characters."""

Tensor = npt.NDArray[Any]

_INT_MIN = -(2**63)
_UINT_MAX = 2**64 - 1
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class Message:
    """Base of every wire message; subclasses are frozen dataclasses with a unique ``KIND``."""

    __slots__ = ()

    KIND: ClassVar[str] = ""
    TENSOR_FIELD: ClassVar[str] = ""
    """Name of the ``dict[str, ndarray]`` field whose arrays travel in the frame body, or ""."""
    BODY_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Names of ``bytes`` fields that travel as raw buffers in the frame body."""


# --------------------------------------------------------------------------- validation helpers


def _fail(where: str, what: str, value: object) -> LocalProtocolError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return LocalProtocolError(f"{where} must be {what}, got {shown}")


def _str(where: str, value: object, *, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _fail(where, "a str" if empty else "a non-empty str", value)
    return value


def _int(where: str, value: object, *, lo: int = _INT_MIN, hi: int = _UINT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(where, f"an int in [{lo}, {hi}]", value)
    return value


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, "a bool", value)
    return value


def _float(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, "a float", value)
    return float(value)


def _names(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, tuple | list):
        raise _fail(where, "a tuple of non-empty str", value)
    out = tuple(_str(f"{where}[{i}]", v, empty=False) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        raise _fail(where, "free of duplicates", value)
    return out


def _text(where: str, value: object) -> str:
    text = _str(where, value)
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _wire(where: str, value: object, depth: int = 0) -> Any:
    """Check that ``value`` is msgpack-native data and return a copy with tuples as lists."""
    if depth > MAX_DEPTH:
        raise _fail(where, f"nested at most {MAX_DEPTH} deep", "...")
    if value is None or isinstance(value, bool | float | str | bytes):
        return value
    if isinstance(value, int):
        return _int(where, value)
    if isinstance(value, list | tuple):
        return [_wire(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return _wire_dict(where, value, depth + 1)
    raise _fail(where, "msgpack-native data (None, bool, int, float, str, bytes, list, dict)", value)


def _wire_dict(where: str, value: object, depth: int = 0) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "a dict with str keys", value)
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise _fail(f"{where} key", "a str", k)
        out[k] = _wire(f"{where}[{k!r}]", v, depth)
    return out


def _tensors(where: str, value: object) -> dict[str, Tensor]:
    if not isinstance(value, dict):
        raise _fail(where, "a dict of str to numpy.ndarray", value)
    for k, v in value.items():
        _str(f"{where} key", k, empty=False)
        if not isinstance(v, np.ndarray):
            raise _fail(f"{where}[{k!r}]", "a numpy.ndarray", type(v).__name__)
    return dict(value)


def _tensors_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message each side sends: who it is, what it speaks and what it can do."""

    KIND: ClassVar[str] = "hello"

    node_id: str
    protocol_version: int
    role: str
    capabilities: dict[str, Any]
    listen: str = ""
    """host:port the sender serves on; "" for clients."""

    def __post_init__(self) -> None:
        _str("Hello.node_id", self.node_id, empty=False)
        _int("Hello.protocol_version", self.protocol_version, lo=0, hi=2**32 - 1)
        if self.role not in ROLES:
            raise _fail("Hello.role", f"one of {ROLES}", self.role)
        _set(self, "capabilities", _wire_dict("Hello.capabilities", self.capabilities))
        _str("Hello.listen", self.listen)
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not (host and sep and port.isdigit() and port.isascii() and int(port) <= 65535):
                raise _fail("Hello.listen", "'host:port' or ''", self.listen)


@dataclass(frozen=True, slots=True)
class Deploy(Message):
    """Install one stage of a deployment: an ONNX model (or later a signed package) and its routes."""

    KIND: ClassVar[str] = "deploy"
    BODY_FIELDS: ClassVar[tuple[str, ...]] = ("model",)

    deployment: str
    stage_id: int
    model: bytes
    """The stage's ONNX bytes, or b"" when ``package`` names a signed package instead."""
    sha256: str
    """Hex SHA-256 of ``model`` (64 hex digits; stored lower-case); "" or a digest with a package."""
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    routes: dict[str, tuple[str, ...]]
    """Output tensor name -> destinations: node ids, or "caller"."""
    entry: bool = False
    package: str = ""
    cut_inputs: tuple[str, ...] = ()
    cut_outputs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _str("Deploy.deployment", self.deployment, empty=False)
        _int("Deploy.stage_id", self.stage_id, lo=0, hi=2**32 - 1)
        if not isinstance(self.model, bytes):
            raise _fail("Deploy.model", "bytes", type(self.model).__name__)
        _str("Deploy.package", self.package)
        if bool(self.model) == bool(self.package):
            raise _fail(
                "Deploy.model and Deploy.package",
                "exactly one non-empty",
                f"model of {len(self.model)} bytes, package {self.package!r}",
            )
        _str("Deploy.sha256", self.sha256)
        if (self.model or self.sha256) and not _SHA256.fullmatch(self.sha256):
            raise _fail("Deploy.sha256", "64 hex digits", self.sha256)
        _set(self, "sha256", self.sha256.lower())
        _set(self, "inputs", _names("Deploy.inputs", self.inputs))
        _set(self, "outputs", _names("Deploy.outputs", self.outputs))
        if not isinstance(self.routes, dict):
            raise _fail("Deploy.routes", "a dict of output name to destinations", self.routes)
        routes: dict[str, tuple[str, ...]] = {}
        for name, dests in self.routes.items():
            if name not in self.outputs:
                raise _fail("Deploy.routes key", f"one of the outputs {self.outputs}", name)
            routes[name] = _names(f"Deploy.routes[{name!r}]", dests)
        _set(self, "routes", routes)
        _bool("Deploy.entry", self.entry)
        _set(self, "cut_inputs", _names("Deploy.cut_inputs", self.cut_inputs))
        _set(self, "cut_outputs", _names("Deploy.cut_outputs", self.cut_outputs))
        _set(self, "options", _wire_dict("Deploy.options", self.options))


@dataclass(frozen=True, slots=True)
class Deployed(Message):
    """A node's answer to ``Deploy``: the stage is live (``ok``) or why not."""

    KIND: ClassVar[str] = "deployed"

    deployment: str
    stage_id: int
    ok: bool
    message: str = ""

    def __post_init__(self) -> None:
        _str("Deployed.deployment", self.deployment, empty=False)
        _int("Deployed.stage_id", self.stage_id, lo=0, hi=2**32 - 1)
        _bool("Deployed.ok", self.ok)
        _set(self, "message", _text("Deployed.message", self.message))


@dataclass(frozen=True, slots=True)
class Upload(Message):
    """Hand a node a signed model package (``name@version``) for its store; answered by ``Uploaded``."""

    KIND: ClassVar[str] = "upload"
    BODY_FIELDS: ClassVar[tuple[str, ...]] = ("data",)

    package: str
    data: bytes

    def __post_init__(self) -> None:
        _str("Upload.package", self.package, empty=False)
        if not isinstance(self.data, bytes) or not self.data:
            raise _fail("Upload.data", "non-empty bytes", type(self.data).__name__)


@dataclass(frozen=True, slots=True)
class Uploaded(Message):
    """A node's answer to ``Upload``: the package verified and is stored (``ok``), or why not."""

    KIND: ClassVar[str] = "uploaded"

    package: str
    ok: bool
    message: str = ""

    def __post_init__(self) -> None:
        _str("Uploaded.package", self.package, empty=False)
        _bool("Uploaded.ok", self.ok)
        _set(self, "message", _text("Uploaded.message", self.message))


@dataclass(frozen=True, slots=True)
class Undeploy(Message):
    """Remove every stage of a deployment from the receiving node."""

    KIND: ClassVar[str] = "undeploy"

    deployment: str

    def __post_init__(self) -> None:
        _str("Undeploy.deployment", self.deployment, empty=False)


@dataclass(frozen=True, slots=True)
class Infer(Message):
    """Tensors into a deployment's stage: the caller's first hop and every forward hop between stages."""

    KIND: ClassVar[str] = "infer"
    TENSOR_FIELD: ClassVar[str] = "tensors"

    request_id: int
    deployment: str
    tensors: dict[str, Tensor]
    reply_to: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    """Request metadata: ``versions`` (stage id → the package version that stage ran, stamped hop by
    hop), and from a client to an entry ``key`` (what an A/B split by robot keys on) and ``label``."""

    def __post_init__(self) -> None:
        _int("Infer.request_id", self.request_id, lo=0)
        _str("Infer.deployment", self.deployment, empty=False)
        _set(self, "tensors", _tensors("Infer.tensors", self.tensors))
        _str("Infer.reply_to", self.reply_to)
        _set(self, "meta", _wire_dict("Infer.meta", self.meta))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Infer):
            return NotImplemented
        return (
            (self.request_id, self.deployment, self.reply_to, self.meta)
            == (other.request_id, other.deployment, other.reply_to, other.meta)
        ) and _tensors_equal(self.tensors, other.tensors)


@dataclass(frozen=True, slots=True)
class Result(Message):
    """A deployment's output tensors for one request, sent to the caller."""

    KIND: ClassVar[str] = "result"
    TENSOR_FIELD: ClassVar[str] = "tensors"

    request_id: int
    deployment: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    """``versions``: stage id → the package version each stage on the way ran (see ``Infer.meta``)."""

    def __post_init__(self) -> None:
        _int("Result.request_id", self.request_id, lo=0)
        _str("Result.deployment", self.deployment, empty=False)
        _set(self, "tensors", _tensors("Result.tensors", self.tensors))
        _set(self, "meta", _wire_dict("Result.meta", self.meta))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.request_id, self.deployment, self.meta) == (
            other.request_id,
            other.deployment,
            other.meta,
        ) and _tensors_equal(self.tensors, other.tensors)


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A failure, tied to a request (``request_id``) or to the connection (``None``)."""

    KIND: ClassVar[str] = "error"

    request_id: int | None
    code: str
    message: str
    deployment: str = ""

    def __post_init__(self) -> None:
        if self.request_id is not None:
            _int("Error.request_id", self.request_id, lo=0)
        _str("Error.code", self.code, empty=False)
        _set(self, "message", _text("Error.message", self.message))
        _str("Error.deployment", self.deployment)


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness probe; ``sent_at`` is the sender's clock in seconds."""

    KIND: ClassVar[str] = "heartbeat"

    seq: int
    sent_at: float

    def __post_init__(self) -> None:
        _int("Heartbeat.seq", self.seq, lo=0)
        _set(self, "sent_at", _float("Heartbeat.sent_at", self.sent_at))


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """The sender sends nothing more on this connection."""

    KIND: ClassVar[str] = "goodbye"

    reason: str = ""

    def __post_init__(self) -> None:
        _set(self, "reason", _text("Goodbye.reason", self.reason))


@dataclass(frozen=True, slots=True)
class Control(Message):
    """A control request (list deployments, stats, …) answered by a ``ControlReply`` with the same op."""

    KIND: ClassVar[str] = "control"

    op: str
    body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _str("Control.op", self.op, empty=False)
        _set(self, "body", _wire_dict("Control.body", self.body))


@dataclass(frozen=True, slots=True)
class ControlReply(Message):
    """The answer to a ``Control`` request."""

    KIND: ClassVar[str] = "control_reply"

    op: str
    ok: bool
    body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _str("ControlReply.op", self.op, empty=False)
        _bool("ControlReply.ok", self.ok)
        _set(self, "body", _wire_dict("ControlReply.body", self.body))


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Deploy,
        Deployed,
        Undeploy,
        Upload,
        Uploaded,
        Infer,
        Result,
        Error,
        Heartbeat,
        Goodbye,
        Control,
        ControlReply,
    )
}
"""Every message class by its ``KIND``."""
