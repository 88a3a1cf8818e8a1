"""The meshai protocol over asyncio: channels on TCP (optionally TLS), a server, liveness.

Thin I/O around the sans-I/O ``meshai.protocol``.  A ``Channel`` is one live connection
to a peer.  It receives through ``asyncio.BufferedProtocol``, so the socket (or TLS
layer) writes straight into ``Connection.get_buffer()`` — for large tensors, into their
final numpy arrays — and it sends ``Connection.send()``'s scatter-gather pieces without
joining tensor buffers.

Flow control both ways:

- sending: ``Channel.send`` awaits until the transport's write buffer drains below its
  high-water mark (``WRITE_HIGH_WATER``);
- receiving: received messages wait in a bounded queue; when it holds ``max_queue``
  messages or ``max_queue_bytes`` bytes, reading from the socket pauses until the
  consumer catches up.  So a channel buffers at most about ``max_queue_bytes`` plus
  one frame.

Liveness: each side sends a ``Heartbeat`` every ``heartbeat_interval`` (skipped while
other bytes are waiting to go out) and declares the peer dead when no byte at all has
arrived for ``dead_after`` while we are reading.  A peer that starts a frame and then
sends nothing for ``read_timeout`` is cut off.  A peer that breaks the protocol gets an
``Error`` (best effort) and is disconnected; only that channel closes.

Iteration over a channel ends quietly when the peer says ``Goodbye`` or when we close
the channel; any other end (silence, a bad frame, a connection dropped without
``Goodbye``) raises ``PeerError`` naming the peer and the reason.

Link emulation (``meshai.linkem``): while a link spec is installed (``meshai node --link``)
each new channel holds what it sends until its ``LinkShaper`` releases it (delay, jitter,
rate, loss as TCP shows them), one timer per channel for the head of its queue; held bytes
count toward the send backpressure.  While the link is down nothing is released and nothing
is read, on every channel.  Otherwise frames go straight to the socket, as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from types import TracebackType
from typing import Self, TypedDict, Unpack, cast

from meshai import linkem
from meshai.errors import (
    ConfigError,
    LocalProtocolError,
    MeshaiError,
    PeerError,
    ProtocolError,
    RemoteProtocolError,
)
from meshai.protocol import (
    DEFAULT_LIMITS,
    Connection,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Limits,
    Message,
    Phase,
    State,
)

__all__ = [
    "WRITE_HIGH_WATER",
    "Channel",
    "ChannelOptions",
    "Server",
    "connect",
]

log = logging.getLogger(__name__)

_MiB = 1024 * 1024
WRITE_HIGH_WATER = 4 * _MiB
"""``Channel.send`` waits while more than this many bytes are waiting to go out (resumes at a quarter)."""

_JOIN_MAX = 16 * 1024  # frames up to this size are joined into one write where writelines would join anyway
_MESSAGE_OVERHEAD = 64  # bytes counted per queued message on top of its tensor and body bytes
_CLOSE_GRACE = 1.0  # seconds close() lets buffered bytes drain before it aborts the connection
_HELD_LOW = WRITE_HIGH_WATER // 4  # senders blocked by bytes the link emulator holds resume below this
_SCRATCH = 64 * 1024
MIN_FRAME_RATE = 1024 * 1024
"""Bytes/s a peer must at least sustain within a frame: one that trickles slower is cut off after
``read_timeout + frame size / MIN_FRAME_RATE`` seconds (a slowloris defence)."""

Clock = Callable[[], float]
Audit = Callable[["Channel", Message], None]
"""Called with each message a channel sends, once it is encoded and before it is written (``meshai node
--audit-log``)."""


class ChannelOptions(TypedDict, total=False):
    """Per-channel keyword options of ``connect`` and ``Server``; defaults as in ``Channel``."""

    heartbeat_interval: float
    dead_after: float
    read_timeout: float
    max_queue: int
    max_queue_bytes: int
    clock: Clock
    audit: Audit | None


@dataclass(frozen=True, slots=True)
class _Options:
    heartbeat_interval: float = 0.5
    dead_after: float = 2.0
    read_timeout: float = 10.0
    max_queue: int = 128
    max_queue_bytes: int = 16 * _MiB
    clock: Clock = time.monotonic
    audit: Audit | None = None

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "dead_after", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not math.isfinite(self.heartbeat_interval):
            raise ConfigError(f"heartbeat_interval must be finite, got {self.heartbeat_interval!r}")
        for name in ("max_queue", "max_queue_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not callable(self.clock):
            raise ConfigError(f"clock must be callable, got {self.clock!r}")

    @property
    def check_period(self) -> float:
        """How often the liveness rules are applied."""
        return min(self.heartbeat_interval, self.dead_after, self.read_timeout) / 2


def _message_bytes(msg: Message) -> int:
    """Approximate memory a received message holds: its tensors, raw body fields and an overhead."""
    n = _MESSAGE_OVERHEAD
    if msg.TENSOR_FIELD:
        n += sum(a.nbytes for a in getattr(msg, msg.TENSOR_FIELD).values())
    for name in msg.BODY_FIELDS:
        n += len(getattr(msg, name))
    return n


def _frame_pending(conn: Connection) -> bool:
    """True while a frame has been partly received."""
    return not conn.idle


def _address(sockaddr: object) -> str:
    """``host:port`` (``[v6]:port``) of a socket address tuple."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = str(sockaddr[0]), sockaddr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(sockaddr)


