"""Keeping a running pipeline healthy: pure policies that say when and how to replan.

The runtime (a deployment's entry node, or the mesh) measures; these functions decide.  Nothing here
performs I/O or reads a clock: time is passed in as ``now`` (monotonic seconds), measurements as data,
and every answer is data (an ``Evaluation``, a ``Decision``, an ``SloCheck``, a speed table).

Three situations use them:

* **A node comes back or joins.**  ``propose(graph, nodes, constraints, current)`` plans afresh over the
  swarm as it is now, re-costs the running plan under the same figures (``evaluate_plan``) and
  ``decide``s: adopt the new plan only if it is predicted ``min_gain`` (relative) better.  A returning
  strong node wins; a weak one is declined with the figures in the reason.
* **The SLO is breached.**  ``SloController`` watches request latencies; ``check(now)`` says a replan is
  *due* once the window's p95 has stayed above the SLO for ``sustain`` consecutive checks, outside a
  cooldown.  The runtime then corrects the speed figures with ``measured_speeds`` (the cost model
  believed a node faster than it is) and calls ``propose``; it reports back with ``applied(now)`` or
  ``declined(now, reason)``, both of which start the cooldown, so a hopeless SLO does not replan in a
  loop.
* **A node is lost.**  The running plan re-costed without that node is infeasible, so ``decide`` adopts
  any feasible new plan; ``relax_stages`` first lowers an explicit ``--stages K`` to the nodes left.

The speed model: ``Constraints.speed[node]`` scales the node's profile throughput (FLOP/s and memory
bandwidth), so stage compute time scales as ``1 / speed``.  A node measured 3x slower than predicted has
speed 1/3 (times whatever factor the prediction already used).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshai.capabilities import NodeCapability
from meshai.errors import ConfigError, PlanError
from meshai.plan import OBJECTIVES, Constraints, Plan, Predicted
from scheduler.checks import integer as _int
from scheduler.checks import number as _num
from scheduler.checks import short as _ms
from scheduler.cost import Evaluation, build_context, choose_precision, evaluate
from scheduler.graph import GraphIR
from scheduler.partition import plan as plan_graph

__all__ = [
    "Decision",
    "SloCheck",
    "SloConfig",
    "SloController",
    "decide",
    "evaluate_plan",
    "infeasible",
    "measured_speeds",
    "propose",
    "recost",
    "relax_stages",
]

#: Float noise allowed when a gain is compared with ``min_gain`` (a gain of exactly 15 % passes 0.15).
GAIN_EPS = 1e-9


def infeasible(reason: str) -> Evaluation:
    """An Evaluation that says a plan cannot run at all (e.g. it uses a node that is gone)."""
    inf = math.inf
    return Evaluation(False, reason, inf, inf, 0, inf, (), (), (), (), (), (), 1)


# --------------------------------------------------------------------------------- re-costing a plan


def evaluate_plan(
    graph: GraphIR, nodes: Sequence[NodeCapability], constraints: Constraints, plan: Plan
) -> Evaluation:
    """Re-cost an existing Plan under (possibly new) capabilities and constraints.

    Each op runs on its stage's node (matched by name), each plan node at the stage's precision; nodes
    the plan does not use keep their default precision.  With the nodes and constraints the plan was
    made with, the figures equal the plan's own ``predicted`` (up to its rounding to 1e-6 ms).  An
    infeasible placement (a broken ``stages`` count, memory, pins) comes back as an infeasible
    Evaluation; a plan that does not fit the graph or the swarm at all raises PlanError naming the
    node, op or precision.
    """
    names = [n.name for n in nodes]
    index = {n: d for d, n in enumerate(names)}
    op_index = {op.name: p for p, op in enumerate(graph.ops)}
    precision: list[str | None] = [choose_precision(n, constraints.precisions) for n in nodes]
    assignment = [-1] * len(graph.ops)
    seen: dict[int, int] = {}
    for s in plan.stages:
        d = index.get(s.node)
        if d is None:
            raise PlanError(
                f"stage {s.id} of the plan runs on node {s.node!r}, which is not in the swarm "
                f"(nodes: {', '.join(names) or 'none'})"
            )
        if d in seen:
            raise PlanError(f"node {s.node!r} runs two stages of the plan ({seen[d]} and {s.id})")
        seen[d] = s.id
        prof = nodes[d].profile
        if s.precision not in prof.flops:
            raise PlanError(
                f"stage {s.id} runs {s.precision} on node {s.node!r}, which runs only "
                f"{', '.join(prof.precisions)}"
            )
        precision[d] = s.precision
        for op in s.ops:
            p = op_index.get(op)
            if p is None:
                raise PlanError(f"stage {s.id} of the plan runs op {op!r}, which model {graph.name!r} lacks")
            if assignment[p] >= 0:
                raise PlanError(f"op {op!r} is in two stages of the plan")
            assignment[p] = d
    missing = [graph.ops[p].name for p, d in enumerate(assignment) if d < 0]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PlanError(f"the plan places no stage for op(s) {', '.join(map(repr, missing[:3]))}{more}")
    ctx = build_context(graph, nodes, constraints, precision)
    return evaluate(ctx, assignment)


def recost(graph: GraphIR, nodes: Sequence[NodeCapability], constraints: Constraints, plan: Plan) -> Plan:
    """The same Plan with its predicted figures (per stage and overall) re-costed under ``constraints``.

    Use it after correcting speeds without replanning, so that the plan's ``predicted_ms`` match the
    speed factors ``measured_speeds`` is handed next.  An infeasible re-costing raises PlanError with
    the reason."""
    ev = evaluate_plan(graph, nodes, constraints, plan)
    if not ev.feasible:
        raise PlanError(f"the plan is infeasible under these figures: {ev.reason}")
    by_node = {nodes[spec.device].name: i for i, spec in enumerate(ev.stages)}
    stages = tuple(
        dataclasses.replace(
            s,
            predicted_ms=round(ev.stage_s[by_node[s.node]] * 1e3, 6),
            memory_bytes=ev.stage_mem[by_node[s.node]],
            param_bytes=ev.stage_param[by_node[s.node]],
            bytes_out=ev.stage_bytes_out[by_node[s.node]],
        )
        for s in plan.stages
    )
    predicted = Predicted(
        latency_ms=round(ev.latency_s * 1e3, 6),
        bottleneck_ms=round(ev.bottleneck_s * 1e3, 6),
        transfer_bytes=ev.transfer_bytes,
        energy_mj=round(ev.energy_j * 1e3, 6),
        accuracy_drop_pts=plan.predicted.accuracy_drop_pts,
    )
    return dataclasses.replace(plan, stages=stages, predicted=predicted)


# ------------------------------------------------------------------------------ measured speed factors


def measured_speeds(
    plan: Plan,
    measured_ms: Mapping[int, float],
    current: Mapping[str, float] | None = None,
    *,
    smoothing: float = 0.5,
    lo: float = 0.02,
    hi: float = 50.0,
) -> dict[str, float]:
    """Speed factors per node implied by measured stage compute times.

    ``measured_ms[k]`` is the mean compute time per request of stage id ``k`` (the node's own work:
    no transfers, no queueing), comparable with ``Stage.predicted_ms``, which is exactly the stage's
    compute time in the cost model (the sum of its ops' times, dispatch overhead included).  ``current``
    holds the speed factors the plan's ``predicted_ms`` were computed with (``Constraints.speed``;
    missing nodes are 1.0) — after changing speeds without replanning, refresh the plan with ``recost``.

    The target factor is ``current * predicted / measured``: a node measured 3x slower than predicted
    has speed 1/3 of its current factor.  (Dispatch overhead is treated as scaling with speed too, a
    small error that repeated corrections remove: the fixed point is predicted == measured.)  The new
    factor moves toward the target by exponential smoothing in log space,
    ``current ** (1 - smoothing) * target ** smoothing`` (1.0 = trust the measurement fully), so that
    twice as slow and twice as fast are corrected alike; then it is clamped to ``[lo, hi]``.

    Stages without a usable measurement (absent, not finite, or <= 0) keep their node's current factor;
    nodes in ``current`` but not in the plan are passed through.  A measurement for a stage id the plan
    lacks raises PlanError.
    """
    alpha = _num("smoothing", smoothing, 0.0, 1.0)
    lo_f = _num("lo", lo, 0.0, strict_lo=True)
    hi_f = _num("hi", hi, lo_f)
    out = {str(k): float(v) for k, v in (current or {}).items()}
    for name, f in out.items():
        if not (math.isfinite(f) and f > 0):
            raise ConfigError(f"current speed factor of node {name!r} must be a finite number > 0, got {f!r}")
    ids = {s.id for s in plan.stages}
    unknown = sorted(k for k in measured_ms if k not in ids)
    if unknown:
        raise PlanError(f"measured stage id {unknown[0]} is not a stage of the plan (ids 0..{len(ids) - 1})")
    for s in plan.stages:
        cur = out.get(s.node, 1.0)
        m = measured_ms.get(s.id)
        if m is None or not math.isfinite(m) or m <= 0 or not s.predicted_ms > 0:
            out[s.node] = cur
            continue
        target = cur * s.predicted_ms / m
        new = math.exp((1.0 - alpha) * math.log(cur) + alpha * math.log(target))
        out[s.node] = min(hi_f, max(lo_f, new))
    return out


# ------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to switch to a candidate plan, and why.

    ``current`` and ``candidate`` are the objective's predicted figure in ms (latency, or the
    bottleneck for throughput; inf when infeasible).  ``gain`` is the relative improvement
    ``(current - candidate) / current``: 1.0 when only the current plan is infeasible, 0.0 when the
    candidate is infeasible or missing, negative when the candidate is worse.
    """

    adopt: bool
    reason: str
    gain: float
    current: float
    candidate: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite figures become None)."""

        def fin(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "adopt": self.adopt,
            "reason": self.reason,
            "gain": fin(self.gain),
            "current": fin(self.current),
            "candidate": fin(self.candidate),
        }


def _pct(x: float) -> str:
    return f"{abs(x) * 100:.0f} %"


def decide(current: Evaluation, candidate: Evaluation, objective: str, *, min_gain: float = 0.15) -> Decision:
    """Adopt ``candidate`` only if it is feasible and beats ``current`` by at least ``min_gain`` (relative).

    An infeasible current plan (re-costed with a node gone, say) makes any feasible candidate adopted.
    The objective's figure is ``Evaluation.score`` (latency, or bottleneck for throughput).  The reason
    names the figures, e.g. ``"predicted latency 41.2 ms vs 63.0 ms now: 35 % better"``.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    need = _num("min_gain", min_gain, 0.0)
    what = "bottleneck" if objective == "throughput" else "latency"
    cur = current.score(objective) * 1e3
    cand = candidate.score(objective) * 1e3
    if not candidate.feasible:
        why = candidate.reason or "no feasible plan"
        return Decision(False, f"the new plan is infeasible ({why}): keep the current plan", 0.0, cur, cand)
    if not current.feasible:
        why = current.reason or "infeasible"
        reason = f"the current plan cannot run ({why}): adopt the new plan (predicted {what} {_ms(cand)} ms)"
        return Decision(True, reason, 1.0, cur, cand)
    gain = (cur - cand) / cur if cur > 0 else 0.0
    figures = f"predicted {what} {_ms(cand)} ms vs {_ms(cur)} ms now"
    if gain >= need - GAIN_EPS:
        return Decision(True, f"{figures}: {_pct(gain)} better", gain, cur, cand)
    if gain > 0:
        verdict = f"{_pct(gain)} better, less than the {_pct(need)} required"
    elif gain < 0:
        verdict = f"{_pct(gain)} worse"
    else:
        verdict = "no better"
    return Decision(False, f"{figures}: {verdict}: keep the current plan", gain, cur, cand)


