"""A link emulator in meshai's own transport path: delay, jitter, rate and loss per connection.

The kernel of the machines meshai is tested on has ``tc tbf`` (rate) but not ``netem`` (delay,
loss), so ``meshai sim --netns --link …`` and ``meshai node --link …`` shape traffic here, where
the kernel cannot.  This module is sans-I/O: ``LinkSpec`` and ``parse_link`` describe a link,
``LinkShaper`` decides when each frame of one connection reaches the wire; ``meshai.transport``
holds frames until then.

What is emulated is what TCP shows an application: frames serialised at the link rate, each
delayed by the propagation delay plus jitter, never reordered; a lost packet either stalls the
stream for a retransmission timeout (``loss_mode="stall"``, what TCP does) or, for fault tests,
drops the whole connection (``"drop"``).

Process-global state (the one impure part): the installed spec (``install`` / ``shaped``) that
every new channel takes, and link down / up (``link_down`` / ``link_up``, or SIGUSR1 / SIGUSR2
after ``install_signal_handlers``) — while down, nothing goes out and nothing received is
processed, so peers see a cut cable.
"""

from __future__ import annotations

import math
import random
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from meshai.errors import ConfigError

__all__ = [
    "MIN_RTO_S",
    "MSS",
    "LinkShaper",
    "LinkSpec",
    "LossMode",
    "Release",
    "install",
    "install_signal_handlers",
    "installed",
    "is_down",
    "link_down",
    "link_up",
    "new_shaper",
    "parse_link",
    "shaped",
    "subscribe",
    "uninstall",
]

LossMode = Literal["stall", "drop"]
MSS = 1448
"""Payload bytes per TCP packet (Ethernet MTU 1500 less IP and TCP headers with timestamps)."""
MIN_RTO_S = 0.2
"""Linux's minimum retransmission timeout."""