class Channel:
    """One live connection to a peer: ``send``, ``recv`` / ``async for``, liveness and ``close``.

    Built by ``connect`` and ``Server``, never by hand; both return it with the hellos exchanged.
    """

    def __init__(self, conn: Connection, options: _Options, peername: str = "?") -> None:
        self._conn = conn
        self._opts = options
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peername = peername
        self._queue: deque[tuple[Message, int]] = deque()
        self._queued_bytes = 0
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._hello_seen = asyncio.Event()  # set when their Hello arrives or the channel closes
        self._lost = asyncio.Event()
        self._reading_paused = False
        self._rx_dead = False
        self._discard: memoryview | None = None
        self._last_rx = options.clock()
        self._frame_started: float | None = None
        self._heartbeat_seq = 0
        self._beat_handle: asyncio.TimerHandle | None = None
        self._check_handle: asyncio.TimerHandle | None = None
        self._refusal: Error | None = None
        self._clean = False
        self._on_closed: Callable[[Channel], None] | None = None
        self.closed = asyncio.Event()
        """Set once the channel is closed, for whatever reason (see ``close_reason``)."""
        self.close_reason = ""
        """Why the channel closed, naming the peer; "" while open."""
        self.bytes_sent = 0
        self.bytes_received = 0
        # link emulator (meshai.linkem): frames held until their release time, in order
        self._shaper: linkem.LinkShaper | None = None
        self._held: deque[tuple[float, bytes | memoryview]] = deque()
        self._held_bytes = 0
        self._held_handle: asyncio.TimerHandle | None = None
        self._tx_paused = False  # the transport's write buffer is over its high-water mark
        self._link_paused = False  # the link is down: reading paused, held frames stay held
        self._close_when_flushed = False

    # ----- public

    @property
    def their_hello(self) -> Hello:
        """The peer's ``Hello``; PeerError before it arrived (never for a channel handed out)."""
        hello = self._conn.their_hello
        if hello is None:
            raise PeerError(f"no hello from {self.name} yet")
        return hello

    @property
    def peer_id(self) -> str:
        """The peer's node id, from its ``Hello``."""
        return self.their_hello.node_id

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session of this channel (peer certificate, version), or None on plain TCP."""
        if self._transport is None:
            return None
        obj = self._transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    @property
    def peername(self) -> str:
        """The peer's socket address as ``host:port``."""
        return self._peername

    @property
    def name(self) -> str:
        """The peer as error messages name it: ``peer 'n1' at 127.0.0.1:5000``."""
        hello = self._conn.their_hello
        who = f"peer {hello.node_id!r}" if hello is not None else "peer"
        return f"{who} at {self._peername}"

    @property
    def buffered_bytes(self) -> int:
        """Approximate bytes held by received messages not yet taken by ``recv``."""
        return self._queued_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes the link emulator holds for this channel, not yet written (0 when it is off)."""
        return self._held_bytes

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused because the receive queue is full."""
        return self._reading_paused

    async def send(self, msg: Message) -> None:
        """Send ``msg``, then wait while the write buffer is full; PeerError if the channel is closed."""
        self._write(msg)
        while not self._writable.is_set():
            await self._writable.wait()
        if self.closed.is_set() and not isinstance(msg, Goodbye):
            raise PeerError(f"message to {self.name} may be lost: {self.close_reason}")

    async def recv(self) -> Message:
        """Return the next message; PeerError (with ``close_reason``) once closed and drained."""
        while not self._queue:
            if self.closed.is_set():
                raise PeerError(self.close_reason)
            self._arrived.clear()
            await self._arrived.wait()
        msg, size = self._queue.popleft()
        self._queued_bytes -= size
        if (
            self._reading_paused
            and len(self._queue) <= self._opts.max_queue // 2
            and self._queued_bytes <= self._opts.max_queue_bytes // 2
        ):
            self._reading_paused = False
            self._last_rx = self._opts.clock()  # silence while we were not reading proves nothing
            if self._transport is not None and not self._link_paused:
                self._transport.resume_reading()
        return msg

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except PeerError:
            if self._clean and not self._queue:
                raise StopAsyncIteration from None
            raise

    async def close(self, reason: str = "") -> None:
        """Say ``Goodbye`` (best effort) and close the connection; idempotent."""
        why = f"we closed the channel to {self.name}" + (f": {reason}" if reason else "")
        self._shutdown(why, clean=True, goodbye=reason)
        transport = self._transport
        if transport is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self._lost.wait()
        except TimeoutError:
            pass
        finally:
            if not self._lost.is_set():
                transport.abort()

    def check_liveness(self) -> None:
        """Apply the liveness rules at ``clock()`` now; runs every ``check_period`` by itself."""
        if self.closed.is_set() or self._reading_paused:
            return
        opts = self._opts
        silent = opts.clock() - self._last_rx
        if silent > opts.dead_after:
            self._shutdown(
                f"{self.name} silent for {opts.dead_after} s", goodbye=f"silent for {opts.dead_after} s"
            )
        elif silent > opts.read_timeout and _frame_pending(self._conn):
            text = f"incomplete frame, then nothing for {opts.read_timeout} s"
            self._shutdown(f"{self.name} sent an {text}", error=Error(None, "read_timeout", text))
        elif self._frame_started is not None:
            size = self._conn.frame_bytes
            budget = opts.read_timeout + size / MIN_FRAME_RATE
            if opts.clock() - self._frame_started > budget:
                text = f"frame of {size} bytes still incomplete after {budget:.1f} s (slower than {MIN_FRAME_RATE} B/s)"
                self._shutdown(f"{self.name} trickled a {text}", error=Error(None, "read_timeout", text))

    # ----- machinery used by connect() and Server

    def _write(self, msg: Message) -> None:
        """Encode and write ``msg`` now, ignoring backpressure; PeerError if closed."""
        transport = self._transport
        if self.closed.is_set() or transport is None or transport.is_closing():
            why = self.close_reason or f"{self.name} is not connected"
            raise PeerError(f"cannot send {type(msg).__name__}: {why}")
        self._emit(transport, self._encode(msg))

    def _encode(self, msg: Message) -> list[bytes | memoryview]:
        """The frame pieces of ``msg``; the audit hook (if any) sees every message that gets this far."""
        pieces = self._conn.send(msg)
        if self._opts.audit is not None:
            self._opts.audit(self, msg)
        return pieces

    def _emit(self, transport: asyncio.Transport, pieces: list[bytes | memoryview]) -> None:
        size = sum(len(p) for p in pieces)
        self.bytes_sent += size
        if self._shaper is not None:
            self._hold(transport, pieces, size)
        elif type(transport).writelines is not asyncio.WriteTransport.writelines:
            transport.writelines(pieces)  # scatter-gather (TLS, Python >= 3.12 sockets)
        elif len(pieces) == 1 or size <= _JOIN_MAX:
            transport.write(b"".join(pieces))  # small: one syscall beats several
        else:
            for piece in pieces:  # the default writelines would join (copy) the tensors
                transport.write(piece)

    async def _await_hello(self, timeout: float, who: str, shown: float | None = None) -> Hello:
        """Wait for the peer's Hello; PeerError on timeout or if the channel closes first."""
        try:
            async with asyncio.timeout(timeout):
                await self._hello_seen.wait()
        except TimeoutError:
            within = f"within {timeout if shown is None else shown:g} s"
            text = f"no hello from {who} {within}"
            self._shutdown(text, error=Error(None, "hello_timeout", f"no hello {within}"))
            raise PeerError(text) from None
        hello = self._conn.their_hello
        if hello is None:
            refusal = self._refusal
            detail = f" ({refusal.code}: {refusal.message})" if refusal is not None else ""
            raise PeerError(f"no hello from {who}: {self.close_reason}{detail}")
        return hello

    def _shutdown(
        self, reason: str, *, clean: bool = False, goodbye: str = "", error: Error | None = None
    ) -> None:
        """Close now: send ``error`` and ``Goodbye`` (best effort), close the socket, wake every waiter."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self._clean = clean
        self._rx_dead = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            final: list[Message] = [] if error is None else [error]
            if self._conn.our_phase in (Phase.SILENT, Phase.GREETED):
                final.append(Goodbye(goodbye))
            for msg in final:
                with contextlib.suppress(LocalProtocolError):
                    self._emit(transport, self._encode(msg))
            if self._held:
                self._close_when_flushed = True  # the link emulator still holds frames: close after them
            else:
                transport.close()
        self._conn.close()
        for handle in (self._beat_handle, self._check_handle):
            if handle is not None:
                handle.cancel()
        self.closed.set()
        self._arrived.set()
        self._writable.set()
        self._hello_seen.set()
        if self._on_closed is not None:
            self._on_closed(self)
        log.debug("channel closed: %s", reason)

    # ----- asyncio.BufferedProtocol callbacks (through _Protocol)

    def _connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._peername = _address(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._shaper = linkem.new_shaper()
        _channels.add(self)
        if linkem.is_down():
            self._apply_link()
        self._last_rx = self._opts.clock()
        self._beat_handle = self._loop.call_later(self._opts.heartbeat_interval, self._beat)
        self._check_handle = self._loop.call_later(self._opts.check_period, self._check)

    def _get_buffer(self, sizehint: int) -> memoryview:
        if not self._rx_dead:
            try:
                return self._conn.get_buffer(sizehint)
            except ProtocolError:  # cannot happen while _rx_dead is False; never let it reach asyncio
                self._rx_dead = True
        if self._discard is None:
            self._discard = memoryview(bytearray(_SCRATCH))
        return self._discard

    def _buffer_updated(self, nbytes: int) -> None:
        if self._rx_dead:
            return
        self._last_rx = self._opts.clock()
        self.bytes_received += nbytes
        try:
            msgs = self._conn.buffer_updated(nbytes)
        except RemoteProtocolError as exc:
            self._shutdown(f"{self.name} broke the protocol: {exc}", error=Error(None, "protocol", str(exc)))
            return
        except LocalProtocolError:  # cannot happen while _rx_dead is False
            self._rx_dead = True
            return
        if self._conn.idle:
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = self._last_rx
        for msg in msgs:
            self._deliver(msg)

    def _deliver(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, Hello):
            self._hello_seen.set()
            return
        if isinstance(msg, Goodbye):
            said = f": {msg.reason}" if msg.reason else ""
            self._shutdown(f"{self.name} said goodbye{said}", clean=True)
            return
        if isinstance(msg, Error) and self._conn.their_hello is None:
            self._refusal = msg
        size = _message_bytes(msg)
        self._queue.append((msg, size))
        self._queued_bytes += size
        self._arrived.set()
        if not self._reading_paused and (
            len(self._queue) >= self._opts.max_queue or self._queued_bytes >= self._opts.max_queue_bytes
        ):
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self._drop_held()
        if exc is None:
            self._shutdown(f"{self.name} closed the connection without goodbye")
        else:
            self._shutdown(f"connection to {self.name} lost: {exc}")

    def _beat(self) -> None:
        transport = self._transport
        if self.closed.is_set() or transport is None or transport.is_closing():
            return
        self._beat_handle = self._loop.call_later(self._opts.heartbeat_interval, self._beat)
        # Bytes already waiting to go out prove we are alive just as well.
        if self._conn.state is State.READY and transport.get_write_buffer_size() == 0 and not self._held:
            self._heartbeat_seq += 1
            self._emit(transport, self._encode(Heartbeat(self._heartbeat_seq, self._opts.clock())))

    def _check(self) -> None:
        if self.closed.is_set():
            return
        self._check_handle = self._loop.call_later(self._opts.check_period, self._check)
        self.check_liveness()

    # ----- link emulator (meshai.linkem); none of this runs unless a link spec is installed or the link is down

    def _hold(self, transport: asyncio.Transport, pieces: list[bytes | memoryview], size: int) -> None:
        """Queue a frame (copied: the caller may reuse its arrays) until the shaper releases it."""
        shaper = self._shaper
        assert shaper is not None
        data = pieces[0] if len(pieces) == 1 and isinstance(pieces[0], bytes) else b"".join(pieces)
        now = self._loop.time()
        chunk = shaper.chunk_bytes
        if chunk is None or size <= chunk:
            parts: list[bytes | memoryview] = [data]
        else:  # a big frame trickles in over a slow link, as it would over TCP
            view = memoryview(data)
            parts = [view[i : i + chunk] for i in range(0, size, chunk)]
        for part in parts:
            release = shaper.schedule(now, len(part))
            if release.drop:
                self._drop_held()
                transport.abort()
                if not self.close_reason:
                    self._shutdown(
                        f"link emulator dropped the connection to {self.name}: "
                        f"lost a packet of a {size}-byte frame (link {shaper.spec})"
                    )
                return
            self._held.append((release.release_at, part))
        self._held_bytes += size
        if self._held_bytes > WRITE_HIGH_WATER:
            self._writable.clear()
        if self._held_handle is None and not self._link_paused:
            self._arm()

    def _arm(self) -> None:
        self._held_handle = self._loop.call_at(self._held[0][0], self._flush)

    def _flush(self) -> None:
        """Write the held frame the timer was armed for and every other one due, in order."""
        self._held_handle = None
        transport = self._transport
        held = self._held
        if transport is None or self._link_paused or not held:
            return
        if transport.is_closing():
            self._drop_held()
            return
        now = self._loop.time()
        due = [held.popleft()[1]]  # the head: its time has come (timers may fire a hair early)
        while held and held[0][0] <= now:
            due.append(held.popleft()[1])
        for part in due:
            self._held_bytes -= len(part)
        if len(due) == 1:
            transport.write(due[0])
        else:
            transport.writelines(due)
        if held:
            self._arm()
        elif self._close_when_flushed:
            transport.close()
        if self._held_bytes <= _HELD_LOW and not self._tx_paused:
            self._writable.set()

    def _drop_held(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        if self._held_handle is not None:
            self._held_handle.cancel()
            self._held_handle = None

    def _apply_link(self) -> None:
        """Follow ``linkem``'s link state: while down, hold everything sent and read nothing."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if linkem.is_down():
            if self._shaper is None:
                self._shaper = linkem.LinkShaper(linkem.LinkSpec())  # pass-through, but it can hold
            if self._held_handle is not None:
                self._held_handle.cancel()
                self._held_handle = None
            if not self._link_paused:
                self._link_paused = True
                if not self._reading_paused:
                    transport.pause_reading()
        elif self._link_paused:
            self._link_paused = False
            if not self._reading_paused:
                transport.resume_reading()
            if self._held and self._held_handle is None:
                self._arm()


