"""The connection state machine: which message each side may send when, in one table.

Each side of a connection has a *phase* — what it has said so far:

- ``SILENT``:  no ``Hello`` yet;
- ``GREETED``: sent its ``Hello``;
- ``LEFT``:    sent ``Goodbye`` after its ``Hello``;
- ``REFUSED``: sent ``Goodbye`` without ever sending ``Hello``.

``TRANSITIONS`` maps (sender's phase, other side's phase) to the message types the sender may
send and the sender's phase afterwards.  Sending and receiving use the same table (the protocol is
symmetric), with ``ours``/``theirs`` swapped.  In words:

- ``Hello`` comes first and once; ``Goodbye`` may be sent at any time but once; a side that has
  sent ``Goodbye`` sends nothing more.
- ``Error`` may be sent during the handshake too (to say why a peer is refused, ``request_id=None``).
- Every other message (``Deploy``, ``Infer``, ``Heartbeat``, ``Control``, …) needs both hellos
  exchanged: our ``Hello`` sent and theirs received.  After one side's ``Goodbye`` the other side
  may still send such messages (requests in flight) until it says ``Goodbye`` too.

The connection's ``state`` follows from the two phases:

- ``HANDSHAKE``: the two hellos are not both exchanged yet;
- ``READY``: both hellos exchanged;
- ``CLOSING``: one side said ``Goodbye``;
- ``CLOSED``: both said ``Goodbye``, or ``close()`` was called.

A message the table forbids raises ``LocalProtocolError`` from ``send`` (our bug; the state does not
change) and ``RemoteProtocolError`` from the receiving calls (the peer's fault; receiving is then
dead, and the messages decoded in that same call are dropped with it — the connection is going
away).  A received ``Hello`` must carry our ``PROTOCOL_VERSION``; the ``Hello`` we send must carry our
id, role and version.
"""

from __future__ import annotations

import enum

from meshai.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meshai.protocol.framing import DEFAULT_LIMITS, FrameDecoder, Limits, encode
from meshai.protocol.messages import (
    PROTOCOL_VERSION,
    ROLES,
    Control,
    ControlReply,
    Deploy,
    Deployed,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Infer,
    Message,
    Result,
    Undeploy,
    Upload,
    Uploaded,
)

__all__ = ["SESSION_MESSAGES", "TRANSITIONS", "Connection", "Phase", "State"]


class State(enum.Enum):
    """Where a connection stands, derived from both sides' phases."""

    HANDSHAKE = "HANDSHAKE"
    READY = "READY"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class Phase(enum.Enum):
    """What one side of a connection has said so far."""

    SILENT = "SILENT"
    GREETED = "GREETED"
    LEFT = "LEFT"
    REFUSED = "REFUSED"


SESSION_MESSAGES: tuple[type[Message], ...] = (
    Deploy,
    Deployed,
    Undeploy,
    Upload,
    Uploaded,
    Infer,
    Result,
    Heartbeat,
    Control,
    ControlReply,
)
"""Messages that need both hellos exchanged."""

_S, _G, _L, _R = Phase.SILENT, Phase.GREETED, Phase.LEFT, Phase.REFUSED
_SESSION_G = {cls: _G for cls in SESSION_MESSAGES}

TRANSITIONS: dict[tuple[Phase, Phase], dict[type[Message], Phase]] = {
    # (sender, other side): {message type the sender may send: sender's phase afterwards}
    (_S, _S): {Hello: _G, Error: _S, Goodbye: _R},
    (_S, _G): {Hello: _G, Error: _S, Goodbye: _R},
    (_S, _L): {Error: _S, Goodbye: _R},
    (_S, _R): {Error: _S, Goodbye: _R},
    (_G, _S): {Error: _G, Goodbye: _L},
    (_G, _G): {**_SESSION_G, Error: _G, Goodbye: _L},
    # the other side left after the handshake: in-flight work may still be answered
    (_G, _L): {**_SESSION_G, Error: _G, Goodbye: _L},
    (_G, _R): {Error: _G, Goodbye: _L},
    **{(done, other): {} for done in (_L, _R) for other in Phase},
}
"""The one transition table: who may send what in which phases, and the sender's next phase."""

_GONE = (_L, _R)


def _state(ours: Phase, theirs: Phase, closed: bool) -> State:
    if closed or (ours in _GONE and theirs in _GONE):
        return State.CLOSED
    if ours in _GONE or theirs in _GONE:
        return State.CLOSING
    if ours is _G and theirs is _G:
        return State.READY
    return State.HANDSHAKE


