"""A pool of channels to peers, shared by nodes and callers: one channel per peer, readers, controls.

``PeerPool`` connects on demand to a node by id and address, adopts channels a server accepted,
runs one reader task per channel that hands every message to ``on_message(peer_id, msg)``, answers
``Control`` requests through ``on_control``, matches ``ControlReply`` to the request awaiting it, and
calls ``on_lost(peer_id, reason)`` once a channel to a peer is gone.  It holds no business logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from meshai.errors import LocalProtocolError, PeerError, SecurityError
from meshai.protocol import Control, ControlReply, Hello, Message
from meshai.transport import Channel, ChannelOptions, connect

if TYPE_CHECKING:
    from meshai.security import Trust

log = logging.getLogger(__name__)

OnMessage = Callable[[str, Message, Channel], Awaitable[None]]
OnControl = Callable[[str, Control], Awaitable[ControlReply]]
OnLost = Callable[[str, str], Awaitable[None]]


class PeerPool:
    """Channels by peer id; ``async with PeerPool(...)`` closes them all on exit."""

    def __init__(
        self,
        hello: Callable[[], Hello],
        on_message: OnMessage | None = None,
        on_control: OnControl | None = None,
        on_lost: OnLost | None = None,
        *,
        trust: Trust | None = None,
        connect_timeout: float = 5.0,
        options: ChannelOptions | None = None,
    ) -> None:
        self.trust = trust
        self._hello = hello
        self._on_message = on_message
        self._on_control = on_control
        self._on_lost = on_lost
        self._ssl: SSLContext | None = trust.client_ctx if trust is not None else None
        self._timeout = connect_timeout
        self._options: ChannelOptions = options or {}
        self._channels: dict[str, Channel] = {}
        self._addresses: dict[str, str] = {}
        self._connecting: dict[str, asyncio.Future[Channel]] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._offers: set[asyncio.Task[None]] = set()  # revocation lists being handed over
        self._pending_controls: dict[tuple[str, str], asyncio.Future[ControlReply]] = {}
        self._control_locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def __aenter__(self) -> PeerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- channels

    def remember(self, peer_id: str, address: str) -> None:
        """Record where ``peer_id`` listens (``host:port``)."""
        self._addresses[peer_id] = address

    def address_of(self, peer_id: str) -> str | None:
        """The remembered address of a peer."""
        return self._addresses.get(peer_id)

    def live(self) -> dict[str, Channel]:
        """Open channels by peer id."""
        return {k: c for k, c in self._channels.items() if not c.closed.is_set()}

    async def get(self, peer_id: str, address: str | None = None) -> Channel:
        """The open channel to ``peer_id``, connecting to its address if there is none."""
        ch = self._channels.get(peer_id)
        if ch is not None and not ch.closed.is_set():
            return ch
        if self._closed:
            raise PeerError(f"peer pool closed; cannot reach {peer_id!r}")
        if address:
            self._addresses[peer_id] = address
        addr = self._addresses.get(peer_id)
        if not addr:
            raise PeerError(f"unknown peer {peer_id!r}: no address known")
        fut = self._connecting.get(peer_id)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._connecting[peer_id] = fut
        try:
            host, _, port = addr.rpartition(":")
            ch = await connect(
                host.strip("[]"),
                int(port),
                self._hello(),
                ssl=self._ssl,
                timeout=self._timeout,
                **self._options,
            )
            if ch.peer_id != peer_id:
                await ch.close("unexpected identity")
                raise PeerError(f"peer at {addr} says it is {ch.peer_id!r}, expected {peer_id!r}")
            await self._check(ch, peer_id)
            self.adopt(ch)
            fut.set_result(ch)
            return ch
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else PeerError(str(exc)))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._connecting.pop(peer_id, None)

    async def connect_address(self, address: str) -> Channel:
        """Connect to whoever listens at ``address`` (static peer lists) and adopt it under its real id."""
        host, _, port = address.rpartition(":")
        try:
            port_no = int(port)
        except ValueError:
            raise PeerError(f"bad peer address {address!r}: expected host:port") from None
        ch = await connect(
            host.strip("[]"), port_no, self._hello(), ssl=self._ssl, timeout=self._timeout, **self._options
        )
        await self._check(ch, ch.peer_id)
        self._addresses[ch.peer_id] = address
        existing = self._channels.get(ch.peer_id)
        if existing is not None and not existing.closed.is_set():
            await ch.close("already connected")
            return existing
        self.adopt(ch)
        return ch

    async def _check(self, ch: Channel, expected: str) -> None:
        """With a trust store: the node we dialled must prove it is ``expected`` (its certificate)."""
        if self.trust is None:
            return
        try:
            self.trust.verify(ch, expected, "node")
        except SecurityError:
            await ch.close("refused: not a mesh member")
            raise

    def adopt(self, ch: Channel) -> asyncio.Task[None]:
        """Take a channel (connected or accepted): index it by peer id and start its reader."""
        peer = ch.peer_id
        old = self._channels.get(peer)
        self._channels[peer] = ch
        if old is not None and old is not ch and not old.closed.is_set():
            # keep the old one reading until it closes; new sends use the new channel
            pass
        listen = ch.their_hello.listen
        if listen and peer not in self._addresses:
            self._addresses[peer] = listen
        task = asyncio.get_running_loop().create_task(self._read(ch), name=f"meshai-reader {peer}")
        if self.trust is not None and self.trust.crl is not None:
            theirs = ch.their_hello.capabilities.get("revocations", 0)
            if isinstance(theirs, int) and theirs < self.trust.version:
                self.offer_revocations(ch)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return task

    def offer_revocations(self, ch: Channel) -> None:
        """Send our (newer) revocation list to a peer, without waiting for its answer."""
        if self.trust is None or self.trust.crl is None:
            return
        msg = Control("revocations", {"crl": self.trust.crl.to_bytes()})
        task = asyncio.get_running_loop().create_task(self._send_quietly(ch, msg), name="meshai-revocations")
        self._offers.add(task)
        task.add_done_callback(self._offers.discard)

    async def _send_quietly(self, ch: Channel, msg: Message) -> None:
        with contextlib.suppress(PeerError):
            await ch.send(msg)

    async def serve(self, ch: Channel) -> None:
        """Server ``on_channel`` callback: adopt the accepted channel and read it until it ends."""
        await self.adopt(ch)

    async def _read(self, ch: Channel) -> None:
        peer = ch.peer_id
        reason = ""
        try:
            async for msg in ch:
                try:
                    await self._dispatch(peer, msg, ch)
                except PeerError as exc:
                    log.info("while handling %s from %s: %s", type(msg).__name__, peer, exc)
            reason = ch.close_reason or f"peer {peer!r} said goodbye"
        except PeerError as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            reason = f"stopped reading from {peer!r}"
            raise
        finally:
            if self.trust is not None and self._channels.get(peer) in (ch, None):
                self.trust.members.pop(peer, None)  # who proved to be whom: only for live channels
            if self._channels.get(peer) is ch:
                del self._channels[peer]
                for key, fut in list(self._pending_controls.items()):
                    if key[0] == peer and not fut.done():
                        fut.set_exception(PeerError(f"peer {peer!r} is gone: {reason}"))
                if self._on_lost is not None and not self._closed:
                    with contextlib.suppress(Exception):
                        await self._on_lost(peer, reason or f"channel to {peer!r} closed")

    async def _dispatch(self, peer: str, msg: Message, ch: Channel) -> None:
        if isinstance(msg, ControlReply):
            fut = self._pending_controls.get((peer, msg.op))
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if isinstance(msg, Control) and self._on_control is not None:
            try:
                reply = await self._on_control(peer, msg)
            except Exception as exc:  # a control handler must answer, even when it fails
                reply = ControlReply(msg.op, False, {"error": f"{type(exc).__name__}: {exc}"})
            try:
                await ch.send(reply)
            except (
                LocalProtocolError
            ) as exc:  # e.g. a reply over the frame's limits: say so, keep the channel
                await ch.send(ControlReply(msg.op, False, {"error": f"reply not sendable: {exc}"[:1000]}))
            return
        if self._on_message is not None:
            await self._on_message(peer, msg, ch)

    async def control(
        self, peer_id: str, op: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> ControlReply:
        """Send ``Control(op, body)`` to a peer and await its ``ControlReply``."""
        lock = self._control_locks.setdefault(peer_id, asyncio.Lock())
        async with lock:
            ch = await self.get(peer_id)
            fut: asyncio.Future[ControlReply] = asyncio.get_running_loop().create_future()
            self._pending_controls[(peer_id, op)] = fut
            try:
                await ch.send(Control(op, body or {}))
                async with asyncio.timeout(timeout):
                    return await fut
            except TimeoutError:
                raise PeerError(f"peer {peer_id!r} did not answer {op!r} within {timeout:g} s") from None
            finally:
                self._pending_controls.pop((peer_id, op), None)

    async def send(self, peer_id: str, msg: Message) -> None:
        """Send to a peer, connecting if needed; PeerError names the peer when it cannot be reached."""
        ch = await self.get(peer_id)
        await ch.send(msg)

    async def drop(self, peer_id: str, reason: str = "") -> None:
        """Close the channel to a peer (if any)."""
        ch = self._channels.pop(peer_id, None)
        if ch is not None:
            await ch.close(reason)

    async def close(self) -> None:
        """Close every channel and stop every reader (revocation lists being handed over go out first)."""
        if self._offers:
            await asyncio.wait(list(self._offers), timeout=2.0)
        self._closed = True
        chans = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(c.close("leaving") for c in chans), return_exceptions=True)
        readers = list(self._readers)
        for t in readers:
            t.cancel()
        if readers:
            await asyncio.wait(readers)
