"""Peer discovery: one interface (`Discovery`), two backends (mDNS, static list).

A node advertises an `Advert` (id, address, protocol version, a short capability
summary, certificate fingerprint) and learns the adverts of its peers, as a
snapshot (`peers()`), as a stream of `PeerEvent`s (`events()`), or by waiting for
enough of them (`wait_for()`).  Backends are async context managers: leaving the
block stops every task, closes every socket and unregisters from mDNS.

Liveness is not discovery's job.  A peer that leaves cleanly sends mDNS goodbye
packets and disappears within milliseconds; a peer that is killed (or loses its
link) sends nothing, and zeroconf reports a service gone only when its pointer
record expires: 75 minutes (TTL 4500 s) after the last announcement.  The
heartbeats of the node agent detect dead peers and call `Discovery.forget()`.

The pure parts (TXT encoding and parsing, peer-list parsing, address choice)
never touch a socket and are tested without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import ifaddr
from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshai.errors import ConfigError, PeerError

__all__ = [
    "SERVICE_TYPE",
    "Advert",
    "Discovery",
    "EventStream",
    "MdnsDiscovery",
    "PeerEvent",
    "StaticDiscovery",
    "choose_address",
    "make_discovery",
    "parse_peer_list",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshai._tcp.local."

# Limits on what an advert may hold.  A TXT record comes from the network and is
# untrusted: anything beyond these limits is refused, never truncated.
MAX_NODE_ID = 63  # one DNS label
MAX_HOST = 253
MAX_SUMMARY_ENTRIES = 16
MAX_SUMMARY_KEY = 24
MAX_SUMMARY_VALUE = 64  # bytes of UTF-8
MAX_FINGERPRINT = 128
MAX_TXT_ENTRIES = 32
MAX_PROTOCOL_VERSION = 65535

_NODE_ID_RE = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]*")
_SUMMARY_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9:+/=_.-]*")
_DIGITS_RE = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*"
)
_SERVICE_TYPE_RE = re.compile(r"_[A-Za-z0-9-]{1,15}\._tcp\.local\.")

_SUMMARY_PREFIX = "c."
_TXT_ID, _TXT_PORT, _TXT_PV, _TXT_FP = b"id", b"port", b"pv", b"fp"

_TYPE_PTR = 12  # DNS record type
_IP_MULTICAST_ALL = 49  # Linux <linux/in.h>; the socket module lacks the name before 3.12


# --------------------------------------------------------------------------- adverts


def _check_port(port: object, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} must be an integer in 1..65535, got {port!r}")
    return port


def _check_host(host: object) -> str:
    if not isinstance(host, str) or not 1 <= len(host) <= MAX_HOST:
        raise ConfigError(f"host must be a string of 1..{MAX_HOST} characters, got {host!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if _HOSTNAME_RE.fullmatch(host) is None:
            raise ConfigError(f"host {host!r} is neither an IP address nor a host name") from None
    return host


@dataclass(frozen=True)
class Advert:
    """What a node tells the swarm about itself; validated at construction (ConfigError)."""

    node_id: str
    host: str
    port: int
    protocol_version: int
    summary: dict[str, str]
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.node_id, str)
            or not 1 <= len(self.node_id) <= MAX_NODE_ID
            or _NODE_ID_RE.fullmatch(self.node_id) is None
        ):
            raise ConfigError(
                f"node id must be 1..{MAX_NODE_ID} characters of [A-Za-z0-9._:-] "
                f"starting with a letter or digit, got {self.node_id!r}"
            )
        _check_host(self.host)
        _check_port(self.port, "port")
        pv = self.protocol_version
        if not isinstance(pv, int) or isinstance(pv, bool) or not 0 <= pv <= MAX_PROTOCOL_VERSION:
            raise ConfigError(f"protocol version must be an integer in 0..{MAX_PROTOCOL_VERSION}, got {pv!r}")
        if not isinstance(self.summary, Mapping):
            raise ConfigError(f"summary must be a dict of str to str, got {type(self.summary).__name__}")
        if len(self.summary) > MAX_SUMMARY_ENTRIES:
            raise ConfigError(
                f"summary has {len(self.summary)} entries, at most {MAX_SUMMARY_ENTRIES} allowed"
            )
        for key, value in self.summary.items():
            if (
                not isinstance(key, str)
                or len(key) > MAX_SUMMARY_KEY
                or _SUMMARY_KEY_RE.fullmatch(key) is None
            ):
                raise ConfigError(
                    f"summary key must be 1..{MAX_SUMMARY_KEY} characters of [a-z0-9_.-], got {key!r}"
                )
            if (
                not isinstance(value, str)
                or len(value.encode()) > MAX_SUMMARY_VALUE
                or not value.isprintable()
            ):
                raise ConfigError(
                    f"summary value for {key!r} must be printable text of at most "
                    f"{MAX_SUMMARY_VALUE} bytes, got {value!r:.80}"
                )
        fp = self.fingerprint
        if not isinstance(fp, str) or len(fp) > MAX_FINGERPRINT or _FINGERPRINT_RE.fullmatch(fp) is None:
            raise ConfigError(
                f"fingerprint must be at most {MAX_FINGERPRINT} characters of [A-Za-z0-9:+/=_.-], "
                f"got {fp!r:.80}"
            )
        # A private copy: the caller's dict may change, this advert must not.
        object.__setattr__(self, "summary", dict(self.summary))

    def __hash__(self) -> int:
        return hash(
            (
                self.node_id,
                self.host,
                self.port,
                self.protocol_version,
                tuple(sorted(self.summary.items())),
                self.fingerprint,
            )
        )

    def to_txt(self) -> dict[bytes, bytes]:
        """TXT properties for this advert (the host travels in address records, not here)."""
        txt = {
            _TXT_ID: self.node_id.encode(),
            _TXT_PORT: str(self.port).encode(),
            _TXT_PV: str(self.protocol_version).encode(),
        }
        if self.fingerprint:
            txt[_TXT_FP] = self.fingerprint.encode()
        for key, value in sorted(self.summary.items()):
            txt[(_SUMMARY_PREFIX + key).encode()] = value.encode()
        return txt

    @classmethod
    def from_txt(cls, properties: Mapping[bytes, bytes | None], host: str) -> Advert:
        """Parse untrusted TXT properties received for a peer at `host`; raises PeerError if malformed."""
        try:
            return cls._from_txt(properties, host)
        except PeerError:
            raise
        except (ConfigError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise PeerError(f"malformed TXT record from {host!r}: {exc}") from None

    @classmethod
    def _from_txt(cls, properties: Mapping[bytes, bytes | None], host: str) -> Advert:
        if len(properties) > MAX_TXT_ENTRIES:
            raise PeerError(
                f"malformed TXT record from {host!r}: {len(properties)} entries, at most {MAX_TXT_ENTRIES}"
            )

        def text(key: bytes, limit: int, required: bool) -> str | None:
            raw = properties.get(key)
            if raw is None:
                if required:
                    raise PeerError(f"malformed TXT record from {host!r}: no {key.decode()!r} entry")
                return None
            if len(raw) > limit:
                raise PeerError(
                    f"malformed TXT record from {host!r}: {key.decode()!r} is {len(raw)} bytes, "
                    f"at most {limit}"
                )
            return raw.decode("utf-8", errors="strict")

        node_id = text(_TXT_ID, MAX_NODE_ID, True)
        port_text = text(_TXT_PORT, 5, True)
        pv_text = text(_TXT_PV, 5, True)
        fingerprint = text(_TXT_FP, MAX_FINGERPRINT, False) or ""
        assert node_id is not None and port_text is not None and pv_text is not None
        if _DIGITS_RE.fullmatch(port_text) is None:
            raise PeerError(f"malformed TXT record from {host!r}: port {port_text!r} is not a number")
        if _DIGITS_RE.fullmatch(pv_text) is None:
            raise PeerError(
                f"malformed TXT record from {host!r}: protocol version {pv_text!r} is not a number"
            )
        summary: dict[str, str] = {}
        prefix = _SUMMARY_PREFIX.encode()
        for raw_key in properties:
            if not raw_key.startswith(prefix):
                continue  # unknown keys are ignored: newer peers may add some
            if len(raw_key) > len(prefix) + MAX_SUMMARY_KEY:
                raise PeerError(f"malformed TXT record from {host!r}: summary key {raw_key[:40]!r} too long")
            key = raw_key[len(prefix) :].decode("utf-8", errors="strict")
            value = text(raw_key, MAX_SUMMARY_VALUE, True)
            assert value is not None
            summary[key] = value
        return cls(
            node_id=node_id,
            host=host,
            port=int(port_text),
            protocol_version=int(pv_text),
            summary=summary,
            fingerprint=fingerprint,
        )


@dataclass(frozen=True)
class PeerEvent:
    """A change in the set of known peers."""

    kind: Literal["added", "updated", "removed"]
    advert: Advert


# --------------------------------------------------------------------------- pure helpers


def _parse_peer(entry: str) -> tuple[str, int]:
    text = entry.strip()
    if not text:
        raise ConfigError("empty peer entry; expected host:port")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"peer {text!r} has no port; expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"peer {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"peer {text!r} has no port; expected host:port")
        if ":" in host:
            raise ConfigError(f"peer {text!r}: write IPv6 addresses in brackets, as [addr]:port")
        if not host:
            raise ConfigError(f"peer {text!r} has no host; expected host:port")
        _check_host(host)
    if _DIGITS_RE.fullmatch(port_text) is None:
        raise ConfigError(f"peer {text!r}: port {port_text!r} is not a number in 1..65535")
    return host, _check_port(int(port_text), f"peer {text!r}: port")


def parse_peer_list(text: str) -> list[tuple[str, int]]:
    """Parse "host:port,host:port,…" (IPv6 as "[addr]:port") into (host, port) pairs; raises ConfigError."""
    if not text.strip():
        raise ConfigError("peer list is empty; expected host:port,host:port,…")
    peers: list[tuple[str, int]] = []
    for position, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            raise ConfigError(f"peer list {text!r}: entry {position} is empty")
        peer = _parse_peer(entry)
        if peer in peers:
            raise ConfigError(f"peer list {text!r}: {entry.strip()!r} appears twice")
        peers.append(peer)
    return peers


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def choose_address(candidates: Sequence[str], networks: Sequence[ipaddress.IPv4Network]) -> str | None:
    """Pick the address to reach a peer: one in our networks first, else non-loopback, else the first."""
    parsed: list[ipaddress.IPv4Address] = []
    for candidate in candidates:
        with contextlib.suppress(ValueError):
            parsed.append(ipaddress.IPv4Address(candidate))
    for network in networks:
        for address in parsed:
            if address in network:
                return str(address)
    for address in parsed:
        if not address.is_loopback:
            return str(address)
    return str(parsed[0]) if parsed else None


def _instance_name(node_id: str) -> str:
    """The mDNS instance label for a node id: [A-Za-z0-9-] only (ids may hold dots and colons)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", node_id)[:MAX_NODE_ID]