def propose(
    graph: GraphIR,
    nodes: Sequence[NodeCapability],
    constraints: Constraints,
    current: Plan,
    *,
    min_gain: float = 0.15,
) -> tuple[Plan | None, Decision]:
    """Plan afresh over ``nodes`` and decide whether to switch from ``current``.

    The running plan is re-costed under the same nodes and constraints (``evaluate_plan``); if it uses
    a node not in ``nodes`` (lost) or otherwise cannot be costed, it counts as infeasible.  Returns the
    candidate Plan (switch to it only if ``decision.adopt``) and the Decision; when the planner raises
    PlanError, ``(None, Decision(adopt=False, reason=<the PlanError text>))``.
    """
    try:
        cur_ev = evaluate_plan(graph, nodes, constraints, current)
    except PlanError as exc:
        cur_ev = infeasible(str(exc))
    cur_ms = cur_ev.score(constraints.objective) * 1e3
    try:
        candidate = plan_graph(graph, nodes, constraints)
    except PlanError as exc:
        return None, Decision(False, str(exc), 0.0, cur_ms, math.inf)
    cand_ev = evaluate_plan(graph, nodes, constraints, candidate)
    return candidate, decide(cur_ev, cand_ev, constraints.objective, min_gain=min_gain)


def relax_stages(constraints: Constraints, n_nodes: int) -> Constraints:
    """Lower an explicit ``stages=K`` to ``min(K, n_nodes)`` (other constraints unchanged).

    After a node is lost, "exactly 4 stages" over 3 nodes is impossible; the runtime keeps as many
    stages as it can rather than stopping.  ``n_nodes`` should count the nodes that can run the model.
    Without an explicit stage count the constraints come back as they are; no nodes is a PlanError.
    """
    n = _int("n_nodes", n_nodes, 0)
    if n == 0:
        raise PlanError("no nodes left to plan over")
    if constraints.stages is None or constraints.stages <= n:
        return constraints
    return dataclasses.replace(constraints, stages=n)


