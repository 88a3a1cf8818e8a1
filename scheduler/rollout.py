"""Staged rollouts of a new model version across a fleet: a pure policy that says what to do next.

The executor (the node store, the signed packages) switches versions and measures; this module decides.
Nothing here performs I/O or reads a clock: time is passed in as ``now`` (monotonic seconds), metrics as
``VersionMetrics``, and every answer is data: a new ``RolloutState`` and the ``Decision`` that led to it,
with a reason a person can read and the gate figures behind it.

A rollout moves the new version onto growing shares of traffic (``RolloutConfig.stages``, e.g. 10 %,
50 %, 100 %).  The unit is always a whole pipeline: every stage of a pipeline runs one version, so a
request never sees two.  ``meshai.rollouts`` serves the new version as a second whole pipeline of the
same deployment and gives it the share of requests (per request or per robot); a fleet of many
deployments may instead move whole deployments (``pipelines_on_new``).  At each step the new version *bakes* for
``bake_s`` seconds while the executor calls ``decide`` with both versions' metrics over the step's window
(measured since ``RolloutState.step_started_at``):

* any gate fails → ``rollback`` (the reason names the gate and its figures);
* the bake time has passed, and every gate passes on enough samples → ``advance`` to the next stage, or
  ``complete`` after the last;
* otherwise → ``hold``, and the reason says what it waits for (time, samples).

The gates: **p95** (the new version's p95 latency may be at most ``max_p95_regression`` slower, relative,
than the old one's; judged only once both have ``min_samples`` requests — at 100 % the old version serves
nothing, so the last old p95 that had enough samples stands in as the baseline), **error_rate** (the new
version's errors per request at most ``max_error_rate``; judged on ``min_samples`` requests, or earlier when
its errors already exceed what ``min_samples`` requests could tolerate), **drift** (the new version's drift
score at most ``max_drift``; a version that reports no drift score does not block).

The operator may ``pause`` (a paused rollout only holds, whatever the metrics), ``resume`` (the bake of the
current stage starts again from ``now``) or ``rollback`` at any time before the end.  ``completed`` and
``rolled_back`` are terminal: nothing changes them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshai.errors import ConfigError
from scheduler.checks import integer as _int
from scheduler.checks import number as _num
from scheduler.checks import short as _ms

__all__ = [
    "ACTIONS",
    "GATES",
    "STATUSES",
    "Decision",
    "RolloutConfig",
    "RolloutState",
    "VersionMetrics",
    "decide",
    "parse_duration",
    "parse_fraction",
    "parse_stages",
    "pause",
    "pipelines_on_new",
    "resume",
    "rollback",
    "start",
]

STATUSES = ("pending", "baking", "paused", "completed", "rolled_back")
TERMINAL = ("completed", "rolled_back")
ACTIONS = ("advance", "hold", "complete", "rollback", "pause", "resume")
GATES = ("p95", "error_rate", "drift")

#: Float noise allowed when a figure is compared with its limit (a regression of exactly 10 % passes 0.10).
EPS = 1e-9


def _pct(x: float) -> str:
    """A fraction as a percentage a person reads: ``10 %``, ``2.5 %``, ``0.25 %``."""
    return f"{x * 100:.3g} %"


# ------------------------------------------------------------------------------------ parsing flags

_PCT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*$")
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_fraction(text: str, *, name: str = "fraction") -> float:
    """``"10%"`` → 0.1, ``"0.1"`` → 0.1 (a bare number is already a fraction).  ConfigError otherwise."""
    m = _PCT.match(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"{name} must be a percentage like 10% or a fraction like 0.1, got {text!r}")
    v = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {text!r}")
    return v


def parse_stages(text: str) -> tuple[float, ...]:
    """``"10%,50%,100%"`` → ``(0.1, 0.5, 1.0)``; checked as ``RolloutConfig.stages`` is."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"stages must be a list like 10%,50%,100%, got {text!r}")
    stages = tuple(parse_fraction(part, name=f"stage {part.strip()!r}") for part in text.split(","))
    return _check_stages(stages, text)


