"""Privacy-safe fleet telemetry over MQTT: aggregates out, never tensors.

A node publishes a `TelemetrySnapshot` (counts, latency percentiles, byte counters, drift scores,
uptime) every ``interval`` seconds to ``meshai/<site>/<node>/telemetry`` (QoS 1) and keeps a retained
``online`` / ``offline`` on ``meshai/<site>/<node>/status``; a Last Will says ``offline`` when the
process dies without saying goodbye.  A `FleetView` subscribes to a site (or every site, ``+``) and
keeps the latest state of each node; `fleet_state()` collects it for a few seconds.

The pure part — `TelemetrySnapshot`, `check_payload`, `TelemetryRecorder`, `Backoff`, `LatestOnly`,
`FleetState` — never touches a socket and is tested without one.  `check_payload` is the gate both
ways: `Telemetry` publishes nothing it refuses, and `FleetView` drops anything it refuses.  It accepts
exactly one flat schema of aggregates and rejects unknown keys, arrays, long strings, base64-looking
strings, non-finite numbers and oversized payloads, so no payload can carry tensor data.

The I/O part is thin: `Telemetry` and `FleetView` are async context managers around aiomqtt with named
tasks.  Publishing never blocks the caller: the telemetry task takes the snapshots itself, holds at
most the latest one while the broker is away (older ones are dropped and counted), and reconnects with
bounded, jittered exponential backoff through an injectable ``sleep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import aiomqtt

from meshai.errors import ConfigError, PeerError, RemoteProtocolError
from meshai.strict_json import loads_strict

__all__ = [
    "MAX_ARRAY",
    "MAX_DRIFT_FEATURES",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "PAYLOAD_KEYS",
    "SCHEMA_VERSION",
    "Backoff",
    "FleetState",
    "FleetView",
    "LatestOnly",
    "NodeState",
    "Telemetry",
    "TelemetryRecorder",
    "TelemetrySnapshot",
    "check_name",
    "check_payload",
    "fleet_state",
    "status_topic",
    "telemetry_topic",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TOPIC_ROOT = "meshai"
ONLINE = b"online"
OFFLINE = b"offline"

# Limits on what a payload may hold.  Anything beyond them is refused, never truncated.
MAX_PAYLOAD = 4096  # bytes of JSON
MAX_STRING = 64  # characters in any string (names, drift feature names)
MAX_ARRAY = 4  # items in any array (the schema has none; a longer one is refused by name)
MAX_DRIFT_FEATURES = 16  # drift scores per snapshot
MAX_DEPTH = 2  # nested objects: the top one and the drift one
MAX_INT = 2**53  # counters stay exact in every JSON reader

PAYLOAD_KEYS = frozenset(
    {
        "v",
        "site",
        "node",
        "model",
        "deployment",
        "requests_ok",
        "requests_error",
        "error_rate",
        "latency_p50_ms",
        "latency_p95_ms",
        "bytes_sent",
        "bytes_received",
        "drift",
        "uptime_s",
        "timestamp",
    }
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_SEPARATORS = re.compile(r"[._:-]")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")


# ------------------------------------------------------------------------------------ names, topics


def check_name(kind: str, value: object, *, allow_empty: bool = False) -> str:
    """Return ``value`` if it is a valid name (topic part, model, feature); raise ConfigError naming it.

    A name is 1..64 characters of ``[A-Za-z0-9._:-]`` starting with a letter or digit, so it can never
    hold an MQTT wildcard (``+``, ``#``), a level separator (``/``) or base64 padding, and it must not
    look like encoded bytes (no run of 20 characters without a separator, no base64-like mix).
    """
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a string, got {value!r}")
    if value == "" and allow_empty:
        return value
    if len(value) > MAX_STRING:
        raise ConfigError(f"{kind} is {len(value)} characters, more than {MAX_STRING}: {value[:20]!r}…")
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{kind} {value!r} is not a name: use letters, digits, '.', '_', ':', '-' "
            "(no '+', '#', '/', spaces), starting with a letter or digit"
        )
    if _looks_encoded(value):
        raise ConfigError(f"{kind} {value!r} looks like encoded binary data (base64), not a name")
    return value


def _looks_encoded(text: str) -> bool:
    """True for text that looks like encoded bytes rather than a name.

    Standard base64 (``+``, ``/``, ``=``) of 8 characters or more; or, splitting at ``._:-`` (base64url
    uses ``-`` and ``_``), a token of 20 characters or more, or one of 12 or more whose characters
    switch class (upper, lower, digit) at more than every other position, as random base64 does and
    CamelCase names do not.
    """
    if len(text) >= 8 and _BASE64_CHARS.fullmatch(text) and any(c in text for c in "+/="):
        return True
    for token in _SEPARATORS.split(text):
        if len(token) >= 20:
            return True
        if len(token) >= 12:
            flips = sum(_char_class(a) != _char_class(b) for a, b in itertools.pairwise(token))
            if 2 * flips > len(token):
                return True
    return False


def _char_class(c: str) -> int:
    return 0 if c.isupper() else 1 if c.islower() else 2 if c.isdigit() else 3


def _check_topic_part(kind: str, value: str, *, wildcard: bool = False) -> str:
    if wildcard and value == "+":
        return value
    return check_name(kind, value)


def telemetry_topic(site: str, node: str) -> str:
    """``meshai/<site>/<node>/telemetry``; ``node`` (or ``site``) may be ``+`` for a subscription."""
    return f"{TOPIC_ROOT}/{_check_topic_part('site', site, wildcard=True)}/{_check_topic_part('node', node, wildcard=True)}/telemetry"


def status_topic(site: str, node: str) -> str:
    """``meshai/<site>/<node>/status``; ``node`` (or ``site``) may be ``+`` for a subscription."""
    return f"{TOPIC_ROOT}/{_check_topic_part('site', site, wildcard=True)}/{_check_topic_part('node', node, wildcard=True)}/status"


# ----------------------------------------------------------------------------------------- snapshot


def _check_count(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{kind} must be an integer, got {value!r}")
    if not 0 <= value < MAX_INT:
        raise ConfigError(f"{kind} must be in [0, 2**53), got {value!r}")
    return value


def _check_real(kind: str, value: object, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{kind} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or not low <= out <= high:
        raise ConfigError(f"{kind} must be a finite number in [{low}, {high}], got {value!r}")
    return out


@dataclass(frozen=True)
class TelemetrySnapshot:
    """One node's aggregates at one moment: counts, percentiles, byte counters, drift, uptime.

    Built from aggregates only; every field is validated at construction (``ConfigError`` names the
    bad one).  ``error_rate`` is derived from the counts.  ``drift`` maps a feature name to its drift
    score (at most `MAX_DRIFT_FEATURES` of them).
    """

    node: str
    site: str
    model: str = ""
    deployment: str = ""
    requests_ok: int = 0
    requests_error: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    drift: Mapping[str, float] = field(default_factory=dict)
    uptime_s: float = 0.0
    timestamp: float = 0.0
    error_rate: float = field(init=False)

    def __post_init__(self) -> None:
        check_name("node", self.node)
        check_name("site", self.site)
        check_name("model", self.model, allow_empty=True)
        check_name("deployment", self.deployment, allow_empty=True)
        for kind in ("requests_ok", "requests_error", "bytes_sent", "bytes_received"):
            _check_count(kind, getattr(self, kind))
        p50 = _check_real("latency_p50_ms", self.latency_p50_ms)
        p95 = _check_real("latency_p95_ms", self.latency_p95_ms)
        if p95 < p50:
            raise ConfigError(f"latency_p95_ms {p95} is below latency_p50_ms {p50}")
        object.__setattr__(self, "latency_p50_ms", p50)
        object.__setattr__(self, "latency_p95_ms", p95)
        object.__setattr__(self, "uptime_s", _check_real("uptime_s", self.uptime_s))
        object.__setattr__(self, "timestamp", _check_real("timestamp", self.timestamp))
        if not isinstance(self.drift, Mapping):
            raise ConfigError(f"drift must map feature names to scores, got {type(self.drift).__name__}")
        if len(self.drift) > MAX_DRIFT_FEATURES:
            raise ConfigError(f"drift has {len(self.drift)} features, more than {MAX_DRIFT_FEATURES}")
        drift = {
            check_name("drift feature", k): _check_real(f"drift[{k!r}]", v) for k, v in self.drift.items()
        }
        object.__setattr__(self, "drift", MappingProxyType(dict(sorted(drift.items()))))
        total = self.requests_ok + self.requests_error
        object.__setattr__(self, "error_rate", self.requests_error / total if total else 0.0)

    def __hash__(self) -> int:
        return hash((self.node, self.site, self.timestamp, tuple(self.drift.items())))

    @property
    def requests(self) -> int:
        """Requests seen, successful or not."""
        return self.requests_ok + self.requests_error

    @property
    def drift_max(self) -> float | None:
        """The largest drift score, or None without any."""
        return max(self.drift.values()) if self.drift else None

    def to_dict(self) -> dict[str, Any]:
        """The payload as a JSON-ready dict (exactly `PAYLOAD_KEYS`)."""
        return {
            "v": SCHEMA_VERSION,
            "site": self.site,
            "node": self.node,
            "model": self.model,
            "deployment": self.deployment,
            "requests_ok": self.requests_ok,
            "requests_error": self.requests_error,
            "error_rate": self.error_rate,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "drift": dict(self.drift),
            "uptime_s": self.uptime_s,
            "timestamp": self.timestamp,
        }

    def to_payload(self) -> bytes:
        """Compact JSON bytes that `check_payload` accepts; ConfigError if over `MAX_PAYLOAD`."""
        data = json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        if len(data) > MAX_PAYLOAD:
            raise ConfigError(f"telemetry payload is {len(data)} bytes, more than {MAX_PAYLOAD}")
        return data


# ------------------------------------------------------------------------------------ the validator


def _walk(value: object, path: str, depth: int) -> None:
    """Structural limits, independent of the schema: nesting, arrays, strings."""
    if isinstance(value, list):
        if any(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise RemoteProtocolError(
                f"telemetry payload holds a numeric array at {path} ({len(value)} items): "
                "it could carry tensor data"
            )
        if len(value) > MAX_ARRAY:
            raise RemoteProtocolError(
                f"telemetry payload holds an array of {len(value)} items at {path}, more than {MAX_ARRAY}"
            )
    if isinstance(value, list | dict) and depth > MAX_DEPTH:
        raise RemoteProtocolError(f"telemetry payload nests objects deeper than {MAX_DEPTH} levels at {path}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(key, f"{path} key", depth)
            _walk(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise RemoteProtocolError(
                f"telemetry payload holds a {len(value)}-character string at {path}, more than {MAX_STRING}"
            )
        if _looks_encoded(value):
            raise RemoteProtocolError(
                f"telemetry payload holds base64-looking data at {path}: {value[:20]!r}…"
            )


def check_payload(data: bytes) -> TelemetrySnapshot:
    """Parse and validate a telemetry payload; return its snapshot or raise RemoteProtocolError.

    Accepts exactly the flat aggregate schema of `TelemetrySnapshot.to_payload`: known keys only, all
    present, no arrays, strings of at most `MAX_STRING` characters that do not look like base64, finite
    numbers, a consistent ``error_rate``, at most `MAX_PAYLOAD` bytes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError(f"telemetry payload must be bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD:
        raise RemoteProtocolError(f"telemetry payload is {len(data)} bytes, more than {MAX_PAYLOAD}")
    obj = loads_strict(bytes(data), RemoteProtocolError, "telemetry payload")
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"telemetry payload must be a JSON object, got {type(obj).__name__}")
    _walk(obj, "$", 1)
    unknown = sorted(set(obj) - PAYLOAD_KEYS)
    if unknown:
        raise RemoteProtocolError(f"telemetry payload has unknown keys {unknown}")
    missing = sorted(PAYLOAD_KEYS - set(obj))
    if missing:
        raise RemoteProtocolError(f"telemetry payload lacks keys {missing}")
    if obj["v"] != SCHEMA_VERSION or isinstance(obj["v"], bool):
        raise RemoteProtocolError(f"telemetry payload has schema version {obj['v']!r}, want {SCHEMA_VERSION}")
    if not isinstance(obj["drift"], dict):
        raise RemoteProtocolError(f"telemetry payload drift must be an object, got {obj['drift']!r}")
    try:
        snap = TelemetrySnapshot(
            node=obj["node"],
            site=obj["site"],
            model=obj["model"],
            deployment=obj["deployment"],
            requests_ok=obj["requests_ok"],
            requests_error=obj["requests_error"],
            latency_p50_ms=obj["latency_p50_ms"],
            latency_p95_ms=obj["latency_p95_ms"],
            bytes_sent=obj["bytes_sent"],
            bytes_received=obj["bytes_received"],
            drift=obj["drift"],
            uptime_s=obj["uptime_s"],
            timestamp=obj["timestamp"],
        )
        rate = _check_real("error_rate", obj["error_rate"], high=1.0)
    except ConfigError as exc:
        raise RemoteProtocolError(f"telemetry payload: {exc}") from None
    if abs(rate - snap.error_rate) > 1e-9:
        raise RemoteProtocolError(
            f"telemetry payload error_rate {rate} disagrees with its counts ({snap.error_rate})"
        )
    return snap


# ------------------------------------------------------------------------------------- the recorder


class TelemetryRecorder:
    """Aggregates a node's requests into snapshots: counts, a bounded latency window, bytes, drift.

    ``record()`` is O(1) and never does I/O; ``snapshot()`` sorts the window (at most ``window``
    latencies) for the nearest-rank p50 and p95.  ``clock`` stamps snapshots (wall time) and
    ``monotonic`` measures uptime.
    """

    def __init__(
        self,
        node: str,
        site: str,
        model: str = "",
        deployment: str = "",
        *,
        window: int = 1024,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ConfigError(f"latency window must hold at least one sample, got {window}")
        self.node = check_name("node", node)
        self.site = check_name("site", site)
        self.model = check_name("model", model, allow_empty=True)
        self.deployment = check_name("deployment", deployment, allow_empty=True)
        self._clock = clock
        self._monotonic = monotonic
        self._start = monotonic()
        self._latencies: deque[float] = deque(maxlen=window)
        self.requests_ok = 0
        self.requests_error = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._drift: dict[str, float] = {}

    def record(
        self, latency_ms: float, *, ok: bool = True, bytes_sent: int = 0, bytes_received: int = 0
    ) -> None:
        """Count one request: its latency, outcome and bytes."""
        if ok:
            self.requests_ok += 1
        else:
            self.requests_error += 1
        if math.isfinite(latency_ms) and latency_ms >= 0:
            self._latencies.append(latency_ms)
        self.bytes_sent += bytes_sent
        self.bytes_received += bytes_received

    def set_drift(self, feature: str, score: float) -> None:
        """Set the drift score of one feature (ConfigError beyond `MAX_DRIFT_FEATURES` features)."""
        check_name("drift feature", feature)
        value = _check_real(f"drift[{feature!r}]", score)
        if feature not in self._drift and len(self._drift) >= MAX_DRIFT_FEATURES:
            raise ConfigError(f"drift already holds {MAX_DRIFT_FEATURES} features; refusing {feature!r}")
        self._drift[feature] = value

    def snapshot(self) -> TelemetrySnapshot:
        """The aggregates now."""
        lat = sorted(self._latencies)
        return TelemetrySnapshot(
            node=self.node,
            site=self.site,
            model=self.model,
            deployment=self.deployment,
            requests_ok=self.requests_ok,
            requests_error=self.requests_error,
            latency_p50_ms=_nearest_rank(lat, 0.50),
            latency_p95_ms=_nearest_rank(lat, 0.95),
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            drift=dict(self._drift),
            uptime_s=max(0.0, self._monotonic() - self._start),
            timestamp=self._clock(),
        )


def _nearest_rank(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -------------------------------------------------------------------------- backoff, one-slot buffer


@dataclass(frozen=True)
class Backoff:
    """Bounded, jittered exponential backoff: attempt k waits in [(1-jitter)·d, d], d = min(max, initial·factor^k)."""

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum and math.isfinite(self.maximum)):
            raise ConfigError(
                f"backoff needs 0 < initial <= maximum < inf, got {self.initial}, {self.maximum}"
            )
        if not 1.0 <= self.factor <= 16.0:
            raise ConfigError(f"backoff factor must be in [1, 16], got {self.factor}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def delay(self, attempt: int, u: float) -> float:
        """Seconds to wait before retry ``attempt`` (0-based), given a uniform draw ``u`` in [0, 1)."""
        ceiling = min(self.maximum, self.initial * self.factor ** min(max(attempt, 0), 64))
        return ceiling * (1.0 - self.jitter * min(max(u, 0.0), 1.0))


T = TypeVar("T")


class LatestOnly(Generic[T]):
    """A one-slot mailbox: ``put`` replaces what is there (counting it as dropped), ``take`` empties it."""

    def __init__(self) -> None:
        self._item: T | None = None
        self.dropped = 0

    def put(self, item: T) -> None:
        """Hold ``item``; an item not yet taken is dropped."""
        if self._item is not None:
            self.dropped += 1
        self._item = item

    def take(self) -> T | None:
        """The held item (and empty the slot), or None."""
        item, self._item = self._item, None
        return item

    def __len__(self) -> int:
        return 0 if self._item is None else 1


# -------------------------------------------------------------------------------------- the publisher


class Telemetry:
    """Publish a node's snapshots to MQTT in the background: ``async with Telemetry(...) as t: ...``.

    On entry two named tasks start and the block runs at once (the broker may still be away):
    a ticker calls ``snapshot()`` every ``interval`` seconds and leaves the result in a one-slot
    mailbox; a publisher connects (client id ``meshai-<site>-<node>``, Last Will ``offline`` retained
    on the status topic), publishes retained ``online``, then sends each snapshot (QoS 1, validated by
    `check_payload`).  When the broker goes, it reconnects with `Backoff` delays through ``sleep`` and
    resumes; snapshots taken meanwhile replace each other (``dropped`` counts them).  Leaving the block
    publishes retained ``offline`` and disconnects cleanly.  ``snapshot`` must be cheap (it reads
    aggregates) because it runs on the event loop; if it raises, that tick is skipped and logged.
    """

    def __init__(
        self,
        broker_host: str,
        broker_port: int,
        site: str,
        node: str,
        interval: float = 5.0,
        *,
        snapshot: Callable[[], TelemetrySnapshot],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff: Backoff | None = None,
        rng: Callable[[], float] = random.random,
        keepalive: int = 10,
        timeout: float = 5.0,
        close_timeout: float = 5.0,
    ) -> None:
        if not isinstance(broker_port, int) or not 0 < broker_port < 65536:
            raise ConfigError(f"broker port must be in 1..65535, got {broker_port!r}")
        if not broker_host:
            raise ConfigError("broker host must not be empty")
        if not (math.isfinite(interval) and interval > 0):
            raise ConfigError(f"telemetry interval must be a positive number of seconds, got {interval!r}")
        if keepalive < 1 or not timeout > 0:
            raise ConfigError(f"keepalive and timeout must be positive, got {keepalive!r}, {timeout!r}")
        self.host = broker_host
        self.port = broker_port
        self.site = check_name("site", site)
        self.node = check_name("node", node)
        self.interval = float(interval)
        self.client_id = f"meshai-{self.site}-{self.node}"
        self.status_topic = status_topic(self.site, self.node)
        self.telemetry_topic = telemetry_topic(self.site, self.node)
        self._snapshot = snapshot
        self._clock = clock
        self._sleep = sleep
        self._backoff = backoff or Backoff()
        self._rng = rng
        self._keepalive = keepalive
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._latest: LatestOnly[TelemetrySnapshot] = LatestOnly()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        # Counters, for tests and for people.
        self.published = 0
        self.connects = 0
        self.failed_connects = 0
        self.snapshot_errors = 0
        self.publish_errors = 0
        self.backoff_delays: deque[float] = deque(maxlen=64)
        self.last_connected_at: float | None = None
        self.last_disconnected_at: float | None = None

    # -- lifecycle

    async def __aenter__(self) -> Self:
        if self._tasks:
            raise ConfigError(f"telemetry for {self.client_id} is already running")
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._tick(), name=f"meshai-telemetry-tick {self.site}/{self.node}"),
            loop.create_task(self._publish(), name=f"meshai-telemetry-mqtt {self.site}/{self.node}"),
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop both tasks; publish retained ``offline`` first if connected (bounded by close_timeout)."""
        if not self._tasks:
            return
        tick, pub = self._tasks
        assert self._stop is not None
        self._stop.set()
        tick.cancel()
        done, _ = await asyncio.wait([pub], timeout=self._close_timeout)
        if not done:
            log.warning(
                "telemetry %s: broker did not take 'offline' in %.1f s", self.client_id, self._close_timeout
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._connected is not None:
            self._connected.clear()

    # -- state

    @property
    def connected(self) -> bool:
        """True while a broker session is up and ``online`` was published."""
        return self._connected is not None and self._connected.is_set()

    @property
    def dropped(self) -> int:
        """Snapshots replaced before they could be published."""
        return self._latest.dropped

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (PeerError after ``timeout`` seconds)."""
        if self._connected is None:
            raise ConfigError("telemetry is not running: use it as 'async with Telemetry(...)'")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise PeerError(f"MQTT broker {self.host}:{self.port} not reached within {timeout} s") from None

    # -- tasks

    async def _tick(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                snap = self._snapshot()
                if snap.site != self.site or snap.node != self.node:
                    raise ConfigError(
                        f"snapshot is for {snap.site}/{snap.node}, telemetry for {self.site}/{self.node}"
                    )
                self._latest.put(snap)
                self._wake.set()
            except Exception as exc:
                self.snapshot_errors += 1
                log.warning("telemetry %s: snapshot skipped: %s", self.client_id, exc)
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # a stalled loop: skip missed ticks rather than burst
                next_at = now + self.interval
            await asyncio.sleep(next_at - now)

    async def _publish(self) -> None:
        assert self._stop is not None and self._connected is not None
        attempt = 0
        while not self._stop.is_set():
            client = aiomqtt.Client(
                self.host,
                self.port,
                identifier=self.client_id,
                will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
                keepalive=self._keepalive,
                timeout=self._timeout,
                clean_session=True,
                max_queued_outgoing_messages=8,
            )
            was_connected = False
            try:
                async with client:
                    await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
                    was_connected = True
                    attempt = 0
                    self.connects += 1
                    self.last_connected_at = self._clock()
                    self._connected.set()
                    log.info("telemetry %s: connected to %s:%d", self.client_id, self.host, self.port)
                    await self._serve(client)
                    # Leaving: the clean goodbye, then the context manager disconnects.
                    await client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
                    return
            except Exception as exc:  # telemetry never takes the node down: log, back off, retry
                if not isinstance(exc, aiomqtt.MqttError | OSError):
                    log.error("telemetry %s: unexpected failure", self.client_id, exc_info=exc)
                if was_connected:
                    self.last_disconnected_at = self._clock()
                    log.warning("telemetry %s: lost the broker: %s", self.client_id, exc)
                else:
                    self.failed_connects += 1
                    log.debug("telemetry %s: connect failed: %s", self.client_id, exc)
            finally:
                self._connected.clear()
            if self._stop.is_set():
                return
            delay = self._backoff.delay(attempt, self._rng())
            attempt += 1
            self.backoff_delays.append(delay)
            if await self._sleep_or_stop(delay):
                return

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Send snapshots until asked to stop; raise MqttError when the broker goes."""
        assert self._stop is not None and self._wake is not None
        watcher = asyncio.get_running_loop().create_task(
            _watch(client), name=f"meshai-telemetry-watch {self.site}/{self.node}"
        )
        try:
            while not self._stop.is_set():
                snap = self._latest.take()
                if snap is not None:
                    await self._send(client, snap, watcher)
                    continue
                self._wake.clear()
                waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._stop.wait())]
                try:
                    await asyncio.wait([*waits, watcher], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                if watcher.done():
                    watcher.result()  # raises the MqttError of the lost connection
                    raise aiomqtt.MqttError("broker connection ended")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await watcher

    async def _send(
        self, client: aiomqtt.Client, snap: TelemetrySnapshot, watcher: asyncio.Future[None]
    ) -> None:
        try:
            payload = snap.to_payload()
            check_payload(payload)  # the gate: nothing leaves that a reader would refuse
        except (ConfigError, RemoteProtocolError) as exc:
            self.snapshot_errors += 1
            log.warning("telemetry %s: snapshot refused: %s", self.client_id, exc)
            return
        # aiomqtt leaves a QoS 1 publish waiting for its PUBACK (up to ``timeout``) when the connection
        # drops; race it against the watcher so a lost broker is noticed at once.
        publish = asyncio.ensure_future(client.publish(self.telemetry_topic, payload, qos=1))
        try:
            await asyncio.wait([publish, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not publish.done():
                raise aiomqtt.MqttError("broker connection ended during publish")
            publish.result()
        except aiomqtt.MqttError:
            self.publish_errors += 1
            self._latest.dropped += 1  # this one is gone; the next tick brings a fresher one
            raise
        finally:
            publish.cancel()
        self.published += 1

    async def _sleep_or_stop(self, delay: float) -> bool:
        """Sleep ``delay`` through the injected sleep; True if asked to stop meanwhile."""
        assert self._stop is not None
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([sleeper, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()
        return self._stop.is_set()


async def _watch(client: aiomqtt.Client) -> None:
    """Return or raise MqttError when the client's connection ends (nothing is subscribed)."""
    async for _ in client.messages:
        pass


# -------------------------------------------------------------------------------------- fleet state


@dataclass(frozen=True)
class NodeState:
    """The latest that is known of one node: its status and its last valid snapshot."""

    site: str
    node: str
    status: Literal["online", "offline", "unknown"] = "unknown"
    snapshot: TelemetrySnapshot | None = None
    updated: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: identity, status, the table's figures and the whole snapshot."""
        s = self.snapshot
        return {
            "site": self.site,
            "node": self.node,
            "status": self.status,
            "latency_p50_ms": s.latency_p50_ms if s else None,
            "latency_p95_ms": s.latency_p95_ms if s else None,
            "requests": s.requests if s else None,
            "error_rate": s.error_rate if s else None,
            "drift_max": s.drift_max if s else None,
            "snapshot": s.to_dict() if s else None,
        }


class FleetState:
    """Pure fold of MQTT messages into the latest `NodeState` per ``site/node``."""

    def __init__(self, site: str = "+", clock: Callable[[], float] = time.time) -> None:
        self.site = _check_topic_part("site", site, wildcard=True)
        self._clock = clock
        self._nodes: dict[str, NodeState] = {}
        self.rejected = 0
        self.last_rejection: str | None = None

    def apply(self, topic: str, payload: bytes) -> bool:
        """Fold one message in; False (and ``rejected`` counted) for a foreign topic or a bad payload."""
        parts = topic.split("/")
        try:
            if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[3] not in ("telemetry", "status"):
                raise RemoteProtocolError(f"not a telemetry topic: {topic[:80]!r}")
            site = _check_remote_name("site", parts[1])
            node = _check_remote_name("node", parts[2])
            if self.site != "+" and site != self.site:
                raise RemoteProtocolError(f"topic {topic!r} is not for site {self.site!r}")
            key = f"{site}/{node}"
            old = self._nodes.get(key, NodeState(site=site, node=node))
            if parts[3] == "status":
                if payload == ONLINE:
                    new = NodeState(site, node, "online", old.snapshot, self._clock())
                elif payload == OFFLINE:
                    new = NodeState(site, node, "offline", old.snapshot, self._clock())
                else:
                    raise RemoteProtocolError(
                        f"status on {topic!r} is {bytes(payload[:20])!r}, not online/offline"
                    )
            else:
                snap = check_payload(payload)
                if (snap.site, snap.node) != (site, node):
                    raise RemoteProtocolError(f"snapshot of {snap.site}/{snap.node} published on {topic!r}")
                # a snapshot implies the node is alive unless it said otherwise since
                status = old.status if old.status != "unknown" else "online"
                new = NodeState(site, node, status, snap, self._clock())
        except RemoteProtocolError as exc:
            self.rejected += 1
            self.last_rejection = str(exc)
            log.debug("fleet view: rejected a message: %s", exc)
            return False
        self._nodes[key] = new
        return True

    def nodes(self) -> dict[str, NodeState]:
        """A copy: ``"site/node"`` → `NodeState`, sorted by key."""
        return dict(sorted(self._nodes.items()))


def _check_remote_name(kind: str, value: str) -> str:
    try:
        return check_name(kind, value)
    except ConfigError as exc:
        raise RemoteProtocolError(str(exc)) from None


class FleetView:
    """Subscribe to a site's telemetry and status (``site="+"``: every site) and keep the latest per node.

    ``async with FleetView(host, port, site) as view: ...; view.nodes()``.  Entering connects and
    subscribes (PeerError if the broker cannot be reached); retained statuses arrive at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        site: str = "+",
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"broker port must be in 1..65535, got {port!r}")
        self.host = host
        self.port = port
        self.state = FleetState(site, clock)
        self.site = self.state.site
        self._timeout = timeout
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None

    async def __aenter__(self) -> Self:
        client = aiomqtt.Client(
            self.host, self.port, identifier=f"meshai-fleet-{uuid.uuid4().hex[:12]}", timeout=self._timeout
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(client)
                await client.subscribe(telemetry_topic(self.site, "+"), qos=1)
                await client.subscribe(status_topic(self.site, "+"), qos=1)
            except aiomqtt.MqttError as exc:
                raise PeerError(f"cannot reach MQTT broker {self.host}:{self.port}: {exc}") from None
            self._stack = stack.pop_all()
        self._client = client
        self._task = asyncio.get_running_loop().create_task(
            self._read(client), name=f"meshai-fleet-view {self.site}"
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._stack is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._stack.aclose()
            self._stack = None
        self._client = None

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray):
                    self.state.apply(str(message.topic), bytes(payload))
                else:
                    self.state.rejected += 1
        except aiomqtt.MqttError as exc:
            self.error = f"lost MQTT broker {self.host}:{self.port}: {exc}"
            log.warning("fleet view: %s", self.error)

    def nodes(self) -> dict[str, NodeState]:
        """``"site/node"`` → the latest `NodeState`."""
        return self.state.nodes()

    @property
    def rejected(self) -> int:
        """Messages refused (bad topic or payload)."""
        return self.state.rejected


async def fleet_state(host: str, port: int, site: str = "+", wait: float = 2.0) -> dict[str, NodeState]:
    """Collect the fleet for ``wait`` seconds: ``"site/node"`` → `NodeState` (PeerError if unreachable)."""
    if not (math.isfinite(wait) and wait >= 0):
        raise ConfigError(f"wait must be a non-negative number of seconds, got {wait!r}")
    async with FleetView(host, port, site) as view:
        await asyncio.sleep(wait)
        if view.error is not None:
            raise PeerError(view.error)
        return view.nodes()