# ----------------------------------------------------------------------------------- SLO controller


@dataclass(frozen=True, slots=True)
class SloConfig:
    """When the SLO controller acts.

    ``slo_ms``: the p95 latency target; ``window``: how many recent requests the p95 is taken over;
    ``sustain``: consecutive checks above the SLO before a replan is due; ``cooldown_s``: quiet time
    after a replan was applied or declined; ``min_gain``: the relative predicted improvement a new plan
    must bring (hand it to ``propose``/``decide``).
    """

    slo_ms: float
    window: int = 64
    sustain: int = 2
    cooldown_s: float = 3.0
    min_gain: float = 0.15

    def __post_init__(self) -> None:
        _num("slo_ms", self.slo_ms, 0.0, strict_lo=True)
        _int("window", self.window, 1)
        _int("sustain", self.sustain, 1)
        _num("cooldown_s", self.cooldown_s, 0.0)
        _num("min_gain", self.min_gain, 0.0)

    @property
    def min_samples(self) -> int:
        """Latencies the window must hold before its p95 counts (half the window, at least 1)."""
        return max(1, self.window // 2)


@dataclass(frozen=True, slots=True)
class SloCheck:
    """One check: the window's p95 (None without samples), whether it is over the SLO, whether a
    replan is due now, and why."""

    p95_ms: float | None
    over: bool
    due: bool
    reason: str
    samples: int = 0
    streak: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "p95_ms": self.p95_ms,
            "over": self.over,
            "due": self.due,
            "reason": self.reason,
            "samples": self.samples,
            "streak": self.streak,
        }