def parse_duration(text: str) -> float:
    """``"60s"`` → 60.0, ``"2m"`` → 120.0, ``"500ms"`` → 0.5, ``"1h"``, a bare number is seconds."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"duration must be a number with a unit ms, s, m or h (e.g. 60s), got {text!r}")
    v = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not math.isfinite(v):
        raise ConfigError(f"duration must be finite, got {text!r}")
    return v


def _check_stages(stages: object, shown: object = None) -> tuple[float, ...]:
    shown = stages if shown is None else shown
    if not isinstance(stages, tuple | list) or not stages:
        raise ConfigError(
            f"stages must be a non-empty sequence of fractions such as (0.1, 0.5, 1.0), got {shown!r}"
        )
    out = tuple(
        _num(f"stage {i + 1} of {shown!r}", s, 0.0, 1.0, strict_lo=True) for i, s in enumerate(stages)
    )
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            raise ConfigError(
                f"stages must be strictly increasing, got {_pct(out[i])} after {_pct(out[i - 1])} in {shown!r}"
            )
    if out[-1] != 1.0:
        raise ConfigError(f"the last stage must be 100% (the whole fleet), got {_pct(out[-1])} in {shown!r}")
    return out


# ------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """How a rollout proceeds and when it stops.

    ``stages``: fractions of the fleet's pipelines on the new version, strictly increasing in (0, 1],
    ending at 1.0; ``bake_s``: how long each stage is watched before it may advance; ``max_p95_regression``:
    relative p95 slowdown allowed (0.10 = 10 % slower); ``max_error_rate``: errors per request allowed on
    the new version; ``max_drift``: the highest drift score allowed; ``min_samples``: requests on the new
    version (and on the old one, for p95) before a gate may pass.
    """

    stages: tuple[float, ...] = (0.1, 0.5, 1.0)
    bake_s: float = 60.0
    max_p95_regression: float = 0.10
    max_error_rate: float = 0.01
    max_drift: float = 0.2
    min_samples: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", _check_stages(self.stages))
        _num("bake_s", self.bake_s, 0.0)
        _num("max_p95_regression", self.max_p95_regression, 0.0)
        _num("max_error_rate", self.max_error_rate, 0.0, 1.0)
        _num("max_drift", self.max_drift, 0.0)
        _int("min_samples", self.min_samples, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "stages": list(self.stages),
            "bake_s": self.bake_s,
            "max_p95_regression": self.max_p95_regression,
            "max_error_rate": self.max_error_rate,
            "max_drift": self.max_drift,
            "min_samples": self.min_samples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutConfig:
        """The inverse of ``to_dict`` (missing keys take their defaults; bad values raise ConfigError)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown rollout config key {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        kw = dict(d)
        if isinstance(kw.get("stages"), list):
            kw["stages"] = tuple(kw["stages"])
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class VersionMetrics:
    """One version's live figures over the current window: requests served, of which failed, the p95
    latency (None without samples) and the highest drift score (None when not measured)."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    drift: float | None = None

    def __post_init__(self) -> None:
        _int("requests", self.requests, 0)
        _int("errors", self.errors, 0)
        if self.errors > self.requests:
            raise ConfigError(f"errors must be <= requests ({self.requests}), got {self.errors}")
        if self.p95_ms is not None:
            _num("p95_ms", self.p95_ms, 0.0)
        if self.drift is not None:
            _num("drift", self.drift, 0.0)

    @property
    def error_rate(self) -> float | None:
        """Errors per request, None without requests."""
        return self.errors / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p95_ms": self.p95_ms,
            "drift": self.drift,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy (or the operator) did, and why.

    ``step`` is the stage index after the action (-1 before the first), ``share`` the fraction of the
    fleet's pipelines on the new version after it, ``at`` the time it was taken.  ``gates`` maps each gate
    (``p95``, ``error_rate``, ``drift``) to ``{"value", "limit", "ok"}``; ``ok`` is None while a gate cannot
    be judged yet (too few samples, nothing measured).  Operator actions carry no gates.
    """

    action: str
    step: int
    share: float
    reason: str
    at: float
    gates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown rollout action {self.action!r} (known: {', '.join(ACTIONS)})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "action": self.action,
            "step": self.step,
            "share": self.share,
            "reason": self.reason,
            "at": self.at,
            "gates": {k: dict(v) for k, v in self.gates.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Decision:
        """The inverse of ``to_dict``."""
        return cls(
            action=d["action"],
            step=int(d["step"]),
            share=float(d["share"]),
            reason=str(d["reason"]),
            at=float(d["at"]),
            gates={str(k): dict(v) for k, v in dict(d.get("gates") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where a rollout stands.

    ``step``: index into ``RolloutConfig.stages`` (-1 before the start); ``status``: one of ``STATUSES``;
    ``step_started_at``: when the current stage's bake began (None before the start); ``reason``: why the
    rollout is in this state; ``history``: every decision that changed the state (holds are not kept);
    ``baseline_p95_ms``: the old version's last p95 measured on enough samples, which stands in for it
    once the old version serves too little (at 100 %); ``paused_from``: the status a pause interrupted;
    ``pre_p95_ms``: the old version's p95 before the rollout began, when it carried all the traffic —
    given, it is the stand-in at 100 % instead (the new version then carries all of it too: where both
    versions share nodes, an old p95 measured at part load would flatter the old version).
    """

    step: int = -1
    status: str = "pending"
    step_started_at: float | None = None
    reason: str = "not started"
    history: tuple[Decision, ...] = ()
    baseline_p95_ms: float | None = None
    paused_from: str | None = None
    pre_p95_ms: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigError(f"unknown rollout status {self.status!r} (known: {', '.join(STATUSES)})")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < -1:
            raise ConfigError(f"step must be an integer >= -1, got {self.step!r}")

    @property
    def terminal(self) -> bool:
        """Completed or rolled back: nothing changes it any more."""
        return self.status in TERMINAL

    def share(self, config: RolloutConfig) -> float:
        """The share of traffic (whole pipelines or requests) on the new version in this state."""
        if self.status == "rolled_back" or self.step < 0:
            return 0.0
        if self.status == "completed":
            return 1.0
        return config.stages[min(self.step, len(config.stages) - 1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "step": self.step,
            "status": self.status,
            "step_started_at": self.step_started_at,
            "reason": self.reason,
            "history": [h.to_dict() for h in self.history],
            "baseline_p95_ms": self.baseline_p95_ms,
            "paused_from": self.paused_from,
            "pre_p95_ms": self.pre_p95_ms,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutState:
        """The inverse of ``to_dict``."""
        started = d.get("step_started_at")
        base = d.get("baseline_p95_ms")
        pre = d.get("pre_p95_ms")
        return cls(
            step=int(d.get("step", -1)),
            status=str(d.get("status", "pending")),
            step_started_at=None if started is None else float(started),
            reason=str(d.get("reason", "")),
            history=tuple(Decision.from_dict(h) for h in d.get("history") or ()),
            baseline_p95_ms=None if base is None else float(base),
            paused_from=d.get("paused_from"),
            pre_p95_ms=None if pre is None else float(pre),
        )


# ------------------------------------------------------------------------------------------- gates


@dataclass(frozen=True, slots=True)
class _Gates:
    table: dict[str, dict[str, Any]]
    failed: list[str]  # reasons of the gates that fail
    waiting: list[str]  # what the passing verdict still waits for
    baseline_p95_ms: float | None


def _gates(config: RolloutConfig, state: RolloutState, old: VersionMetrics, new: VersionMetrics) -> _Gates:
    n = config.min_samples
    failed: list[str] = []
    waiting: list[str] = []
    table: dict[str, dict[str, Any]] = {}

    # p95: relative regression of the new version against the old one (or the stored baseline).
    baseline = state.baseline_p95_ms
    old_judged = old.requests >= n and old.p95_ms is not None
    if old_judged:
        baseline = old.p95_ms
    ref_name = "the old version" if old_judged else "the old version's baseline"
    ref_p95 = baseline
    if not old_judged and state.pre_p95_ms is not None:
        ref_p95, ref_name = state.pre_p95_ms, "the old version before the rollout"
    if new.requests < n or new.p95_ms is None:
        table["p95"] = {"value": None, "limit": config.max_p95_regression, "ok": None}
        waiting.append(f"{n} requests on the new version ({new.requests} so far)")
    elif ref_p95 is None:
        table["p95"] = {"value": None, "limit": config.max_p95_regression, "ok": None}
        waiting.append(f"{n} requests on the old version to compare p95 with ({old.requests} so far)")
    else:
        worse = 0.0 if new.p95_ms <= 0 else math.inf  # against a zero baseline
        regression = new.p95_ms / ref_p95 - 1.0 if ref_p95 > 0 else worse
        ok = regression <= config.max_p95_regression + EPS
        table["p95"] = {
            "value": regression if math.isfinite(regression) else None,
            "limit": config.max_p95_regression,
            "ok": ok,
        }
        if not ok:
            slower = _pct(regression) if math.isfinite(regression) else "infinitely"
            failed.append(
                f"p95 latency {_ms(new.p95_ms)} ms on the new version vs {_ms(ref_p95)} ms on {ref_name}: "
                f"{slower} slower, over the {_pct(config.max_p95_regression)} allowed"
            )

    # error rate: judged on min_samples requests, or earlier when the errors already exceed what
    # min_samples requests could tolerate (the breach is then certain).
    rate = new.error_rate
    certain = new.errors / max(new.requests, n) > config.max_error_rate + EPS
    if certain:
        table["error_rate"] = {"value": rate, "limit": config.max_error_rate, "ok": False}
        failed.append(
            f"error rate {_pct(rate or 0.0)} on the new version ({new.errors} of {new.requests} requests), "
            f"over the {_pct(config.max_error_rate)} allowed"
        )
    elif new.requests < n:
        table["error_rate"] = {"value": rate, "limit": config.max_error_rate, "ok": None}
    else:
        table["error_rate"] = {"value": rate, "limit": config.max_error_rate, "ok": True}

    # drift: the new version's highest drift score; none reported does not block.
    if new.drift is None:
        table["drift"] = {"value": None, "limit": config.max_drift, "ok": None}
    else:
        ok = new.drift <= config.max_drift + EPS
        table["drift"] = {"value": new.drift, "limit": config.max_drift, "ok": ok}
        if not ok:
            failed.append(
                f"drift score {new.drift:.3g} on the new version, over the {config.max_drift:.3g} allowed"
            )
    return _Gates(table, failed, waiting, baseline)


# ------------------------------------------------------------------------------------------- policy


def _record(state: RolloutState, decision: Decision, **changes: Any) -> tuple[RolloutState, Decision]:
    new = dataclasses.replace(state, reason=decision.reason, history=(*state.history, decision), **changes)
    return new, decision


def _unchanged(
    config: RolloutConfig | None, state: RolloutState, now: float, why: str
) -> tuple[RolloutState, Decision]:
    if config is not None:
        share = state.share(config)
    elif state.status == "completed":
        share = 1.0
    elif state.status == "rolled_back" or state.step < 0:
        share = 0.0
    else:  # operator actions know no config; the last recorded share stands
        share = state.history[-1].share if state.history else 0.0
    return state, Decision("hold", state.step, share, why, now)


def _terminal_reason(state: RolloutState) -> str:
    return f"the rollout is already {state.status.replace('_', ' ')} ({state.reason}): nothing changes"


def start(
    config: RolloutConfig, now: float, pre_p95_ms: float | None = None
) -> tuple[RolloutState, Decision]:
    """Begin a rollout: the first stage's share of traffic goes to the new version and starts baking.
    ``pre_p95_ms``: the old version's p95 just before (see ``RolloutState``)."""
    at = _num("now", now, -math.inf)
    if pre_p95_ms is not None:
        _num("pre_p95_ms", pre_p95_ms, 0.0)
    share = config.stages[0]
    d = Decision("advance", 0, share, f"rollout started: {_pct(share)} of traffic on the new version", at)
    return _record(RolloutState(pre_p95_ms=pre_p95_ms), d, step=0, status="baking", step_started_at=at)


def decide(
    config: RolloutConfig, state: RolloutState, old: VersionMetrics, new: VersionMetrics, now: float
) -> tuple[RolloutState, Decision]:
    """The next move given both versions' metrics over the current stage's window (see the module doc)."""
    at = _num("now", now, -math.inf)
    if state.terminal:
        return _unchanged(config, state, at, _terminal_reason(state))
    if state.status == "pending":
        return _unchanged(config, state, at, "the rollout has not started")
    if state.step >= len(config.stages):
        raise ConfigError(f"rollout step {state.step} is beyond the config's {len(config.stages)} stages")
    g = _gates(config, state, old, new)
    if g.baseline_p95_ms != state.baseline_p95_ms:
        state = dataclasses.replace(state, baseline_p95_ms=g.baseline_p95_ms)
    share = config.stages[state.step]
    if state.status == "paused":
        why = f"paused ({state.reason})"
        if g.failed:
            why += "; would roll back: " + "; ".join(g.failed)
        return state, Decision("hold", state.step, share, why, at, g.table)
    if g.failed:
        reason = "; ".join(g.failed) + ": roll back"
        d = Decision("rollback", state.step, 0.0, reason, at, g.table)
        return _record(state, d, status="rolled_back")
    started = state.step_started_at if state.step_started_at is not None else at
    elapsed = at - started
    waiting = list(g.waiting)
    if elapsed < config.bake_s - EPS:
        waiting.insert(0, f"the bake time ({_ms(elapsed)} s of {_ms(config.bake_s)} s)")
    if waiting:
        reason = f"holding at {_pct(share)}: waiting for " + " and ".join(waiting)
        return state, Decision("hold", state.step, share, reason, at, g.table)
    passed = f"gates passed after {_ms(elapsed)} s at {_pct(share)}"
    if state.step + 1 >= len(config.stages):
        d = Decision("complete", state.step, 1.0, f"{passed}: rollout complete", at, g.table)
        return _record(state, d, status="completed")
    nxt = config.stages[state.step + 1]
    d = Decision("advance", state.step + 1, nxt, f"{passed}: advance to {_pct(nxt)}", at, g.table)
    return _record(state, d, step=state.step + 1, step_started_at=at)


def pause(
    state: RolloutState, now: float, why: str = "paused by the operator"
) -> tuple[RolloutState, Decision]:
    """Stop the rollout where it is: a paused rollout only holds until ``resume``."""
    at = _num("now", now, -math.inf)
    if state.terminal:
        return _unchanged(None, state, at, _terminal_reason(state))
    if state.status == "paused":
        return _unchanged(None, state, at, f"already paused ({state.reason})")
    share = state.history[-1].share if state.history else 0.0
    d = Decision("pause", state.step, share, f"paused: {why}", at)
    return _record(state, d, status="paused", paused_from=state.status)


def resume(state: RolloutState, now: float) -> tuple[RolloutState, Decision]:
    """Continue a paused rollout; the current stage's bake starts again at ``now``."""
    at = _num("now", now, -math.inf)
    if state.terminal:
        return _unchanged(None, state, at, _terminal_reason(state))
    if state.status != "paused":
        return _unchanged(None, state, at, f"not paused ({state.status}): nothing to resume")
    back = state.paused_from or ("baking" if state.step >= 0 else "pending")
    share = state.history[-1].share if state.history else 0.0
    d = Decision("resume", state.step, share, "resumed: the stage bakes again from now", at)
    started = at if back == "baking" else state.step_started_at
    return _record(state, d, status=back, paused_from=None, step_started_at=started)


def rollback(
    state: RolloutState, now: float, why: str = "rolled back by the operator"
) -> tuple[RolloutState, Decision]:
    """The operator's rollback: every pipeline goes back to the old version, from any non-terminal state."""
    at = _num("now", now, -math.inf)
    if state.terminal:
        return _unchanged(None, state, at, _terminal_reason(state))
    d = Decision("rollback", state.step, 0.0, f"rolled back: {why}", at)
    return _record(state, d, status="rolled_back", paused_from=None)


# ---------------------------------------------------------------------------------------- pipelines


def pipelines_on_new(share: float, pipelines: Sequence[str]) -> list[str]:
    """The whole pipelines that run the new version at ``share`` of the fleet.

    ``ceil(share * n)`` of them (at least one when ``share > 0``), taken in sorted name order, so the
    choice does not depend on the order given and grows monotonically: the pipelines at 10 % are among
    those at 50 %.  The unit is a pipeline name; a pipeline never runs half on each version.
    """
    s = _num("share", share, 0.0, 1.0)
    names = [str(p) for p in pipelines]
    if len(set(names)) != len(names):
        dup = next(p for p in names if names.count(p) > 1)
        raise ConfigError(f"pipeline names must be unique, got {dup!r} twice")
    if s == 0 or not names:
        return []
    k = min(len(names), max(1, math.ceil(round(s * len(names), 9))))
    return sorted(names)[:k]
