"""An audit of what a node puts on the wire: one JSON line per message it sends (``--audit-log``).

Each line says what left the node and to whom, never the values: ``{"t", "kind", "peer", "op",
"tensors": [{"name", "dtype", "shape"}], "bytes": {FIELD_PATH: length}}``.  ``tensors`` lists the
arrays of the message's tensor field (``Infer``/``Result``); ``bytes`` the length of every ``bytes``
value anywhere in it — raw body fields (``Deploy.model``, ``Upload.data``) and bytes inside control
bodies, options and metadata, by dotted path (``body.weights.fc3.weight.data``).  ``op`` is set for
``Control``/``ControlReply``.  The transport calls the log with each outgoing message before encoding
it (``ChannelOptions.audit``); messages a node hands to itself never reach the wire and are not logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from meshai.errors import ConfigError, PeerError

if TYPE_CHECKING:
    from meshai.protocol import Message
    from meshai.transport import Channel

__all__ = ["AuditLog", "audit_record"]

log = logging.getLogger(__name__)


def _bytes_in(value: object, path: str, out: dict[str, int]) -> None:
    if isinstance(value, bytes | bytearray | memoryview):
        out[path] = len(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _bytes_in(v, f"{path}.{k}", out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _bytes_in(v, f"{path}.{i}", out)


def audit_record(msg: Message, peer: str, now: float) -> dict[str, Any]:
    """What ``msg`` carries, without its values: kind, peer, op, tensor names/dtypes/shapes, bytes lengths."""
    rec: dict[str, Any] = {"t": now, "kind": msg.KIND, "peer": peer}
    op = getattr(msg, "op", None)
    if isinstance(op, str):
        rec["op"] = op
    tensors = getattr(msg, msg.TENSOR_FIELD) if msg.TENSOR_FIELD else {}
    rec["tensors"] = [
        {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)} for name, a in tensors.items()
    ]
    sizes: dict[str, int] = {}
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        if f.name != msg.TENSOR_FIELD:
            _bytes_in(getattr(msg, f.name), f.name, sizes)
    rec["bytes"] = sizes
    return rec


class AuditLog:
    """Appends one JSON line per outgoing message to ``path``; the transport's ``audit`` hook."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._file: IO[str] | None = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot open --audit-log {str(path)!r}: {exc.strerror or exc}") from None
        self.path = Path(path)

    def __call__(self, channel: Channel, msg: Message) -> None:
        """Record ``msg`` as sent on ``channel`` (a write that fails is logged once and stops the audit)."""
        if self._file is None:
            return
        try:
            peer = channel.peer_id
        except PeerError:  # our Hello goes out before theirs arrives
            peer = channel.peername
        try:
            self._file.write(json.dumps(audit_record(msg, peer, time.time()), sort_keys=True) + "\n")
        except (OSError, ValueError) as exc:
            log.error("audit log %s stopped: %s", self.path, exc)
            self.close()

    def close(self) -> None:
        """Close the file; later messages are not recorded."""
        if self._file is not None:
            f, self._file = self._file, None
            f.close()
