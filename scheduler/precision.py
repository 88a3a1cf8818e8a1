"""Precision chosen together with placement, within a measured accuracy budget.  Pure.

The quantize step (``scheduler/quantize.py``, I/O) measures what int8 costs: the accuracy drop, in
points, of each quantizable op run in int8 on its own, and of the whole int8 model.  The planner reads
those figures as data (``Constraints.int8_drop_pts``, ``whole_int8_drop_pts``) and predicts a plan's
drop as the sum over the ops its int8 stages hold (at least the whole model's drop when every
quantizable op is int8).  The search:

1. Each node runs the fastest precision it has among the variants (fp32, and int8 when a budget above
   0 allows it).  The plan found that way stands if its predicted drop is within the budget.
2. Otherwise accuracy gets a price: op p costs ``λ · drop[p]`` extra seconds on an int8 node, so the
   partitioner moves the most damaging ops to fp32 nodes first.  λ is searched geometrically; the
   cheapest plan (scored without the price) within budget wins, and at λ = ∞ no op that costs
   accuracy runs in int8 at all.
3. If even that has no plan (every node that could take those ops runs only int8), a node that runs
   another precision too is moved to it, one at a time, best first.

A budget of 0 rules int8 out: nodes that run only int8 take no stage, and the plan's notes (or the
error, when nothing else can run the model) say that the budget blocked them.  The caller checks the
chosen plan against a measured run (``meshai.planning``) and re-plans with the unexplained drop
charged to the plan's int8 ops when prediction and measurement disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from meshai.capabilities import NodeCapability
from meshai.errors import PlanError
from meshai.plan import Constraints, Plan
from scheduler.cost import CostContext, Evaluation, build_context, choose_precision
from scheduler.graph import GraphIR

__all__ = ["DEFAULT_BUDGET_PTS", "int8_wire", "plan_mixed", "predicted_drop"]

#: The accuracy budget when int8 figures are given without ``max_accuracy_drop``.
DEFAULT_BUDGET_PTS = 1.0
#: Prices on accuracy tried, in seconds per point (geometric, low to high).
LAMBDAS = tuple(10.0**e for e in np.arange(-7.0, 2.5, 0.5))


def predicted_drop(int8_ops: Iterable[str], constraints: Constraints) -> float:
    """The predicted accuracy drop (points) of running ``int8_ops`` in int8, from the measured figures."""
    drops = constraints.int8_drop_pts or {}
    ops = set(int8_ops)
    total = sum(max(0.0, drops.get(o, 0.0)) for o in ops)
    whole = constraints.whole_int8_drop_pts
    if drops and whole is not None and set(drops) <= ops:
        total = max(total, whole)
    return round(total, 4)


def _int8_ops(ctx: CostContext, ev: Evaluation) -> list[str]:
    g = ctx.graph
    return [g.ops[p].name for s in ev.stages if ctx.precision[s.device] == "int8" for p in s.ops]


def _assignment(ctx: CostContext, ev: Evaluation) -> tuple[int, ...]:
    a = [0] * ctx.n_ops
    for s in ev.stages:
        for p in s.ops:
            a[p] = s.device
    return tuple(a)


def _try(ctx: CostContext) -> Evaluation | None:
    from scheduler.partition import search

    try:
        return search(ctx)
    except PlanError:
        return None


def _best_under_budget(
    graph: GraphIR,
    nodes: Sequence[NodeCapability],
    constraints: Constraints,
    precision: Sequence[str | None],
    drops: np.ndarray,
    budget: float,
) -> tuple[CostContext, Evaluation] | None:
    """The best plan with these node precisions whose predicted drop is within ``budget``, or None."""
    base = build_context(graph, nodes, constraints, precision)
    ev = _try(base)
    if ev is not None and predicted_drop(_int8_ops(base, ev), constraints) <= budget:
        return base, ev
    if "int8" not in precision or not (drops > 0).any():
        return None
    objective = constraints.objective
    best: Evaluation | None = None
    for lam in (*LAMBDAS, math.inf):
        penalty = np.where(drops > 0, math.inf, 0.0) if math.isinf(lam) else drops * lam
        priced = build_context(graph, nodes, constraints, precision, penalty.tolist())
        cand = _try(priced)
        if cand is None:
            continue
        true = base.cached(_assignment(priced, cand))  # scored without the price
        if not true.feasible or predicted_drop(_int8_ops(base, true), constraints) > budget:
            continue
        if best is None or true.key(objective) < best.key(objective):
            best = true
    return (base, best) if best is not None else None


def _next_precision(node: NodeCapability, current: str, variants: Sequence[str]) -> str | None:
    usable = [p for p in node.profile.precisions if p in variants]
    i = usable.index(current) if current in usable else -1
    return usable[i + 1] if 0 <= i < len(usable) - 1 else None


def _blocked_notes(nodes: Sequence[NodeCapability], variants: Sequence[str], why: str) -> list[str]:
    return [
        f"{n.name} ({n.kind}) runs only {', '.join(n.profile.precisions)}: left out, int8 is blocked by {why}"
        for n in nodes
        if choose_precision(n, variants) is None and "int8" in n.profile.precisions
    ]


def plan_mixed(graph: GraphIR, nodes: Sequence[NodeCapability], constraints: Constraints) -> Plan:
    """Placement and per-stage precision together under ``constraints.max_accuracy_drop``."""
    from scheduler.partition import plan, plan_from_evaluation

    budget = DEFAULT_BUDGET_PTS if constraints.max_accuracy_drop is None else constraints.max_accuracy_drop
    variants = tuple(dict.fromkeys((*constraints.precisions, "int8")))
    if budget <= 0:
        why = f"--max-accuracy-drop {budget:g}"
        fp = tuple(p for p in variants if p != "int8")
        c = dataclasses.replace(constraints, precisions=fp, int8_drop_pts=None, int8_blocked=why)
        out = plan(graph, nodes, c)
        return dataclasses.replace(out, notes=(*out.notes, *_blocked_notes(nodes, fp, why)))
    c = dataclasses.replace(constraints, precisions=variants)
    drop_of = c.int8_drop_pts or {}
    drops = np.array([max(0.0, float(drop_of.get(op.name, 0.0))) for op in graph.ops])
    precision: list[str | None] = [choose_precision(n, variants) for n in nodes]
    notes: list[str] = []
    while True:
        found = _best_under_budget(graph, nodes, c, precision, drops, budget)
        if found is not None:
            ctx, ev = found
            out = plan_from_evaluation(ctx, ev, [n.name for n in nodes])
            drop = predicted_drop(_int8_ops(ctx, ev), c)
            has_int8 = any(s.precision == "int8" for s in out.stages)
            predicted = dataclasses.replace(out.predicted, accuracy_drop_pts=drop if has_int8 else None)
            return dataclasses.replace(out, predicted=predicted, notes=tuple(notes))
        demotable = [
            d
            for d, n in enumerate(nodes)
            if precision[d] == "int8" and _next_precision(n, "int8", variants) is not None
        ]
        if not demotable:
            raise PlanError(
                f"no plan keeps the predicted accuracy drop within --max-accuracy-drop {budget:g} points: "
                f"the ops that cost accuracy in int8 can run on no node that runs another precision "
                f"(whole int8 model: {c.whole_int8_drop_pts} points)"
            )
        trials = []
        for d in demotable:
            trial = list(precision)
            trial[d] = _next_precision(nodes[d], "int8", variants)
            got = _best_under_budget(graph, nodes, c, trial, drops, budget)
            if got is not None:
                trials.append((got[1].key(c.objective), d, trial))
        if trials:
            _, d, precision = min(trials, key=lambda t: t[0])
            notes.append(f"{nodes[d].name} runs {precision[d]}, not int8, to stay within the accuracy budget")
        else:
            for d in demotable:
                precision[d] = _next_precision(nodes[d], "int8", variants)
                notes.append(
                    f"{nodes[d].name} runs {precision[d]}, not int8, to stay within the accuracy budget"
                )


def int8_wire(plan: Plan, graph: GraphIR) -> dict[int, list[str]]:
    """Per stage id, the boundary tensors it sends or receives as int8: float32 tensors an int8 stage
    sends only to int8 stages (a graph output stays fp32: the caller reads it).  The cost model
    counts these at a quarter of their fp32 bytes (``scheduler.cost.traffic``)."""
    precision = {s.id: s.precision for s in plan.stages}
    wire: dict[int, list[str]] = {s.id: [] for s in plan.stages}
    for s in plan.stages:
        if s.precision != "int8":
            continue
        for t in s.outputs:
            dests = s.routes.get(t, ())
            info = graph.tensors.get(t)
            if not dests or t in graph.outputs or info is None or info.dtype != "float32":
                continue
            if all(precision[d] == "int8" for d in dests):
                wire[s.id].append(t)
                for d in dests:
                    wire[d].append(t)
    return wire
