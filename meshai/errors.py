"""The one error hierarchy of meshai.

Every error says what was wrong and with which value.  The CLI turns any
``MeshaiError`` into one line on stderr and a non-zero exit, never a traceback.
Errors carry whose fault they are where that matters (``LocalProtocolError`` is
ours, ``RemoteProtocolError`` the peer's), in the manner of h11.
"""

from __future__ import annotations


class MeshaiError(Exception):
    """Root of every error meshai raises on purpose."""


class ConfigError(MeshaiError):
    """A bad argument, flag, profile or configuration value."""


class ModelError(MeshaiError):
    """A model that cannot be read, is not ONNX, or cannot be run."""


class PlanError(MeshaiError):
    """No plan satisfies the request; the message names the op, node and limit."""


class ProtocolError(MeshaiError):
    """A frame or message that breaks the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (its fault); the connection closes."""


class SecurityError(MeshaiError):
    """A certificate, signature, package or peer identity was refused."""


class PeerError(MeshaiError):
    """A peer is unknown, unreachable, or died while work depended on it."""


class DeploymentError(MeshaiError):
    """A stage could not be deployed, or a deployment is unknown."""


class InferenceError(MeshaiError):
    """A request failed; the message names the stage and node where it failed."""


def check_min(name: str, value: int, lo: int, error: type[MeshaiError] = ConfigError) -> None:
    """Raise ``error`` ("NAME must be >= LO, got VALUE") when ``value`` is below ``lo``."""
    if value < lo:
        raise error(f"{name} must be >= {lo}, got {value}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
