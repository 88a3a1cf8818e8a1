"""Where work goes: the local swarm or the Ray cluster.  A pure policy that returns decisions as data.

``decide(policy, state)`` looks at frozen figures measured by the caller (queue depth, the swarm's p95
latency, the link to the cluster, Ray's own estimate) and returns a ``Decision``; an executor (the
mesh, or ``scheduler/ray_backend.py``) carries it out.  Nothing here performs I/O, reads a clock or
imports Ray, so every rule is a fast table-driven unit test and a burst replays deterministically.

The rules, first match wins:

1. ``no_ray``     — ``policy.ray_available`` is false                  → swarm.
2. bulk jobs (``state.batch_size >= policy.bulk_batch``):
   a. ``bulk_link`` — shipping the job, ``link_latency_s + request_bytes * 8 / link_bandwidth_bps``,
      would take more than ``policy.max_link_s``                        → swarm;
   b. ``bulk``      — otherwise                                          → ray.
3. live requests:
   a. ``overflow``  — ``state.queue_depth >= policy.queue_threshold``   → ray;
   b. ``slo``       — an SLO is set, the swarm's p95 is known and above it, and Ray's estimate is
      known and lower than that p95                                     → ray.
4. ``local``      — anything else                                       → swarm.

``link_bandwidth_bps`` is in bits per second, ``request_bytes`` in bytes.  Every reason names its rule's
numbers, e.g. ``"queue 12 ≥ threshold 8: overflow to ray"``.

``OverflowCounter`` is the matching accounting: each request is routed exactly once and finished
exactly once, or it raises ``ConfigError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from meshai.errors import ConfigError

Target = Literal["swarm", "ray"]
Rule = Literal["no_ray", "bulk", "bulk_link", "overflow", "slo", "local"]

_TARGETS: tuple[Target, ...] = ("swarm", "ray")
_RULES: tuple[Rule, ...] = ("no_ray", "bulk", "bulk_link", "overflow", "slo", "local")

__all__ = [
    "Decision",
    "OffloadPolicy",
    "OverflowCounter",
    "Rule",
    "Target",
    "WorkState",
    "decide",
    "link_seconds",
]


def _int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer ≥ {lo}, got {value!r}")


def _num(name: str, value: object, lo: float, *, strict: bool = False) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value > lo if strict else value >= lo)
    )
    if not ok:
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '≥'} {lo:g}, got {value!r}")


def _opt_num(name: str, value: object, lo: float, *, strict: bool = False) -> None:
    if value is not None:
        _num(name, value, lo, strict=strict)


def _f(x: float) -> str:
    """A number as a person reads it: ``12``, ``2.5``, ``0.0032``."""
    return f"{x:.4g}"


@dataclass(frozen=True, slots=True)
class OffloadPolicy:
    """Thresholds of the offload policy; validated at construction (``ConfigError`` names the bad value)."""

    queue_threshold: int
    latency_slo_ms: float | None = None
    bulk_batch: int = 64
    max_link_s: float = 2.0
    ray_available: bool = True

    def __post_init__(self) -> None:
        _int("OffloadPolicy.queue_threshold", self.queue_threshold, lo=1)
        _opt_num("OffloadPolicy.latency_slo_ms", self.latency_slo_ms, 0.0, strict=True)
        _int("OffloadPolicy.bulk_batch", self.bulk_batch, lo=1)
        _num("OffloadPolicy.max_link_s", self.max_link_s, 0.0, strict=True)
        if not isinstance(self.ray_available, bool):
            raise ConfigError(f"OffloadPolicy.ray_available must be a bool, got {self.ray_available!r}")


@dataclass(frozen=True, slots=True)
class WorkState:
    """What the caller measured for one unit of work; validated at construction."""

    queue_depth: int
    in_flight: int
    swarm_p95_ms: float | None
    batch_size: int
    request_bytes: int
    link_bandwidth_bps: float
    link_latency_s: float
    ray_est_ms: float | None = None

    def __post_init__(self) -> None:
        _int("WorkState.queue_depth", self.queue_depth, lo=0)
        _int("WorkState.in_flight", self.in_flight, lo=0)
        _opt_num("WorkState.swarm_p95_ms", self.swarm_p95_ms, 0.0)
        _int("WorkState.batch_size", self.batch_size, lo=1)
        _int("WorkState.request_bytes", self.request_bytes, lo=0)
        _num("WorkState.link_bandwidth_bps", self.link_bandwidth_bps, 0.0, strict=True)
        _num("WorkState.link_latency_s", self.link_latency_s, 0.0)
        _opt_num("WorkState.ray_est_ms", self.ray_est_ms, 0.0)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one unit of work goes, why (a sentence with the numbers), and which rule said so."""

    target: Target
    reason: str
    rule: Rule | None = None

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ConfigError(f"Decision.target must be one of {_TARGETS}, got {self.target!r}")
        if not isinstance(self.reason, str) or not self.reason:
            raise ConfigError(f"Decision.reason must be a non-empty string, got {self.reason!r}")
        if self.rule is not None and self.rule not in _RULES:
            raise ConfigError(f"Decision.rule must be one of {_RULES} or None, got {self.rule!r}")

    def to_dict(self) -> dict[str, str | None]:
        """The decision as JSON-ready data."""
        return {"target": self.target, "reason": self.reason, "rule": self.rule}