_TIME_UNITS = {"us": 1e6, "ms": 1e3, "s": 1.0}
_RATE_UNITS = {  # bytes per second, as tc reads them: *bit are bits, *bps are BYTES per second
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "tbit": 1e12 / 8,
    "kibit": 1024 / 8,
    "mibit": 1024**2 / 8,
    "gibit": 1024**3 / 8,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
    "kibps": 1024.0,
    "mibps": 1024.0**2,
    "gibps": 1024.0**3,
}
_NUMBER = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z%]*)$")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One direction of an emulated link; every field at its default means a perfect link."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_Bps: float | None = None
    """Bytes per second; None: unlimited."""
    loss: float = 0.0
    """Fraction (0..1) of packets lost."""
    loss_mode: LossMode = "stall"

    def __post_init__(self) -> None:
        for name in ("delay_s", "jitter_s", "loss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"link {name} must be a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"link {name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.loss > 1:
            raise ConfigError(f"link loss must be at most 1 (100 %), got {self.loss!r}")
        rate = self.rate_Bps
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
                raise ConfigError(f"link rate_Bps must be a finite number or None, got {rate!r}")
            if rate <= 0:
                raise ConfigError(f"link rate_Bps must be > 0, got {rate!r}")
            object.__setattr__(self, "rate_Bps", float(rate))
        if self.loss_mode not in ("stall", "drop"):
            raise ConfigError(f"link loss_mode must be 'stall' or 'drop', got {self.loss_mode!r}")

    @property
    def noop(self) -> bool:
        """True when the link changes nothing (no delay, jitter, rate limit or loss)."""
        return not (self.delay_s or self.jitter_s or self.loss) and self.rate_Bps is None

    @property
    def rto_s(self) -> float:
        """The retransmission timeout a lost packet costs in ``stall`` mode."""
        return max(MIN_RTO_S, 2 * (self.delay_s + self.jitter_s))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data, plus ``spec``: the string ``parse_link`` reads back."""
        return {
            "delay_s": self.delay_s,
            "jitter_s": self.jitter_s,
            "rate_Bps": self.rate_Bps,
            "loss": self.loss,
            "loss_mode": self.loss_mode,
            "spec": str(self),
        }

    def __str__(self) -> str:
        parts: list[str] = []
        if self.delay_s or self.jitter_s or self.noop:
            parts.append(f"delay={_format_time(self.delay_s)}")
        if self.jitter_s:
            parts.append(f"jitter={_format_time(self.jitter_s)}")
        if self.rate_Bps is not None:
            parts.append(f"rate={_format_rate(self.rate_Bps)}")
        if self.loss:
            parts.append(f"loss={_format_loss(self.loss)}")
        if self.loss_mode != "stall":
            parts.append(f"loss-mode={self.loss_mode}")
        return ",".join(parts)


def _split_number(key: str, text: str) -> tuple[float, str]:
    m = _NUMBER.match(text.strip())
    if m is None:
        raise ConfigError(f"bad link {key} {text!r}: expected a non-negative number with a unit")
    return float(m.group(1)), m.group(2).lower()


def _parse_time(key: str, text: str) -> float:
    value, unit = _split_number(key, text)
    if unit not in _TIME_UNITS:
        raise ConfigError(f"bad link {key} {text!r}: unit must be one of us, ms, s")
    return value / _TIME_UNITS[unit]


def _parse_rate(text: str) -> float:
    value, unit = _split_number("rate", text)
    if unit not in _RATE_UNITS:
        raise ConfigError(
            f"bad link rate {text!r}: unit must be one of bit, kbit, mbit, gbit (bits/s) "
            "or bps, kbps, mbps, gbps (BYTES/s, as in tc)"
        )
    if value <= 0:
        raise ConfigError(f"bad link rate {text!r}: must be > 0")
    return value * _RATE_UNITS[unit]


def _parse_loss(text: str) -> float:
    value, unit = _split_number("loss", text)
    if unit not in ("", "%"):
        raise ConfigError(f"bad link loss {text!r}: a percentage (1%) or a fraction (0.01)")
    loss = value / 100 if unit == "%" else value
    if loss > 1:
        hint = "" if unit else f" (for a percentage write {text.strip()}%)"
        raise ConfigError(f"bad link loss {text!r}: more than 100 %{hint}")
    return loss


def _number(value: float) -> str:
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _pick(value: float, texts: list[str], parse: Callable[[str], float], fallback: str) -> str:
    """The shortest of ``texts`` that reads back exactly (one showing a number >= 1 on a tie)."""
    exact = [t for t in texts if parse(t) == value]
    if not exact:
        return fallback
    return min(exact, key=lambda t: (len(t), float(t.rstrip("abcdefghijklmnopqrstuvwxyz%")) < 1))


def _format_time(seconds: float) -> str:
    texts = [_number(seconds * _TIME_UNITS[u]) + u for u in ("s", "ms", "us")]
    return _pick(seconds, texts, lambda t: _parse_time("delay", t), _number(seconds) + "s")


def _format_rate(rate_Bps: float) -> str:
    texts = [_number(rate_Bps / _RATE_UNITS[u]) + u for u in ("gbit", "mbit", "kbit", "bit")]
    return _pick(rate_Bps, texts, _parse_rate, _number(rate_Bps) + "bps")


def _format_loss(loss: float) -> str:
    percent = _number(loss * 100) + "%"
    if len(percent) <= 8 and "e" not in percent and _parse_loss(percent) == loss:
        return percent
    return _number(loss)


def parse_link(text: str) -> LinkSpec:
    """Read ``delay=20ms,jitter=5ms,rate=100mbit,loss=1%,loss-mode=stall`` (any subset, any order).

    Times take us, ms or s; rates tc's units (``mbit`` = 10^6 bits/s, ``mbps`` = 10^6 BYTES/s);
    loss a percentage or a fraction.  ConfigError names the bad key or value.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"empty link spec {text!r}: expected e.g. delay=20ms,rate=100mbit,loss=1%")
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise ConfigError(f"bad link spec item {item.strip()!r} in {text!r}: expected key=value")
        if key in seen:
            raise ConfigError(f"link spec {text!r} gives {key!r} twice")
        seen.add(key)
        if key in ("delay", "jitter"):
            fields[f"{key}_s"] = _parse_time(key, value)
        elif key == "rate":
            fields["rate_Bps"] = _parse_rate(value)
        elif key == "loss":
            fields["loss"] = _parse_loss(value)
        elif key in ("loss-mode", "loss_mode"):
            mode = value.strip().lower()
            if mode not in ("stall", "drop"):
                raise ConfigError(f"bad link loss-mode {value.strip()!r}: expected stall or drop")
            fields["loss_mode"] = mode
        else:
            raise ConfigError(
                f"unknown link spec key {key!r} in {text!r}: expected delay, jitter, rate, loss, loss-mode"
            )
    return LinkSpec(**fields)


@dataclass(frozen=True, slots=True)
class Release:
    """When a frame reaches the wire: at ``release_at``; ``drop``: the connection is lost instead."""

    release_at: float
    drop: bool = False
    stalled: bool = False
    """True when a lost packet delayed this frame by a retransmission timeout."""