class _Protocol(asyncio.BufferedProtocol):
    """Forwards asyncio's callbacks to a ``Channel``."""

    def __init__(self, channel: Channel, on_made: Callable[[Channel], None] | None = None) -> None:
        self.channel = channel
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.channel._connection_made(cast(asyncio.Transport, transport))
        if self._on_made is not None:
            self._on_made(self.channel)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.channel._get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.channel._buffer_updated(nbytes)

    def eof_received(self) -> None:
        return None  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._connection_lost(exc)

    def pause_writing(self) -> None:
        self.channel._tx_paused = True
        self.channel._writable.clear()

    def resume_writing(self) -> None:
        channel = self.channel
        channel._tx_paused = False
        if channel._held_bytes <= WRITE_HIGH_WATER:  # bytes the link emulator holds count too
            channel._writable.set()


_channels: weakref.WeakSet[Channel] = weakref.WeakSet()  # every channel, for link down / up


def _on_link_change(down: bool) -> None:
    """linkem listener (may run in a signal handler): each channel follows in its own loop."""
    for channel in list(_channels):
        with contextlib.suppress(RuntimeError):  # its event loop is closed
            channel._loop.call_soon_threadsafe(channel._apply_link)


linkem.subscribe(_on_link_change)


async def connect(
    host: str,
    port: int,
    hello: Hello,
    *,
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 5.0,
    limits: Limits = DEFAULT_LIMITS,
    **options: Unpack[ChannelOptions],
) -> Channel:
    """Connect over TCP (TLS with ``ssl``), send ``hello``, await the peer's; PeerError on failure."""
    opts = _Options(**options)
    if server_hostname is not None and ssl is None:
        raise ConfigError(f"server_hostname {server_hostname!r} needs an ssl context")
    where = _address((host, port))
    loop = asyncio.get_running_loop()
    conn = Connection(hello.node_id, hello.role, limits)
    channel = Channel(conn, opts, where)
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(
                lambda: _Protocol(channel),
                host,
                port,
                ssl=ssl,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout if ssl is not None else None,
            )
    except TimeoutError:
        raise PeerError(f"cannot connect to {where}: no connection within {timeout:g} s") from None
    except OSError as exc:  # refused, unreachable, TLS handshake failures (ssl.SSLError)
        raise PeerError(f"cannot connect to {where}: {exc}") from exc
    try:
        channel._write(hello)
        await channel._await_hello(max(0.0, deadline - loop.time()), where, timeout)
    except BaseException:
        await channel.close()
        raise
    return channel


