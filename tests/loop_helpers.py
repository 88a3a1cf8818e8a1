"""Helpers for tests that drive channels in a fresh event loop of their own: the loop, hellos, servers
on 127.0.0.1 and their handlers, and a hand-driven raw client."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from meshai import linkem
from meshai.protocol import (
    PROTOCOL_VERSION,
    Control,
    ControlReply,
    FrameDecoder,
    Hello,
    Infer,
    Message,
    Result,
    encode,
)
from meshai.transport import Channel, ChannelOptions, Server, connect

T = TypeVar("T")
HOST = "127.0.0.1"
FAST: ChannelOptions = {
    "heartbeat_interval": 0.05,
    "dead_after": 0.3,
}  # quick liveness for tests that need a death


def run(coro: Coroutine[Any, Any, T], timeout: float = 9.0) -> T:
    """Run ``coro`` in a fresh loop, then check it left no task behind."""

    async def main() -> T:
        result = await asyncio.wait_for(coro, timeout)
        await asyncio.sleep(0)
        others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        assert not others, f"tasks left running: {others}"
        return result

    return asyncio.run(main())


def hello(node_id: str, role: str = "node") -> Hello:
    """A Hello as a node (or a client) would send it."""
    return Hello(node_id, PROTOCOL_VERSION, role, {"accel": "cpu"}, "127.0.0.1:9" if role == "node" else "")


def frame(msg: Message) -> bytes:
    """``msg`` as the bytes on the wire."""
    return b"".join(bytes(p) for p in encode(msg))


class Inbox:
    """Server-side handler that hands each channel to the test and keeps it open until closed."""

    def __init__(self, timeout: float = 3.0) -> None:
        self.channels: asyncio.Queue[Channel] = asyncio.Queue()
        self.timeout = timeout  # how long ``next`` waits for a channel

    async def __call__(self, channel: Channel) -> None:
        await self.channels.put(channel)
        await channel.closed.wait()

    async def next(self) -> Channel:
        return await asyncio.wait_for(self.channels.get(), self.timeout)


async def echo_handler(ch: Channel) -> None:
    """Answer Control with ControlReply, echo Infer as Result, anything else back as it is."""
    async for msg in ch:
        if isinstance(msg, Control):
            await ch.send(ControlReply(msg.op, True, msg.body))
        elif isinstance(msg, Infer):
            await ch.send(Result(msg.request_id, msg.deployment, msg.tensors))
        else:
            await ch.send(msg)


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Channel], Awaitable[None]], **kwargs: Any) -> AsyncIterator[Server]:
    """A server on ``HOST`` (any free port) that says hello as ``srv``."""
    async with Server(HOST, 0, lambda: hello("srv"), handler, **kwargs) as srv:
        yield srv


async def connect_client(port: int, client_ctx: ssl.SSLContext | None, **options: Any) -> Channel:
    """Client ``c`` of the server on ``port``: over TLS with ``client_ctx`` (the server's certificate
    checked for ``localhost``), over plain TCP where it is None."""
    return await connect(
        HOST,
        port,
        hello("c", "client"),
        ssl=client_ctx,
        server_hostname="localhost" if client_ctx is not None else None,
        **options,
    )


async def raw_client(port: int, node_id: str = "raw") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-driven client: sends a Hello frame, reads the server's Hello, then does what the test says."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(frame(hello(node_id, "client")))
    decoder = FrameDecoder()
    got: list[Message] = []
    while not got:
        got = decoder.feed(await asyncio.wait_for(reader.read(65536), 3.0))
    assert isinstance(got[0], Hello) and got[0].node_id == "srv"
    return reader, writer


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.fixture
def clean_linkem() -> Iterator[None]:
    """The test starts and ends with no link emulation installed and the link up (module state)."""
    linkem.uninstall()
    linkem.link_up()
    try:
        yield
    finally:
        linkem.uninstall()
        linkem.link_up()