class SloController:
    """A closed-loop SLO watchdog with explicit state; time is always passed in, never read.

    ``observe`` adds a request latency to a bounded window.  ``check(now)`` computes the window's p95
    (numpy's linear interpolation, as the sim reports it); a check with the window at least half full
    and p95 above the SLO extends the streak, any other check resets it.  A replan is due when the
    streak reaches ``sustain`` outside the cooldown.  ``applied(now)`` (a new plan is running) clears
    the window — latencies measured under the old plan no longer apply — and ``declined(now, reason)``
    keeps it; both reset the streak and start the cooldown, so a hopeless SLO is retried at most once
    per cooldown.
    """

    def __init__(self, config: SloConfig) -> None:
        self.config = config
        self._window: deque[float] = deque(maxlen=config.window)
        self._streak = 0
        self._cool_until = -math.inf
        self._last = ""

    @property
    def samples(self) -> int:
        """Latencies in the window now."""
        return len(self._window)

    @property
    def streak(self) -> int:
        """Consecutive checks so far with the p95 over the SLO (window full enough)."""
        return self._streak

    def observe(self, latency_ms: float) -> None:
        """Record one request's end-to-end latency (ms); the oldest falls out of a full window."""
        self._window.append(_num("latency_ms", latency_ms, 0.0))

    def p95_ms(self) -> float | None:
        """The window's p95 latency, None when it is empty."""
        if not self._window:
            return None
        return float(np.percentile(np.fromiter(self._window, float), 95))

    def check(self, now: float) -> SloCheck:
        """Update the streak and say whether a replan is due at time ``now`` (monotonic seconds)."""
        cfg = self.config
        p95 = self.p95_ms()
        n = len(self._window)
        over = p95 is not None and p95 > cfg.slo_ms
        enough = n >= cfg.min_samples
        self._streak = self._streak + 1 if over and enough else 0
        slo = f"SLO {_ms(cfg.slo_ms)} ms"
        if p95 is None:
            return SloCheck(None, False, False, "no latencies observed yet", 0, 0)
        head = f"p95 {_ms(p95)} ms"
        if not over:
            return SloCheck(p95, False, False, f"{head} within {slo}", n, 0)
        head = f"{head} over {slo}"
        if not enough:
            reason = f"{head}, but only {n} of {cfg.min_samples} samples needed"
            return SloCheck(p95, True, False, reason, n, 0)
        checks = f"{self._streak} consecutive check{'s' if self._streak != 1 else ''}"
        if self._streak < cfg.sustain:
            return SloCheck(p95, True, False, f"{head} for {checks} of {cfg.sustain}", n, self._streak)
        if now < self._cool_until:
            left = self._cool_until - now
            last = f" after {self._last}" if self._last else ""
            reason = f"{head} for {checks}, but cooling down {left:.1f} s more{last}"
            return SloCheck(p95, True, False, reason, n, self._streak)
        return SloCheck(p95, True, True, f"{head} for {checks}: replan", n, self._streak)

    def applied(self, now: float) -> None:
        """A new plan is running: start the cooldown, clear the window and the streak."""
        self._cool_until = now + self.config.cooldown_s
        self._window.clear()
        self._streak = 0
        self._last = "a replan was applied"

    def declined(self, now: float, reason: str) -> None:
        """A replan was considered and not applied: start the cooldown (the window stays)."""
        self._cool_until = now + self.config.cooldown_s
        self._streak = 0
        self._last = f"a replan was declined: {reason}" if reason else "a replan was declined"
