"""The asyncio transport over real sockets on 127.0.0.1: handshake, messages, flow control,
liveness, bad peers, clean close and TLS.  Each test runs its own event loop via ``asyncio.run``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path

import numpy as np
import pytest
from loop_helpers import (
    FAST,
    HOST,
    Inbox,
    close_writer,
    connect_client,
    echo_handler,
    frame,
    hello,
    raw_client,
    run,
    serving,
)

from meshai.errors import ConfigError, PeerError
from meshai.protocol import (
    Control,
    ControlReply,
    Deploy,
    Deployed,
    Error,
    FrameDecoder,
    Goodbye,
    Infer,
    Message,
    Result,
    Undeploy,
)
from meshai.protocol.framing import MAGIC, PREFIX
from meshai.security import self_signed_tls
from meshai.transport import Channel, ChannelOptions, Server, connect


async def read_until_eof(reader: asyncio.StreamReader) -> list[Message]:
    """Every message the peer sends until it closes the connection."""
    decoder = FrameDecoder()
    out: list[Message] = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), 3.0):
            out += decoder.feed(chunk)
    return out


async def good_client_works(port: int) -> None:
    """A well-behaved client still gets served: it connects and round-trips a Control message."""

    client = await connect(HOST, port, hello("good", "client"))
    await client.send(Control("ping", {"n": 1}))
    reply = await asyncio.wait_for(client.recv(), 3.0)
    assert reply == ControlReply("ping", True, {"n": 1})
    await client.close()


# --------------------------------------------------------------------------- handshake and messages


def test_hello_exchange() -> None:
    async def main() -> None:
        inbox = Inbox()
        async with serving(inbox) as srv:
            assert srv.address == f"{HOST}:{srv.port}" and srv.port > 0
            client = await connect(HOST, srv.port, hello("c1", "client"))
            server_side = await inbox.next()
            assert client.their_hello == hello("srv")
            assert client.peer_id == "srv" and client.peername == srv.address
            assert server_side.their_hello == hello("c1", "client") and server_side.peer_id == "c1"
            assert server_side.peername.startswith(f"{HOST}:")
            assert srv.channels == [server_side]
            assert not client.closed.is_set() and client.close_reason == ""
            await client.close()

    run(main())


ONE_OF_EACH: list[Message] = [
    Deploy("d", 0, b"\x00onnx" * 1000, "ab" * 32, ("x",), ("y",), {"y": ("caller",)}, options={"k": [1]}),
    Deploy("d", 1, b"", "", ("x",), ("y",), {"y": ("n2",)}, package="p"),
    Deployed("d", 0, True, "ok"),
    Undeploy("d"),
    Infer(1, "d", {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False])}),
    Result(1, "d", {"y": np.zeros((0, 3), np.int64), "z": np.ones(5, np.uint8)}),
    Error(7, "failed", "stage 1 on n2", "d"),
    Error(None, "refused", "no"),
    Control("stats", {"deep": {"a": [1, 2.5, None, b"x"]}}),
    ControlReply("stats", False, {}),
]


def test_every_message_type_and_large_tensors_round_trip() -> None:
    async def main() -> None:
        async with serving(echo_handler) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"))
            for msg in ONE_OF_EACH:
                await client.send(msg)
                back = await asyncio.wait_for(client.recv(), 3.0)
                if isinstance(msg, Control):
                    assert back == ControlReply(msg.op, True, msg.body)
                elif isinstance(msg, Infer):
                    assert back == Result(msg.request_id, msg.deployment, msg.tensors)
                else:
                    assert back == msg
            rng = np.random.default_rng(0)
            for nbytes in (4 * 1024 * 1024, 64 * 1024, 64 * 1024 - 4, 3):
                x = rng.standard_normal(max(1, nbytes // 4), dtype=np.float32)
                await client.send(Infer(nbytes, "d", {"x": x}))
                back = await asyncio.wait_for(client.recv(), 3.0)
                assert isinstance(back, Result) and back.request_id == nbytes
                np.testing.assert_array_equal(back.tensors["x"], x)
                assert back.tensors["x"].flags.writeable
            assert client.bytes_sent > 4 * 1024 * 1024 and client.bytes_received > 4 * 1024 * 1024
            await client.close()

    run(main())


def test_thousand_small_messages_arrive_in_order() -> None:
    async def main() -> None:
        inbox = Inbox()
        async with serving(inbox) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"))
            server_side = await inbox.next()
            for i in range(1000):
                await client.send(Infer(i, "d", {"x": np.full(4, i, np.int32)}))
            for i in range(1000):
                msg = await asyncio.wait_for(server_side.recv(), 3.0)
                assert isinstance(msg, Infer) and msg.request_id == i
                assert msg.tensors["x"].tolist() == [i] * 4
            await client.close()

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_slow_consumer_blocks_sender_and_bounds_buffering(tls: bool, tmp_path: Path) -> None:
    mib = 1024 * 1024
    cap = 8 * mib
    server_ctx, client_ctx = tls_contexts(tmp_path) if tls else (None, None)

    async def main() -> None:
        inbox = Inbox()
        liveness: ChannelOptions = {"heartbeat_interval": 0.05, "dead_after": 0.4}  # the pause outlasts it
        async with serving(inbox, ssl=server_ctx, max_queue_bytes=cap, **liveness) as srv:
            client = await connect_client(srv.port, client_ctx, **liveness)
            server_side = await inbox.next()
            x = np.ones(mib, np.float32)  # 4 MiB
            total = 40  # 160 MiB: far more than every buffer on the way together
            sent = 0

            async def produce() -> None:
                nonlocal sent
                for i in range(total):
                    await client.send(Infer(i, "d", {"x": x}))
                    sent += 1

            producer = asyncio.create_task(produce())
            peak = 0
            for _ in range(20):  # 1 s in which nobody reads
                await asyncio.sleep(0.05)
                peak = max(peak, server_side.buffered_bytes)
            assert sent < total, "the sender never blocked"
            assert server_side.reading_paused
            assert peak <= cap + 4 * mib + 4096, f"receiver buffered {peak} bytes"
            assert not server_side.closed.is_set() and not client.closed.is_set()  # paused, not dead
            for i in range(total):
                msg = await asyncio.wait_for(server_side.recv(), 3.0)
                assert isinstance(msg, Infer) and msg.request_id == i
                peak = max(peak, server_side.buffered_bytes)
            await asyncio.wait_for(producer, 3.0)
            assert peak <= cap + 4 * mib + 4096
            await client.close()

    run(main())


# --------------------------------------------------------------------------- liveness


def test_heartbeats_keep_an_idle_connection_alive() -> None:
    async def main() -> None:
        inbox = Inbox()
        async with serving(inbox) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"))
            server_side = await inbox.next()
            await asyncio.sleep(3.0)
            assert not client.closed.is_set() and not server_side.closed.is_set()
            await client.send(Undeploy("d"))
            assert await asyncio.wait_for(server_side.recv(), 1.0) == Undeploy("d")
            assert server_side.buffered_bytes == 0  # heartbeats are never queued
            await client.close()

    run(main())


def test_silent_server_is_declared_dead_within_dead_after_plus_one_interval() -> None:
    """A peer that answers the handshake by hand and then goes quiet: defaults, so within 3 s."""

    async def main() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            decoder = FrameDecoder()
            got: list[Message] = []
            while not got:
                got = decoder.feed(await reader.read(65536))
            writer.write(frame(hello("mute")))
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):  # swallow heartbeats, send nothing
                    pass
            writer.close()

        raw = await asyncio.start_server(mute, HOST, 0)
        port = raw.sockets[0].getsockname()[1]
        client = await connect(HOST, port, hello("c", "client"))
        start = time.monotonic()
        with pytest.raises(PeerError, match=r"peer 'mute' at 127\.0\.0\.1:\d+ silent for 2\.0 s"):
            await client.recv()
        elapsed = time.monotonic() - start
        assert 1.9 <= elapsed <= 2.0 + 0.5 + 0.3, elapsed
        assert "silent" in client.close_reason
        with pytest.raises(PeerError, match="silent"):
            await client.send(Undeploy("d"))
        await client.close()  # idempotent after death
        raw.close()
        await raw.wait_closed()

    run(main())


def test_silent_client_is_dropped_by_the_server() -> None:
    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(ch: Channel) -> None:
            try:
                async for _ in ch:
                    pass
            except PeerError as exc:
                outcome.set_result(str(exc))

        async with serving(handler, **FAST) as srv:
            reader, writer = await raw_client(srv.port, "quiet")
            start = time.monotonic()
            text = await asyncio.wait_for(outcome, 2.0)
            assert time.monotonic() - start <= 0.3 + 0.05 + 0.2
            assert "peer 'quiet'" in text and "silent for 0.3 s" in text
            msgs = await read_until_eof(reader)  # heartbeats, then Goodbye, then EOF
            assert isinstance(msgs[-1], Goodbye) and "silent" in msgs[-1].reason
            await close_writer(writer)
            assert srv.channels == []

    run(main())


def test_liveness_rule_with_an_injected_clock() -> None:
    async def main() -> None:
        now = [1000.0]
        inbox = Inbox()
        async with serving(inbox, clock=lambda: now[0]) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"))
            server_side = await inbox.next()
            now[0] += 1.9
            server_side.check_liveness()
            assert not server_side.closed.is_set()
            await client.send(Undeploy("d"))  # any byte resets the silence
            await asyncio.wait_for(server_side.recv(), 1.0)
            now[0] += 1.9
            server_side.check_liveness()
            assert not server_side.closed.is_set()
            now[0] += 0.2
            server_side.check_liveness()
            assert server_side.closed.is_set()
            assert server_side.close_reason.endswith(
                "peer 'c' at " + server_side.peername + " silent for 2.0 s"
            )
            with pytest.raises(PeerError, match=r"silent for 2\.0 s"):
                await server_side.recv()
            await asyncio.wait_for(client.closed.wait(), 1.0)  # it got our Goodbye
            assert "said goodbye: silent for 2.0 s" in client.close_reason
            with pytest.raises(StopAsyncIteration):
                await client.__anext__()

    run(main())


# --------------------------------------------------------------------------- bad peers


def test_garbage_bytes_close_that_connection_only(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serving(echo_handler) as srv:
            reader, writer = await asyncio.open_connection(HOST, srv.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            msgs = await read_until_eof(reader)
            await close_writer(writer)
            assert [type(m) for m in msgs] == [Error, Goodbye]
            assert isinstance(msgs[0], Error) and msgs[0].code == "protocol"
            assert "bad frame magic" in msgs[0].message
            await good_client_works(srv.port)

    with caplog.at_level(logging.INFO, logger="meshai.transport"):
        run(main())
    assert "bad frame magic" in caplog.text


def test_oversized_frame_declaration_after_hello() -> None:
    async def main() -> None:
        reasons: asyncio.Queue[str] = asyncio.Queue()

        async def handler(ch: Channel) -> None:
            if ch.peer_id != "huge":
                await echo_handler(ch)
                return
            with pytest.raises(PeerError) as info:
                await ch.recv()
            await reasons.put(str(info.value))

        async with serving(handler) as srv:
            reader, writer = await raw_client(srv.port, "huge")
            writer.write(PREFIX.pack(MAGIC, 10, 2**40))
            msgs = await read_until_eof(reader)
            await close_writer(writer)
            assert isinstance(msgs[0], Error) and "exceeds limit" in msgs[0].message
            reason = await asyncio.wait_for(reasons.get(), 2.0)
            assert "peer 'huge'" in reason and "broke the protocol" in reason and "exceeds limit" in reason
            await good_client_works(srv.port)

    run(main())


def test_truncated_frame_then_silence_hits_read_timeout() -> None:
    async def main() -> None:
        reasons: asyncio.Queue[str] = asyncio.Queue()

        async def handler(ch: Channel) -> None:
            if ch.peer_id != "slow":
                await echo_handler(ch)
                return
            with pytest.raises(PeerError) as info:
                await ch.recv()
            await reasons.put(str(info.value))

        async with serving(handler, read_timeout=0.3) as srv:
            reader, writer = await raw_client(srv.port, "slow")
            data = frame(Undeploy("some-deployment"))
            writer.write(data[: len(data) - 3])
            start = time.monotonic()
            msgs = await read_until_eof(reader)
            assert time.monotonic() - start < 1.5  # read_timeout, long before dead_after (2 s)
            await close_writer(writer)
            assert isinstance(msgs[-2], Error) and msgs[-2].code == "read_timeout"
            reason = await asyncio.wait_for(reasons.get(), 2.0)
            assert "peer 'slow'" in reason and "incomplete frame, then nothing for 0.3 s" in reason
            await good_client_works(srv.port)

    run(main())


def test_trickled_frame_is_cut_off_although_bytes_keep_arriving() -> None:
    """Slowloris: a peer that declares a frame and sends it a byte at a time never goes silent,
    yet is cut off once the frame overruns read_timeout + size / MIN_FRAME_RATE."""

    async def main() -> None:
        reasons: asyncio.Queue[str] = asyncio.Queue()

        async def handler(ch: Channel) -> None:
            if ch.peer_id != "trickle":
                await echo_handler(ch)
                return
            with pytest.raises(PeerError) as info:
                await ch.recv()
            await reasons.put(str(info.value))

        async with serving(handler, read_timeout=0.4, dead_after=2.0) as srv:
            reader, writer = await raw_client(srv.port, "trickle")
            data = frame(Undeploy("some-deployment-with-a-long-name"))
            start = time.monotonic()
            for i in range(len(data) - 1):  # never the last byte
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(data[i : i + 1])
                await asyncio.sleep(0.05)
                if not reasons.empty():
                    break
            reason = await asyncio.wait_for(reasons.get(), 3.0)
            assert time.monotonic() - start < 2.0  # well before the frame could finish at this pace
            assert "trickled a frame" in reason and "peer 'trickle'" in reason
            await close_writer(writer)
            await good_client_works(srv.port)

    run(main())


def test_handler_exception_closes_only_its_channel(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def handler(ch: Channel) -> None:
            if ch.peer_id == "bad":
                raise ValueError("boom")
            await echo_handler(ch)

        async with serving(handler) as srv:
            bad = await connect(HOST, srv.port, hello("bad", "client"))
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(bad.__anext__(), 2.0)
            assert "handler failed: ValueError" in bad.close_reason
            await bad.close()
            await good_client_works(srv.port)

    with caplog.at_level(logging.ERROR, logger="meshai.transport"):
        run(main())
    assert "boom" in caplog.text


def test_connect_failures_name_the_address() -> None:
    async def main() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):  # never answers the Hello
                    pass
            writer.close()

        raw = await asyncio.start_server(mute, HOST, 0)
        port = raw.sockets[0].getsockname()[1]
        with pytest.raises(PeerError, match=rf"no hello from 127\.0\.0\.1:{port} within 0\.3 s"):
            await connect(HOST, port, hello("c", "client"), timeout=0.3)
        raw.close()
        await raw.wait_closed()
        with pytest.raises(PeerError, match=rf"cannot connect to 127\.0\.0\.1:{port}"):
            await connect(HOST, port, hello("c", "client"), timeout=1.0)

    run(main())


def test_options_are_validated() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="dead_after"):
            await connect(HOST, 1, hello("c", "client"), dead_after=0)
        with pytest.raises(ConfigError, match="max_queue"):
            Server(HOST, 0, lambda: hello("s"), echo_handler, max_queue=0)

    run(main())


# --------------------------------------------------------------------------- closing


def test_clean_close_ends_iteration_on_both_sides() -> None:
    async def main() -> None:
        got: list[Message] = []
        finished = asyncio.Event()

        async def handler(ch: Channel) -> None:
            async for msg in ch:  # ends quietly on Goodbye
                got.append(msg)
            assert "peer 'c'" in ch.close_reason and "said goodbye: done" in ch.close_reason
            finished.set()

        async with serving(handler) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"))
            await client.send(Undeploy("a"))
            await client.send(Undeploy("b"))
            await client.close("done")
            await client.close("again")  # idempotent
            assert client.closed.is_set() and client.close_reason.endswith(": done")
            await asyncio.wait_for(finished.wait(), 2.0)
            assert got == [Undeploy("a"), Undeploy("b")]
            with pytest.raises(PeerError, match="closed the channel"):
                await client.send(Undeploy("c"))
            with pytest.raises(StopAsyncIteration):
                await client.__anext__()

    run(main())


def test_leaving_the_server_says_goodbye_to_every_client() -> None:
    async def main() -> None:
        inbox = Inbox()
        async with serving(inbox) as srv:
            clients = [await connect(HOST, srv.port, hello(f"c{i}", "client")) for i in range(3)]
            for _ in clients:
                await inbox.next()
            assert len(srv.channels) == 3
        for client in clients:
            msgs = [m async for m in client]  # ends quietly
            assert msgs == []
            assert "said goodbye: server closing" in client.close_reason
            await client.close()

    run(main())


def test_peer_vanishing_without_goodbye_raises() -> None:
    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(ch: Channel) -> None:
            try:
                async for _ in ch:
                    pass
            except PeerError as exc:
                outcome.set_result(str(exc))

        async with serving(handler) as srv:
            _, writer = await raw_client(srv.port, "gone")
            await close_writer(writer)
            text = await asyncio.wait_for(outcome, 2.0)
            assert "peer 'gone'" in text and "without goodbye" in text

    run(main())


# --------------------------------------------------------------------------- TLS


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA-less self-signed server certificate for localhost / 127.0.0.1 (server auth only)."""
    return self_signed_tls(tmp_path, HOST)


def test_tls_round_trip(tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)

    async def main() -> None:
        async with serving(echo_handler, ssl=server_ctx) as srv:
            client = await connect_client(srv.port, client_ctx)
            assert client.peer_id == "srv"
            x = np.random.default_rng(1).standard_normal(1024 * 1024, dtype=np.float32)
            for i, arr in enumerate((x, x[: 16 * 1024], x[:3])):
                await client.send(Infer(i, "d", {"x": arr}))
                back = await asyncio.wait_for(client.recv(), 3.0)
                assert isinstance(back, Result) and back.request_id == i
                np.testing.assert_array_equal(back.tensors["x"], arr)
            for msg in ONE_OF_EACH[:4]:
                await client.send(msg)
                assert await asyncio.wait_for(client.recv(), 3.0) == msg
            await client.close()
            # a client that does not trust the certificate never gets a channel
            with pytest.raises(PeerError, match="cannot connect"):
                await connect(HOST, srv.port, hello("c", "client"), ssl=ssl.create_default_context())

    run(main())