class LinkShaper:
    """One connection's FIFO through the link: ``schedule`` says when each frame arrives.

    Frames serialise at the rate one after another, then travel ``delay ± jitter`` (never below
    0); arrivals never reorder.  A frame of ``nbytes`` spans ``ceil(nbytes / MSS)`` packets and is
    hit by a loss with probability ``1 - (1 - loss) ** packets``.
    """

    def __init__(self, spec: LinkSpec, seed: int = 0) -> None:
        self.spec = spec
        self._rng = random.Random(seed)
        self._busy_until = -math.inf
        self._last_release = -math.inf
        rate = spec.rate_Bps
        self.chunk_bytes: int | None = None if rate is None else max(MSS, min(1 << 20, int(rate * 0.02)))
        """Frames larger than this should be scheduled in pieces (about 20 ms of the rate each), so
        a peer sees a big frame trickle in as over a real slow link; None: no rate, no need."""

    def schedule(self, now: float, nbytes: int) -> Release:
        """Schedule a frame of ``nbytes`` handed over at ``now`` (seconds on any monotonic clock)."""
        spec = self.spec
        start = max(now, self._busy_until)
        done = start if spec.rate_Bps is None else start + nbytes / spec.rate_Bps
        self._busy_until = done
        travel = spec.delay_s
        if spec.jitter_s:
            travel = max(0.0, travel + self._rng.uniform(-spec.jitter_s, spec.jitter_s))
        release = done + travel
        stalled = False
        if spec.loss:
            packets = max(1, math.ceil(nbytes / MSS))
            if self._rng.random() < 1 - (1 - spec.loss) ** packets:
                if spec.loss_mode == "drop":
                    return Release(max(release, self._last_release), drop=True)
                release += spec.rto_s
                stalled = True
        release = max(release, self._last_release)  # TCP delivers in order: wait behind earlier frames
        self._last_release = release
        return Release(release, stalled=stalled)


# --------------------------------------------------------------------------- process-global state

_lock = threading.Lock()
_spec: LinkSpec | None = None
_seeds = random.Random(0)
_down = False
_listeners: list[Callable[[bool], None]] = []


def install(spec: LinkSpec | None, seed: int = 0) -> None:
    """Shape every connection made from now on by ``spec`` (None: stop shaping new ones).

    Each new connection's shaper draws its seed from ``random.Random(seed)``, so a run is
    repeatable given the order connections are made in.  Existing connections keep their shaper.
    """
    global _spec, _seeds
    if spec is not None and not isinstance(spec, LinkSpec):
        raise ConfigError(f"install() takes a LinkSpec or None, got {spec!r}")
    with _lock:
        _spec = spec
        _seeds = random.Random(seed)


def uninstall() -> None:
    """Stop shaping new connections (same as ``install(None)``)."""
    install(None)


def installed() -> LinkSpec | None:
    """The spec new connections are shaped by, or None."""
    return _spec


@contextmanager
def shaped(spec: LinkSpec | None, seed: int = 0) -> Iterator[LinkSpec | None]:
    """``install(spec, seed)`` for the block, then put back what was installed before."""
    global _spec, _seeds
    with _lock:
        before = (_spec, _seeds)
    install(spec, seed)
    try:
        yield spec
    finally:
        with _lock:
            _spec, _seeds = before


def new_shaper() -> LinkShaper | None:
    """A shaper for a new connection: the installed spec's, a pass-through one while the link is
    down (so frames can be held), or None: send directly."""
    with _lock:
        spec = _spec
        if spec is None and not _down:
            return None
        seed = _seeds.getrandbits(64)
    return LinkShaper(spec if spec is not None else LinkSpec(), seed)


def is_down() -> bool:
    """True while the link is down."""
    return _down


def link_down() -> None:
    """Cut the link: nothing goes out, nothing received is processed, until ``link_up``."""
    _set_down(True)


def link_up() -> None:
    """Restore the link: what was held flows again."""
    _set_down(False)


def _set_down(down: bool) -> None:
    global _down
    if _down == down:
        return
    _down = down
    for listener in list(_listeners):
        listener(down)


def subscribe(listener: Callable[[bool], None]) -> Callable[[], None]:
    """Call ``listener(down)`` on every change of the link state; returns the unsubscribe function.

    It may be called from a signal handler: it must only hand work to its event loop
    (``call_soon_threadsafe``)."""
    _listeners.append(listener)

    def unsubscribe() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return unsubscribe


def install_signal_handlers() -> None:
    """SIGUSR1 takes the link down, SIGUSR2 brings it up (call from the main thread).

    ``meshai node --link`` installs them, so a simulator can partition a node by pid."""
    signal.signal(signal.SIGUSR1, lambda _sig, _frame: link_down())
    signal.signal(signal.SIGUSR2, lambda _sig, _frame: link_up())