# --------------------------------------------------------------------------- the interface


class EventStream:
    """One subscriber's PeerEvents, an async iterator.

    It ends when the discovery stops, and raises PeerError if its reader falls
    MAX_QUEUED events behind (then re-read `peers()` and subscribe again).
    """

    MAX_QUEUED = 4096

    def __init__(self, owner: Discovery) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[PeerEvent | None] = asyncio.Queue()
        self._overflowed = False
        self._closed = False

    def _push(self, event: PeerEvent | None) -> None:
        if self._closed:
            return
        if event is not None and self._queue.qsize() >= self.MAX_QUEUED:
            self._overflowed = True
            self._close()
            return
        self._queue.put_nowait(event)

    def _close(self) -> None:
        if not self._closed:
            self._queue.put_nowait(None)
            self._closed = True
            self._owner._streams.discard(self)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> PeerEvent:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # stay ended
            if self._overflowed:
                raise PeerError(
                    f"peer event stream fell {self.MAX_QUEUED} events behind and was closed; "
                    "read peers() and subscribe again"
                )
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Unsubscribe."""
        self._close()


class Discovery(ABC):
    """How a node finds its peers; use as `async with backend as d:`.

    `peers()` never includes the advert this node registered itself.
    """

    def __init__(self) -> None:
        self._peers: dict[str, Advert] = {}
        self._streams: set[EventStream] = set()
        self._changed = asyncio.Event()
        self._own: Advert | None = None
        self._running = False
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise PeerError(f"{type(self).__name__} can be entered only once")
        self._entered = True
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._running = False
        try:
            await self._stop()
        finally:
            for stream in list(self._streams):
                stream._close()
            self._notify()

    @abstractmethod
    async def _start(self) -> None: ...

    @abstractmethod
    async def _stop(self) -> None: ...

    @abstractmethod
    async def register(self, advert: Advert) -> None:
        """Advertise this node (again, after a change); optional for clients."""

    @abstractmethod
    def forget(self, node_id: str) -> bool:
        """Drop a peer the liveness layer declared dead; emits "removed"; False if it was unknown.

        Call it from the event loop.  mDNS alone never removes a killed peer (see the module doc).
        """

    def peers(self) -> dict[str, Advert]:
        """A snapshot of the known peers, keyed by node id."""
        return dict(self._peers)

    def events(self, *, replay: bool = False) -> EventStream:
        """Subscribe now to peer events (with replay, first "added" for every known peer).

        The stream ends when the discovery stops; `aclose()` it to unsubscribe earlier.
        """
        stream = EventStream(self)
        self._streams.add(stream)
        if replay:
            for advert in self._peers.values():
                stream._push(PeerEvent("added", advert))
        return stream

    async def wait_for(self, n: int, timeout: float) -> dict[str, Advert]:
        """Wait until at least `n` peers are known; raises PeerError naming how many were found."""
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"wait_for needs a peer count >= 0, got {n!r}")
        if not timeout > 0:
            raise ConfigError(f"wait_for needs a timeout > 0 seconds, got {timeout!r}")
        self._check_running("wait_for")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._peers) < n:
            self._check_running("wait_for")
            remaining = deadline - loop.time()
            if remaining <= 0:
                found = ", ".join(sorted(self._peers)) or "none"
                raise PeerError(f"found {len(self._peers)} of {n} peers within {timeout:g} s ({found})")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return self.peers()

    # -- shared bookkeeping for the backends

    def _check_running(self, what: str) -> None:
        if not self._running:
            raise PeerError(f"{type(self).__name__}.{what}: not running; use it inside `async with`")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _emit(self, event: PeerEvent) -> None:
        for stream in list(self._streams):
            stream._push(event)
        self._notify()

    def _put(self, advert: Advert) -> None:
        """Add or update a peer, emitting the matching event (nothing if unchanged)."""
        old = self._peers.get(advert.node_id)
        if old == advert:
            return
        self._peers[advert.node_id] = advert
        self._emit(PeerEvent("added" if old is None else "updated", advert))

    def _drop(self, node_id: str) -> Advert | None:
        advert = self._peers.pop(node_id, None)
        if advert is not None:
            self._emit(PeerEvent("removed", advert))
        return advert


# --------------------------------------------------------------------------- mDNS


def _local_interfaces(addresses: Iterable[str]) -> tuple[list[ipaddress.IPv4Network], set[str]]:
    """The networks and device names of our interface addresses; ConfigError if one is not ours."""
    adapters = ifaddr.get_adapters()
    networks: list[ipaddress.IPv4Network] = []
    devices: set[str] = set()
    for address in addresses:
        for adapter in adapters:
            match = next((ip for ip in adapter.ips if ip.is_IPv4 and ip.ip == address), None)
            if match is not None:
                networks.append(ipaddress.IPv4Network(f"{address}/{match.network_prefix}", strict=False))
                devices.add(adapter.name)
                break
        else:
            raise ConfigError(f"interface address {address} is not assigned to any interface of this host")
    return networks, devices


def _confine_listen_socket(zc: Zeroconf, devices: set[str]) -> None:
    """Keep zeroconf's wildcard listen socket to the chosen interfaces (Linux; best effort).

    zeroconf binds its listen socket to 0.0.0.0:5353 and joins the group only on
    the given interfaces, but Linux still hands it multicast joined by any other
    socket on any interface (IP_MULTICAST_ALL) and unicast sent to any address.
    """
    if not sys.platform.startswith("linux"):
        return
    for reader in zc.engine.readers:
        sock = reader.sock
        if sock.family != socket.AF_INET or sock.getsockname()[0] != "0.0.0.0":
            continue
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
            if len(devices) == 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, next(iter(devices)).encode())
        except OSError as exc:  # pragma: no cover - depends on kernel and privileges
            log.debug("could not confine the mDNS listen socket to %s: %s", devices, exc)


def _drop_queued_answers(zc: Zeroconf, info: AsyncServiceInfo) -> None:
    """Withdraw answers about `info` that zeroconf queued to send later.

    zeroconf delays some multicast answers by up to a second (RFC 6762 §14) and
    sends them even after the service was updated or unregistered; a peer would
    then see the old records again, after the goodbye.
    """
    name = info.name.lower()
    keys = {name, (info.server or "").lower()}
    for outgoing in (zc.out_queue, zc.out_delay_queue):
        for group in outgoing.queue:
            for record in list(group.answers):
                if record.key in keys or str(getattr(record, "alias", "")).lower() == name:
                    del group.answers[record]


class MdnsDiscovery(Discovery):
    """Discovery over multicast DNS (python-zeroconf), bound only to the given IPv4 interface addresses.

    Registration skips RFC 6762 probing (`cooperating_responders`): probing costs
    about 1.7 s per node here, and node ids are unique by configuration.  The
    browser asks multicast (QM) questions from the start, so answers reach every
    process sharing port 5353 on a host.  A clean exit sends goodbyes (peers see
    "removed" within milliseconds); a killed peer stays listed until `forget()`.
    """

    def __init__(
        self,
        interfaces: Sequence[str] = ("127.0.0.1",),
        *,
        service_type: str = SERVICE_TYPE,
        resolve_timeout: float = 3.0,
    ) -> None:
        super().__init__()
        if isinstance(interfaces, str):
            interfaces = (interfaces,)
        if not interfaces:
            raise ConfigError("MdnsDiscovery needs at least one interface address, e.g. 127.0.0.1")
        for address in interfaces:
            try:
                parsed = ipaddress.IPv4Address(address)
            except ValueError:
                raise ConfigError(f"interface {address!r} is not an IPv4 address") from None
            if parsed.is_unspecified or parsed.is_multicast:
                raise ConfigError(f"interface {address!r} must be the address of one interface")
        if _SERVICE_TYPE_RE.fullmatch(service_type) is None:
            raise ConfigError(f"service type {service_type!r} must look like _name._tcp.local.")
        if not resolve_timeout > 0:
            raise ConfigError(f"resolve timeout must be > 0 seconds, got {resolve_timeout!r}")
        self.interfaces: tuple[str, ...] = tuple(dict.fromkeys(interfaces))
        self.service_type = service_type
        self._resolve_timeout_ms = resolve_timeout * 1000
        self._networks: list[ipaddress.IPv4Network] = []
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._announcing: asyncio.Future[Any] | None = None
        self._by_name: dict[str, str] = {}  # service name -> node id
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._warned: set[str] = set()

    async def _start(self) -> None:
        self._networks, devices = _local_interfaces(self.interfaces)
        try:
            self._aiozc = AsyncZeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
            zc = self._aiozc.zeroconf
            await zc.async_wait_for_start()
        except OSError as exc:
            await self._close_zeroconf()
            raise PeerError(f"mDNS could not start on {', '.join(self.interfaces)}: {exc}") from exc
        if not zc.engine.senders:
            await self._close_zeroconf()
            raise PeerError(f"mDNS could not open a socket on {', '.join(self.interfaces)}")
        _confine_listen_socket(zc, devices)
        self._browser = AsyncServiceBrowser(
            zc,
            self.service_type,
            handlers=[self._on_service_state_change],
            question_type=DNSQuestionType.QM,
        )

    async def _stop(self) -> None:
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
                self._browser = None
            tasks = list(self._resolving.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._stop_announcing()
            if self._aiozc is not None and self._info is not None:
                _drop_queued_answers(self._aiozc.zeroconf, self._info)
                # Wait for all goodbyes (3 in 250 ms) to go out before the sockets close.
                await (await self._aiozc.async_unregister_service(self._info))
        finally:
            self._info = None
            await self._close_zeroconf()

    async def _close_zeroconf(self) -> None:
        if self._aiozc is not None:
            aiozc, self._aiozc = self._aiozc, None
            await aiozc.async_close()

    async def register(self, advert: Advert) -> None:
        """Announce `advert` on our interfaces (again after a change: peers see "updated").

        Returns once announcing has started; the announcements repeat in the background.
        """
        self._check_running("register")
        assert self._aiozc is not None
        addresses = list(self.interfaces)
        with contextlib.suppress(ValueError):
            host = ipaddress.IPv4Address(advert.host)
            if not host.is_unspecified and advert.host not in addresses:
                addresses.insert(0, advert.host)
        instance = _instance_name(advert.node_id)
        info = AsyncServiceInfo(
            self.service_type,
            f"{instance}.{self.service_type}",
            port=advert.port,
            properties=advert.to_txt(),
            addresses=[socket.inet_aton(a) for a in addresses],
            server=f"meshai-{instance}.local.",
        )
        # The rest of an earlier announcement series would repeat the old records.
        self._stop_announcing()
        old = self._info
        if old is not None:
            _drop_queued_answers(self._aiozc.zeroconf, old)
        if old is not None and old.name == info.name:
            self._info, self._own = info, advert
            self._announcing = asyncio.ensure_future(await self._aiozc.async_update_service(info))
            return
        if old is not None:
            self._info = None
            await (await self._aiozc.async_unregister_service(old))
        self._info, self._own = info, advert
        stale_self = self._forget_name(info.name)  # our own name is never a peer
        if stale_self is not None:
            self._drop(stale_self)
        # No probing (see the class docstring); the 3 announcements go out in the background.
        self._announcing = asyncio.ensure_future(
            await self._aiozc.async_register_service(info, cooperating_responders=True)
        )

    def _stop_announcing(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None

    def forget(self, node_id: str) -> bool:
        """Drop a dead peer and purge its cached records, so that its next announcement is "added".

        A peer forgotten by mistake comes back when it next answers or announces.
        """
        names = [name for name, known in self._by_name.items() if known == node_id]
        for name in names:
            self._forget_name(name)
            if self._aiozc is not None:
                cache = self._aiozc.zeroconf.cache
                stale = [
                    record
                    for record in cache.async_entries_with_name(self.service_type)
                    if record.type == _TYPE_PTR and str(getattr(record, "alias", "")).lower() == name.lower()
                ]
                cache.async_remove_records(stale + cache.async_entries_with_name(name))
        return self._drop(node_id) is not None

    # -- browser callbacks and resolution (all on the event loop)

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Runs from the browser's constructor too (for records already cached), before _running is set.
        if self._aiozc is None or (self._info is not None and name.lower() == self._info.name.lower()):
            return
        if state_change is ServiceStateChange.Removed:
            node_id = self._forget_name(name)
            if node_id is not None:
                self._drop(node_id)
            return
        if name in self._resolving:
            self._dirty.add(name)  # resolve again once the running resolution ends
            return
        self._resolving[name] = asyncio.create_task(self._resolve(name), name=f"mdns-resolve {name}")

    def _forget_name(self, name: str) -> str | None:
        self._dirty.discard(name)
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        return self._by_name.pop(name, None)

    async def _resolve(self, name: str) -> None:
        try:
            while True:
                self._dirty.discard(name)
                assert self._aiozc is not None
                info = AsyncServiceInfo(self.service_type, name)
                if await info.async_request(
                    self._aiozc.zeroconf, self._resolve_timeout_ms, question_type=DNSQuestionType.QM
                ):
                    self._apply(name, info)
                else:
                    log.debug("mDNS: %s did not resolve within %.0f ms", name, self._resolve_timeout_ms)
                if name not in self._dirty:
                    return
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    def _apply(self, name: str, info: AsyncServiceInfo) -> None:
        host = choose_address(info.parsed_addresses(IPVersion.V4Only), self._networks)
        if host is None:
            self._warn_once(name, f"mDNS: ignoring {name}: it announces no IPv4 address")
            return
        try:
            advert = Advert.from_txt(info.properties, host)
        except PeerError as exc:
            self._warn_once(name, f"mDNS: ignoring {name}: {exc}")
            return
        if name.lower() != f"{_instance_name(advert.node_id)}.{self.service_type}".lower():
            self._warn_once(name, f"mDNS: ignoring {name}: its TXT record names node {advert.node_id!r}")
            return
        self._warned.discard(name)
        self._by_name[name] = advert.node_id
        self._put(advert)

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("%s", message)


# --------------------------------------------------------------------------- static list


class StaticDiscovery(Discovery):
    """Discovery from a fixed "host:port" list, for networks without multicast.

    An entry is known only by its address until a connection's hello names the
    node: until then its advert is a placeholder with node_id "host:port" and an
    empty summary.  The connection layer calls `resolve()` with the real advert.
    """

    def __init__(self, peers: str | Sequence[str]) -> None:
        super().__init__()
        if isinstance(peers, str):
            parsed = parse_peer_list(peers)
        else:
            parsed = parse_peer_list(",".join(peers)) if peers else []
        if not parsed:
            raise ConfigError("StaticDiscovery needs at least one host:port peer")
        self.addresses: tuple[tuple[str, int], ...] = tuple(parsed)
        self._resolved: dict[tuple[str, int], str] = {}  # address -> real node id
        for address in self.addresses:
            if len(_format_peer(*address)) > MAX_NODE_ID:
                raise ConfigError(
                    f"peer {_format_peer(*address)!r} is longer than {MAX_NODE_ID} characters, "
                    "the limit for a node id"
                )

    @staticmethod
    def _placeholder(address: tuple[str, int]) -> Advert:
        host, port = address
        return Advert(node_id=_format_peer(host, port), host=host, port=port, protocol_version=0, summary={})

    def _is_own(self, address: tuple[str, int]) -> bool:
        return self._own is not None and (self._own.host, self._own.port) == address

    async def _start(self) -> None:
        for address in self.addresses:
            self._put(self._placeholder(address))

    async def _stop(self) -> None:
        return None

    async def register(self, advert: Advert) -> None:
        """Remember our own advert; a list entry with our host:port is dropped (lists may include us)."""
        self._check_running("register")
        self._own = advert
        self._drop(advert.node_id)
        for address in self.addresses:
            if self._is_own(address):
                self._drop(self._resolved.pop(address, self._placeholder(address).node_id))

    def resolve(self, addr: str | tuple[str, int], advert: Advert) -> Advert:
        """Replace the entry for a listed address with the advert its hello carried.

        The result keeps the listed host and port (the address that works from here).
        Emits "removed" for the placeholder and "added" for the node, or "updated".
        """
        self._check_running("resolve")
        address = _parse_peer(addr) if isinstance(addr, str) else (addr[0], _check_port(addr[1], "port"))
        if address not in self.addresses:
            raise PeerError(f"{_format_peer(*address)} is not in the static peer list")
        advert = dataclasses.replace(advert, host=address[0], port=address[1])
        if self._own is not None and advert.node_id == self._own.node_id:
            self._drop(self._resolved.pop(address, self._placeholder(address).node_id))
            return advert
        previous = self._resolved.get(address, self._placeholder(address).node_id)
        if previous != advert.node_id:
            self._drop(previous)
        self._resolved[address] = advert.node_id
        self._put(advert)
        return advert

    def forget(self, node_id: str) -> bool:
        """Drop a peer; a forgotten resolved node falls back to its placeholder ("added")."""
        advert = self._drop(node_id)
        if advert is None:
            return False
        address = next((a for a, known in self._resolved.items() if known == node_id), None)
        if address is not None:
            del self._resolved[address]
            if self._running and not self._is_own(address):
                self._put(self._placeholder(address))
        return True


# --------------------------------------------------------------------------- factory


def service_type_for(mesh: str = "") -> str:
    """The mDNS service type of a mesh: ``_meshai._tcp.local.`` for the default mesh.

    A named mesh (``--mesh ID``, 1-10 of [a-z0-9]) gets ``_m-ID._tcp.local.``, so that several swarms —
    simulations run side by side on one loopback, say — never see each other's nodes.
    """
    if not mesh:
        return SERVICE_TYPE
    if not re.fullmatch(r"[a-z0-9]{1,10}", mesh):
        raise ConfigError(f"mesh id {mesh!r} must be 1-10 characters of [a-z0-9]")
    return f"_m-{mesh}._tcp.local."


def make_discovery(
    mode: str,
    interfaces: Sequence[str] = ("127.0.0.1",),
    peers: str | Sequence[str] = (),
    mesh: str = "",
) -> Discovery:
    """Build a discovery backend: "mdns" (on `interfaces`) or "static" (from `peers`); raises ConfigError."""
    if mode == "mdns":
        if peers:
            raise ConfigError("a peer list is only used with discovery mode 'static', not 'mdns'")
        return MdnsDiscovery(interfaces, service_type=service_type_for(mesh))
    if mode == "static":
        return StaticDiscovery(peers)
    raise ConfigError(f"unknown discovery mode {mode!r}; expected 'mdns' or 'static'")
