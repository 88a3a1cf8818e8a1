"""The connection state machine, driven without sockets: two Connections wired by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from meshai.errors import LocalProtocolError, RemoteProtocolError
from meshai.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SESSION_MESSAGES,
    TRANSITIONS,
    Connection,
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
    Phase,
    Result,
    State,
    Undeploy,
    Upload,
    Uploaded,
    encode,
)


def hello(node_id: str, role: str = "node", version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(node_id, version, role, {"accel": "cpu"}, "127.0.0.1:9000" if role == "node" else "")


ONE_OF_EACH: dict[type[Message], Message] = {
    Hello: hello("a"),
    Deploy: Deploy("d", 0, b"", "", ("x",), ("y",), {"y": ("caller",)}, package="p"),
    Deployed: Deployed("d", 0, True),
    Undeploy: Undeploy("d"),
    Upload: Upload("m@1.0", b"PK\x03\x04package"),
    Uploaded: Uploaded("m@1.0", True),
    Infer: Infer(1, "d", {"x": np.ones((2, 2), np.float32)}),
    Result: Result(1, "d", {"y": np.zeros(3, np.int64)}),
    Error: Error(None, "refused", "no"),
    Heartbeat: Heartbeat(1, 2.0),
    Goodbye: Goodbye("bye"),
    Control: Control("list", {}),
    ControlReply: ControlReply("list", True, {"deployments": []}),
}


def pair() -> tuple[Connection, Connection]:
    return Connection("a", "client"), Connection("b", "node")


def wire(src: Connection, msg: Message, dst: Connection) -> list[Message]:
    """``src`` sends ``msg``; ``dst`` receives its bytes."""
    return dst.receive_data(b"".join(bytes(p) for p in src.send(msg)))


def states(*conns: Connection) -> set[State]:
    return {c.state for c in conns}


def ready_pair() -> tuple[Connection, Connection]:
    a, b = pair()
    wire(a, hello("a", "client"), b)
    wire(b, hello("b"), a)
    assert states(a, b) == {State.READY}
    return a, b


def test_one_of_each_covers_every_kind() -> None:
    assert set(ONE_OF_EACH) == set(MESSAGE_TYPES.values())


def test_handshake() -> None:
    a, b = pair()
    assert states(a, b) == {State.HANDSHAKE}
    assert a.their_hello is None
    assert wire(a, hello("a", "client"), b) == [hello("a", "client")]
    assert a.state is State.HANDSHAKE  # ours sent, theirs not received
    assert b.state is State.HANDSHAKE  # theirs received, ours not sent
    assert b.their_hello == hello("a", "client")
    wire(b, hello("b"), a)
    assert states(a, b) == {State.READY}
    assert a.their_hello == hello("b")
    assert (a.our_phase, a.their_phase) == (Phase.GREETED, Phase.GREETED)


def test_hellos_may_cross() -> None:
    a, b = pair()
    to_b = b"".join(bytes(p) for p in a.send(hello("a", "client")))
    to_a = b"".join(bytes(p) for p in b.send(hello("b")))
    assert states(a, b) == {State.HANDSHAKE}
    a.receive_data(to_a)
    b.receive_data(to_b)
    assert states(a, b) == {State.READY}


@pytest.mark.parametrize("cls", SESSION_MESSAGES)
def test_session_messages_need_both_hellos(cls: type[Message]) -> None:
    msg = ONE_OF_EACH[cls]
    a, b = pair()
    with pytest.raises(LocalProtocolError, match=f"cannot send {cls.__name__} in state HANDSHAKE"):
        a.send(msg)
    wire(a, hello("a", "client"), b)
    with pytest.raises(LocalProtocolError, match=f"cannot send {cls.__name__}"):
        a.send(msg)  # ours sent, theirs not received
    assert a.state is State.HANDSHAKE
    wire(b, hello("b"), a)
    assert wire(a, msg, b) == [msg]
    assert wire(b, msg, a) == [msg]
    assert states(a, b) == {State.READY}


@pytest.mark.parametrize("cls", SESSION_MESSAGES)
def test_peer_session_message_before_handshake_is_refused(cls: type[Message]) -> None:
    data = b"".join(bytes(p) for p in encode(ONE_OF_EACH[cls]))
    # before their Hello
    _, b = pair()
    with pytest.raises(RemoteProtocolError, match=f"peer sent {cls.__name__} in state HANDSHAKE"):
        b.receive_data(data)
    # after their Hello but before ours: they cannot have seen our Hello yet
    _, b = pair()
    b.receive_data(b"".join(bytes(p) for p in encode(hello("a", "client"))))
    with pytest.raises(RemoteProtocolError, match=f"peer sent {cls.__name__}"):
        b.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="receiving is dead"):
        b.receive_data(b"")


def test_second_hello() -> None:
    a, b = ready_pair()
    with pytest.raises(LocalProtocolError, match="cannot send Hello"):
        a.send(hello("a", "client"))
    with pytest.raises(RemoteProtocolError, match="peer sent Hello in state READY"):
        b.receive_data(b"".join(bytes(p) for p in encode(hello("a", "client"))))
    # a second Hello before ours was sent is refused too
    _, b = pair()
    once = b"".join(bytes(p) for p in encode(hello("a", "client")))
    with pytest.raises(RemoteProtocolError, match="peer sent Hello"):
        b.receive_data(once + once)


def test_protocol_version_must_match() -> None:
    _, b = pair()
    with pytest.raises(RemoteProtocolError, match=f"protocol version 2, we speak {PROTOCOL_VERSION}"):
        b.receive_data(b"".join(bytes(p) for p in encode(hello("a", "client", version=2))))
    assert b.their_hello is None


@pytest.mark.parametrize(
    "msg", [hello("x", "client"), hello("a", "node"), hello("a", "client", version=PROTOCOL_VERSION + 1)]
)
def test_our_hello_must_match_us(msg: Hello) -> None:
    a, _ = pair()
    with pytest.raises(LocalProtocolError, match="our Hello must say"):
        a.send(msg)
    assert a.our_phase is Phase.SILENT


def test_heartbeat_only_when_ready() -> None:
    a, b = pair()
    with pytest.raises(LocalProtocolError, match="Heartbeat"):
        a.send(Heartbeat(0, 0.0))
    a, b = ready_pair()
    assert wire(a, Heartbeat(0, 1.0), b) == [Heartbeat(0, 1.0)]


def test_error_and_goodbye_during_handshake() -> None:
    a, b = pair()
    wire(a, hello("a", "client"), b)
    assert wire(b, Error(None, "version", "go away"), a) == [Error(None, "version", "go away")]
    assert wire(b, Goodbye("refused"), a) == [Goodbye("refused")]
    assert states(a, b) == {State.CLOSING}
    assert (b.our_phase, a.their_phase) == (Phase.REFUSED, Phase.REFUSED)
    # b never said Hello, so a may not send session messages, only Goodbye
    with pytest.raises(LocalProtocolError, match="cannot send Infer in state CLOSING"):
        a.send(ONE_OF_EACH[Infer])
    wire(a, Goodbye(), b)
    assert states(a, b) == {State.CLOSED}


def test_goodbye_first_thing() -> None:
    a, b = pair()
    wire(a, Goodbye(), b)
    assert states(a, b) == {State.CLOSING}
    with pytest.raises(LocalProtocolError, match="cannot send Hello"):
        a.send(hello("a", "client"))
    with pytest.raises(LocalProtocolError, match="cannot send Hello"):
        b.send(hello("b"))  # no point greeting a peer that left


def test_after_our_goodbye_in_flight_replies_still_arrive() -> None:
    a, b = ready_pair()
    wire(a, ONE_OF_EACH[Infer], b)
    wire(a, Goodbye("done"), b)
    assert states(a, b) == {State.CLOSING}
    for cls in SESSION_MESSAGES:
        with pytest.raises(LocalProtocolError, match=f"cannot send {cls.__name__} in state CLOSING"):
            a.send(ONE_OF_EACH[cls])
    with pytest.raises(LocalProtocolError):
        a.send(Goodbye())  # only once
    # b still answers what was in flight, then says goodbye too
    assert wire(b, ONE_OF_EACH[Result], a) == [ONE_OF_EACH[Result]]
    assert wire(b, Error(1, "x", "y"), a) == [Error(1, "x", "y")]
    wire(b, Goodbye(), a)
    assert states(a, b) == {State.CLOSED}


def test_peer_sends_after_its_goodbye() -> None:
    a, b = ready_pair()
    wire(a, Goodbye(), b)
    data = b"".join(bytes(p) for p in encode(ONE_OF_EACH[Infer]))
    with pytest.raises(RemoteProtocolError, match="peer sent Infer in state CLOSING"):
        b.receive_data(data)
    # receiving is dead, but b can still tell the peer why and leave
    b.send(Error(None, "protocol", "message after goodbye"))
    b.send(Goodbye())
    assert b.state is State.CLOSED


def test_close() -> None:
    a, _ = ready_pair()
    a.close()
    assert a.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        a.send(Goodbye())
    with pytest.raises(LocalProtocolError, match="closed"):
        a.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="closed"):
        a.get_buffer(-1)


def test_buffered_receive_path() -> None:
    a, b = pair()
    data = b"".join(bytes(p) for p in a.send(hello("a", "client")))
    data += b"".join(bytes(p) for p in encode(ONE_OF_EACH[Result]))  # too early
    got: list[Message] = []
    with pytest.raises(RemoteProtocolError, match="peer sent Result"):
        pos = 0
        while pos < len(data):
            buf = b.get_buffer(-1)
            n = min(len(buf), 7, len(data) - pos)
            buf[:n] = data[pos : pos + n]
            pos += n
            got += b.buffer_updated(n)
    assert got == [hello("a", "client")]
    with pytest.raises(RemoteProtocolError, match="dead"):
        b.get_buffer(-1)


def test_decoder_errors_kill_receiving() -> None:
    _, b = pair()
    with pytest.raises(RemoteProtocolError, match="magic"):
        b.receive_data(b"GARBAGE-GARBAGE-GARBAGE")
    with pytest.raises(RemoteProtocolError, match="dead"):
        b.receive_data(b"")
    b.send(Error(None, "bad_frame", "bad magic"))  # sending still works


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        Connection("", "node")
    with pytest.raises(LocalProtocolError):
        Connection("a", "server")


# ----- the whole table, against the rules stated in words


def expected(sender: Phase, other: Phase, cls: type[Message]) -> bool:
    if sender in (Phase.LEFT, Phase.REFUSED):
        return False  # a side that said goodbye says nothing more
    if cls in (Goodbye, Error):
        return True
    if cls is Hello:
        return sender is Phase.SILENT and other in (Phase.SILENT, Phase.GREETED)
    # session messages: both hellos exchanged; after the other's goodbye, in-flight work still goes out
    return sender is Phase.GREETED and other in (Phase.GREETED, Phase.LEFT)


def test_table_is_complete() -> None:
    assert set(TRANSITIONS) == set(itertools.product(Phase, Phase))
    sent = {cls for allowed in TRANSITIONS.values() for cls in allowed}
    assert sent == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("ours,theirs", list(itertools.product(Phase, Phase)))
def test_every_transition_both_ways(ours: Phase, theirs: Phase) -> None:
    for cls, msg in ONE_OF_EACH.items():
        if cls is Hello:
            msg = hello("a", "client")
        # sending
        conn = Connection("a", "client")
        conn._our_phase, conn._their_phase = ours, theirs  # set up the phases under test
        if expected(ours, theirs, cls):
            conn.send(msg)
            assert conn.our_phase is TRANSITIONS[ours, theirs][cls]
        else:
            with pytest.raises(LocalProtocolError):
                conn.send(msg)
            assert conn.our_phase is ours
        # receiving: the peer is the sender now
        conn = Connection("a", "client")
        conn._our_phase, conn._their_phase = ours, theirs  # set up the phases under test
        data = b"".join(bytes(p) for p in encode(msg))
        if expected(theirs, ours, cls):
            assert conn.receive_data(data) == [msg]
            assert conn.their_phase is TRANSITIONS[theirs, ours][cls]
        else:
            with pytest.raises(RemoteProtocolError):
                conn.receive_data(data)
            assert conn.their_phase is theirs


@pytest.mark.parametrize(
    "ours,theirs,state",
    [
        (Phase.SILENT, Phase.SILENT, State.HANDSHAKE),
        (Phase.GREETED, Phase.SILENT, State.HANDSHAKE),
        (Phase.SILENT, Phase.GREETED, State.HANDSHAKE),
        (Phase.GREETED, Phase.GREETED, State.READY),
        (Phase.LEFT, Phase.GREETED, State.CLOSING),
        (Phase.SILENT, Phase.REFUSED, State.CLOSING),
        (Phase.GREETED, Phase.LEFT, State.CLOSING),
        (Phase.LEFT, Phase.REFUSED, State.CLOSED),
        (Phase.LEFT, Phase.LEFT, State.CLOSED),
    ],
)
def test_state_follows_from_phases(ours: Phase, theirs: Phase, state: State) -> None:
    conn = Connection("a", "node")
    conn._our_phase, conn._their_phase = ours, theirs  # set up the phases under test
    assert conn.state is state