class Connection:
    """One peer connection, sans-I/O: ``send`` returns frame pieces, the receive calls return messages."""

    def __init__(self, our_id: str, role: str, limits: Limits = DEFAULT_LIMITS) -> None:
        if not isinstance(our_id, str) or not our_id:
            raise LocalProtocolError(f"our_id must be a non-empty str, got {our_id!r}")
        if role not in ROLES:
            raise LocalProtocolError(f"role must be one of {ROLES}, got {role!r}")
        self.our_id = our_id
        self.role = role
        self.limits = limits
        self._our_phase = Phase.SILENT
        self._their_phase = Phase.SILENT
        self._their_hello: Hello | None = None
        self._closed = False
        self._decoder = FrameDecoder(limits)
        self._receive_error: ProtocolError | None = None

    @property
    def state(self) -> State:
        """The connection's state, from both sides' phases and ``close()``."""
        return _state(self._our_phase, self._their_phase, self._closed)

    @property
    def our_phase(self) -> Phase:
        """What we have said so far."""
        return self._our_phase

    @property
    def their_phase(self) -> Phase:
        """What the peer has said so far."""
        return self._their_phase

    @property
    def frame_bytes(self) -> int:
        """Declared size of the frame being received (0 before its prefix is complete)."""
        return self._decoder.frame_bytes

    @property
    def idle(self) -> bool:
        """True between frames (no partial frame buffered); see ``FrameDecoder.idle``."""
        return self._decoder.idle

    @property
    def their_hello(self) -> Hello | None:
        """The peer's ``Hello``, or None before it arrived."""
        return self._their_hello

    def send(self, msg: Message) -> list[bytes | memoryview]:
        """Check ``msg`` against the state table and encode it; LocalProtocolError if not allowed now."""
        if self._closed:
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: connection is closed")
        nxt = self._allowed(msg, self._our_phase, self._their_phase)
        if nxt is None:
            raise LocalProtocolError(
                f"cannot send {type(msg).__name__} in state {self.state.name} "
                f"(we are {self._our_phase.name}, they are {self._their_phase.name})"
            )
        if isinstance(msg, Hello) and (msg.node_id, msg.role, msg.protocol_version) != (
            self.our_id,
            self.role,
            PROTOCOL_VERSION,
        ):
            raise LocalProtocolError(
                f"our Hello must say node_id={self.our_id!r}, role={self.role!r}, "
                f"protocol_version={PROTOCOL_VERSION}, got {msg.node_id!r}, {msg.role!r}, "
                f"{msg.protocol_version}"
            )
        pieces = encode(msg, self.limits)
        self._our_phase = nxt
        return pieces

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Decode incoming bytes, check each message against the table; RemoteProtocolError if not allowed."""
        self._check_receiving()
        try:
            return self._received(self._decoder.feed(data))
        except RemoteProtocolError as exc:
            self._receive_error = exc
            raise

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """``BufferedProtocol.get_buffer``: a buffer to receive into (see ``FrameDecoder.get_buffer``)."""
        self._check_receiving()
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """``BufferedProtocol.buffer_updated``: the messages completed by ``nbytes`` received bytes."""
        self._check_receiving()
        try:
            return self._received(self._decoder.buffer_updated(nbytes))
        except RemoteProtocolError as exc:
            self._receive_error = exc
            raise

    def close(self) -> None:
        """Mark the connection CLOSED: nothing more is sent or received."""
        self._closed = True

    # ----- machinery

    @staticmethod
    def _allowed(msg: Message, sender: Phase, other: Phase) -> Phase | None:
        return TRANSITIONS[sender, other].get(type(msg))

    def _check_receiving(self) -> None:
        if self._closed:
            raise LocalProtocolError("cannot receive: connection is closed")
        if self._receive_error is not None:
            raise RemoteProtocolError(f"receiving is dead after an earlier error: {self._receive_error}")

    def _received(self, msgs: list[Message]) -> list[Message]:
        for msg in msgs:
            self._receive_one(msg)
        return msgs

    def _receive_one(self, msg: Message) -> None:
        nxt = self._allowed(msg, self._their_phase, self._our_phase)
        if nxt is None:
            raise RemoteProtocolError(
                f"peer sent {type(msg).__name__} in state {self.state.name} "
                f"(they are {self._their_phase.name}, we are {self._our_phase.name})"
            )
        if isinstance(msg, Hello):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"peer {msg.node_id!r} speaks protocol version {msg.protocol_version}, "
                    f"we speak {PROTOCOL_VERSION}"
                )
            self._their_hello = msg
        self._their_phase = nxt