class Server:
    """Listens; per connection awaits the peer's Hello, replies, then runs ``on_channel(channel)``.

    ``async with Server(...) as srv``: port 0 binds an ephemeral port (``srv.port``).  When
    ``on_channel`` returns or raises, its channel closes (an exception is logged, the server goes
    on).  Leaving the block stops listening, closes every channel with ``Goodbye`` and ends every task.
    """

    def __init__(
        self,
        host: str,
        port: int,
        hello_factory: Callable[[], Hello],
        on_channel: Callable[[Channel], Awaitable[None]],
        *,
        ssl: SSLContext | None = None,
        limits: Limits = DEFAULT_LIMITS,
        hello_timeout: float = 5.0,
        verify: Callable[[Channel, Hello], object] | None = None,
        **options: Unpack[ChannelOptions],
    ) -> None:
        self.host = host
        self._port = port
        self._hello_factory = hello_factory
        self._on_channel = on_channel
        self._ssl = ssl
        self._limits = limits
        self._hello_timeout = hello_timeout
        self._verify = verify
        self._opts = _Options(**options)
        self._server: asyncio.Server | None = None
        self._all: set[Channel] = set()
        self._ready: set[Channel] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one for port 0)."""
        if self._server is None or not self._server.sockets:
            raise PeerError(f"server on {self.host}:{self._port} is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return _address((self.host, self.port))

    @property
    def channels(self) -> list[Channel]:
        """Live channels whose hellos are exchanged."""
        return [c for c in self._ready if not c.closed.is_set()]

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._accept,
                self.host,
                self._port,
                ssl=self._ssl,
                ssl_handshake_timeout=self._hello_timeout if self._ssl is not None else None,
            )
        except OSError as exc:
            raise PeerError(f"cannot listen on {_address((self.host, self._port))}: {exc}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening, close every channel (``Goodbye``) and end every task; idempotent."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.close("server closing") for c in list(self._all)))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self) -> _Protocol:
        hello = self._hello_factory()
        channel = Channel(Connection(hello.node_id, hello.role, self._limits), self._opts)
        return _Protocol(channel, lambda ch: self._start(ch, hello))

    def _start(self, channel: Channel, hello: Hello) -> None:
        if self._closing:
            channel._shutdown(f"refused {channel.name}: server closing", goodbye="server closing")
            return
        self._all.add(channel)
        channel._on_closed = self._all.discard
        task = asyncio.get_running_loop().create_task(
            self._serve(channel, hello), name=f"meshai-serve {channel.peername}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, channel: Channel, hello: Hello) -> None:
        try:
            theirs = await channel._await_hello(self._hello_timeout, f"peer at {channel.peername}")
            if self._verify is not None:
                try:
                    self._verify(channel, theirs)  # before our Hello: an impostor learns nothing
                except MeshaiError as exc:
                    log.info("refused %s: %s", channel.peername, exc)
                    channel._shutdown(
                        f"refused {channel.name}: {exc}", error=Error(None, "unauthorized", str(exc))
                    )
                    return
            channel._write(hello)
        except PeerError as exc:
            log.info("handshake failed: %s", exc)
            await channel.close()
            return
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"meshai-channel {theirs.node_id}@{channel.peername}")
        self._ready.add(channel)
        try:
            await self._on_channel(channel)
        except PeerError as exc:
            log.info("channel handler ended: %s", exc)
        except Exception as exc:
            log.error("channel handler for %s failed", channel.name, exc_info=True)
            await channel.close(f"handler failed: {type(exc).__name__}")
        finally:
            self._ready.discard(channel)
            await channel.close()