def link_seconds(state: WorkState) -> float:
    """Seconds to ship ``state.request_bytes`` to the cluster: latency + bytes·8 / bandwidth (bit/s)."""
    return state.link_latency_s + state.request_bytes * 8.0 / state.link_bandwidth_bps


def decide(policy: OffloadPolicy, state: WorkState) -> Decision:
    """Swarm or Ray for ``state`` under ``policy``, by the module's rules in order; pure, never raises."""
    if not policy.ray_available:
        return Decision("swarm", "ray unavailable: keep on swarm", "no_ray")

    if state.batch_size >= policy.bulk_batch:
        link_s = link_seconds(state)
        bulk = f"bulk batch {state.batch_size} ≥ {policy.bulk_batch}"
        if link_s > policy.max_link_s:
            return Decision(
                "swarm",
                f"{bulk} but link {_f(link_s)} s > max {_f(policy.max_link_s)} s: keep on swarm",
                "bulk_link",
            )
        return Decision(
            "ray", f"{bulk}, link {_f(link_s)} s ≤ max {_f(policy.max_link_s)} s: bulk to ray", "bulk"
        )

    if state.queue_depth >= policy.queue_threshold:
        return Decision(
            "ray",
            f"queue {state.queue_depth} ≥ threshold {policy.queue_threshold}: overflow to ray",
            "overflow",
        )

    slo, p95, est = policy.latency_slo_ms, state.swarm_p95_ms, state.ray_est_ms
    if slo is not None and p95 is not None and est is not None and p95 > slo and est < p95:
        return Decision(
            "ray",
            f"swarm p95 {_f(p95)} ms > SLO {_f(slo)} ms and ray est {_f(est)} ms < {_f(p95)} ms: to ray",
            "slo",
        )

    queue = f"queue {state.queue_depth} < threshold {policy.queue_threshold}"
    if slo is None:
        latency = "no SLO"
    elif p95 is None:
        latency = "swarm p95 unknown"
    elif p95 <= slo:
        latency = f"swarm p95 {_f(p95)} ms ≤ SLO {_f(slo)} ms"
    elif est is None:
        latency = f"swarm p95 {_f(p95)} ms > SLO {_f(slo)} ms but ray est unknown"
    else:
        latency = f"swarm p95 {_f(p95)} ms > SLO {_f(slo)} ms but ray est {_f(est)} ms not lower"
    return Decision("swarm", f"{queue}, {latency}: keep on swarm", "local")


RequestId = int | str


@dataclass(slots=True)
class OverflowCounter:
    """Pure accounting of routed requests: each id is routed once and done once, else ``ConfigError``.

    Finished ids are remembered so that a late duplicate is caught too; make one counter per burst or
    deployment rather than one per process lifetime.
    """

    _pending: dict[RequestId, Target] = field(default_factory=dict)
    _finished: set[RequestId] = field(default_factory=set)
    _routed: dict[Target, int] = field(default_factory=lambda: {"swarm": 0, "ray": 0})
    _done: dict[Target, int] = field(default_factory=lambda: {"swarm": 0, "ray": 0})

    @staticmethod
    def _check_id(request_id: object) -> None:
        if isinstance(request_id, bool) or not isinstance(request_id, int | str):
            raise ConfigError(f"request id must be an int or str, got {request_id!r}")

    def route(self, decision: Decision, request_id: RequestId) -> None:
        """Record that ``request_id`` went to ``decision.target``; a second route of the same id raises."""
        self._check_id(request_id)
        if request_id in self._pending:
            raise ConfigError(
                f"request {request_id!r} routed twice (already pending on {self._pending[request_id]})"
            )
        if request_id in self._finished:
            raise ConfigError(f"request {request_id!r} routed again after it was done")
        self._pending[request_id] = decision.target
        self._routed[decision.target] += 1

    def done(self, request_id: RequestId) -> Target:
        """Record the one result of ``request_id`` and return where it ran; unknown or repeated ids raise."""
        self._check_id(request_id)
        if request_id in self._finished:
            raise ConfigError(f"request {request_id!r} done twice")
        try:
            target = self._pending.pop(request_id)
        except KeyError:
            raise ConfigError(f"request {request_id!r} done but never routed") from None
        self._finished.add(request_id)
        self._done[target] += 1
        return target

    @property
    def swarm(self) -> int:
        """Requests routed to the swarm so far (pending or done)."""
        return self._routed["swarm"]

    @property
    def ray(self) -> int:
        """Requests routed to Ray so far (pending or done)."""
        return self._routed["ray"]

    @property
    def pending(self) -> int:
        """Requests routed whose result has not come back."""
        return len(self._pending)

    @property
    def completed(self) -> dict[Target, int]:
        """Results received, per target."""
        return dict(self._done)
