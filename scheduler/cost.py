"""The cost model: op time on a device, tensor moves over links, and the exact score of a plan.

Op time on a device is a roofline: ``max(FLOPs / throughput, bytes touched / memory bandwidth)`` plus
a per-op dispatch overhead, at the precision the device runs.  A transfer between two nodes takes
``latency + bytes / bandwidth`` with the slower link of the pair.  ``evaluate`` scores an assignment of
ops to nodes exactly: stages run when all their inputs have arrived, branches on different nodes run
in parallel, and the pipeline's bottleneck is the busiest stage or network interface.
Everything here is pure: the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from meshai.capabilities import Link, NodeCapability
from meshai.errors import PlanError
from meshai.plan import Constraints
from scheduler.graph import GraphIR
from scheduler.stages import StageSpec, split_stages, stage_order

INF = math.inf

#: Bytes per element relative to fp32 when a tensor is stored at a precision.
PRECISION_SCALE = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}


@dataclass(frozen=True, slots=True)
class CostContext:
    """Everything the cost model needs about a swarm for one graph, precomputed as arrays.

    ``op_s[p, d]`` is op p's time on node d (inf where the node cannot run it), ``precision[d]`` the
    precision node d runs (None where it can run no variant of the model), ``forced[p]`` the node an op
    is pinned to (-1 for none).
    """

    graph: GraphIR
    nodes: tuple[NodeCapability, ...]
    constraints: Constraints
    precision: tuple[str | None, ...]
    op_s: np.ndarray
    op_param_bytes: np.ndarray
    forced: np.ndarray
    caller: Link
    cache: dict[tuple[int, ...], Evaluation] = field(default_factory=dict, compare=False, repr=False)
    op_s_list: list[list[float]] = field(default_factory=list, compare=False, repr=False)
    # (producer op, bytes, consumer ops, bytes as int8 on the wire)
    flows: list[tuple[int, int, tuple[int, ...], int]] = field(
        default_factory=list, compare=False, repr=False
    )
    input_flows: list[tuple[int, tuple[int, ...], int]] = field(
        default_factory=list, compare=False, repr=False
    )
    output_flows: list[tuple[int, int]] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        g = self.graph
        names = [n.name for n in self.nodes]
        self.op_s_list.extend([float(x) if math.isfinite(x) else 0.0 for x in row] for row in self.op_s)
        for p, op in enumerate(g.ops):
            for t in op.outputs:
                cons = g.consumers.get(t, ())
                if cons:
                    n = g.nbytes(t)
                    info = g.tensors.get(t)
                    wire8 = (
                        n // 4 if info is not None and info.dtype == "float32" and t not in g.outputs else n
                    )
                    self.flows.append((p, n, cons, wire8))
        for t in g.inputs:
            pin = self.constraints.pins.get(t)
            self.input_flows.append(
                (g.nbytes(t), g.consumers.get(t, ()), names.index(pin) if pin in names else -1)
            )
        for t in g.outputs:
            src = g.producer.get(t)
            if src is not None:
                self.output_flows.append((src, g.nbytes(t)))

    def cached(self, assignment: Sequence[int]) -> Evaluation:
        """``evaluate`` with a cache: searches revisit the same assignments often."""
        key = tuple(assignment)
        ev = self.cache.get(key)
        if ev is None:
            ev = self.cache[key] = evaluate(self, key)
        return ev

    @property
    def n_ops(self) -> int:
        """Number of compute ops."""
        return len(self.graph.ops)

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    def link_s(self, nbytes: float, a: int, b: int) -> float:
        """Seconds to move ``nbytes`` from node a to node b (-1 is the caller)."""
        if nbytes <= 0 or a == b:
            return 0.0
        la = self.caller if a < 0 else self.nodes[a].profile.link
        lb = self.caller if b < 0 else self.nodes[b].profile.link
        return la.transfer_s(nbytes, lb)


def choose_precision(node: NodeCapability, available: Sequence[str]) -> str | None:
    """The fastest precision the node runs among the model variants that exist, or None."""
    usable = [p for p in node.profile.precisions if p in available]
    return usable[0] if usable else None


def build_context(
    graph: GraphIR,
    nodes: Sequence[NodeCapability],
    constraints: Constraints,
    precision: Sequence[str | None] | None = None,
    int8_penalty_s: Sequence[float] | None = None,
) -> CostContext:
    """Precompute op times per node and pins; unknown pins raise PlanError.

    ``precision`` overrides each node's precision (default: the fastest variant it runs);
    ``int8_penalty_s[p]`` is added to op p's time on int8 nodes (the precision search's price on
    accuracy, see ``scheduler.precision``)."""
    if not nodes:
        raise PlanError("no nodes to plan over")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PlanError(f"two nodes are named {dup!r}")
    n_ops = len(graph.ops)
    if n_ops == 0:
        raise PlanError(f"model {graph.name!r} has no compute ops to place")
    if precision is None:
        precision = tuple(choose_precision(n, constraints.precisions) for n in nodes)
    precision = tuple(precision)
    op_s = np.full((n_ops, len(nodes)), INF)
    param = np.zeros(n_ops)
    for p, op in enumerate(graph.ops):
        param[p] = sum(graph.const_bytes.get(t, 0) for t in op.const_inputs)
    for d, node in enumerate(nodes):
        prec = precision[d]
        if prec is None:
            continue
        prof = node.profile
        speed = constraints.speed.get(node.name, 1.0)
        flops = prof.flops[prec] * speed
        scale = PRECISION_SCALE.get(prec, 1.0)
        bw = prof.mem_bandwidth_bps * speed
        for p, op in enumerate(graph.ops):
            if not prof.supports(op.op_type):
                continue
            touched = (op.act_bytes + param[p]) * scale
            op_s[p, d] = max(op.flops / flops, touched / bw) + prof.op_overhead_s
            if prec == "int8" and int8_penalty_s is not None:
                op_s[p, d] += int8_penalty_s[p]
    forced = np.full(n_ops, -1, dtype=np.int64)
    for tensor, node_name in sorted(constraints.pins.items()):
        if tensor not in graph.inputs:
            raise PlanError(
                f"--pin names {tensor!r}, which is not an input of the model "
                f"(inputs: {', '.join(graph.inputs)})"
            )
        if node_name not in names:
            raise PlanError(
                f"--pin {tensor}={node_name}: no node named {node_name!r} (nodes: {', '.join(names)})"
            )
        d = names.index(node_name)
        for p in graph.consumers.get(tensor, ()):
            if forced[p] >= 0 and forced[p] != d:
                raise PlanError(
                    f"op {graph.ops[p].name!r} reads inputs pinned to two nodes "
                    f"({names[forced[p]]!r} and {node_name!r})"
                )
            forced[p] = d
    caller = Link(constraints.caller_bandwidth_bps, constraints.caller_latency_s)
    return CostContext(graph, tuple(nodes), constraints, precision, op_s, param, forced, caller)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The exact score of one assignment."""

    feasible: bool
    reason: str
    latency_s: float
    bottleneck_s: float
    transfer_bytes: int
    energy_j: float
    stages: tuple[StageSpec, ...]
    stage_s: tuple[float, ...]
    stage_mem: tuple[int, ...]
    stage_param: tuple[int, ...]
    stage_bytes_out: tuple[int, ...]
    loads: tuple[float, ...] = ()  # every resource's busy time per request, largest first
    violations: int = 0  # how many constraints an infeasible assignment breaks

    def key(self, objective: str) -> tuple[float, ...]:
        """Sort key: feasible first; then the objective, the other figure, energy and stage count.

        For throughput the loads of every resource follow the bottleneck (largest first), so that a
        search can tell apart plans whose bottleneck is the same.  Infeasible assignments sort by how
        many constraints they break, so a search can walk towards feasibility.
        """
        if not self.feasible:
            return (1.0, float(self.violations), *(_q(x) for x in self.loads))
        if objective == "throughput":
            return (
                0.0,
                *(_q(x) for x in self.loads),
                _q(self.latency_s),
                _q(self.energy_j),
                float(len(self.stages)),
            )
        return (0.0, _q(self.latency_s), _q(self.bottleneck_s), _q(self.energy_j), float(len(self.stages)))

    def score(self, objective: str) -> float:
        """The objective's figure in seconds (inf if infeasible)."""
        if not self.feasible:
            return INF
        return self.bottleneck_s if objective == "throughput" else self.latency_s


def _q(x: float) -> float:
    """Round away float noise so that ties are broken by the next key, deterministically."""
    return float(f"{x:.12g}")


def _infeasible(reason: str, violations: int, loads: Sequence[float]) -> Evaluation:
    return Evaluation(False, reason, INF, INF, 0, INF, (), (), (), (), (), tuple(loads), max(1, violations))


def stage_memory(ctx: CostContext, spec: StageSpec, scale: float) -> tuple[int, int]:
    """(memory bytes, parameter bytes) a stage needs: weights, inputs, and its largest op's activations."""
    g = ctx.graph
    params = int(sum(g.const_bytes.get(t, 0) for t in spec.const_tensors) * scale)
    inputs = sum(g.nbytes(t) for t in spec.inputs)
    peak = max((g.ops[p].act_bytes for p in spec.ops), default=0)
    return params + inputs + peak, params


@dataclass(frozen=True, slots=True)
class Traffic:
    """Per-request work of an assignment by node: compute seconds and bytes moved."""

    compute: dict[int, float]
    pair_bytes: dict[tuple[int, int], int]  # (from node, to node) -> bytes
    from_caller: dict[int, int]
    to_caller: dict[int, int]

    def loads(self, ctx: CostContext) -> list[float]:
        """Busy seconds per request of every resource (stage compute, NIC, link), largest first."""
        nic_in = dict(self.from_caller)
        nic_out = dict(self.to_caller)
        for (a, b), n in self.pair_bytes.items():
            nic_out[a] = nic_out.get(a, 0) + n
            nic_in[b] = nic_in.get(b, 0) + n
        out = list(self.compute.values())
        for d in self.compute:
            bw = ctx.nodes[d].profile.link.bandwidth_bps
            out.append(max(nic_in.get(d, 0), nic_out.get(d, 0)) / bw)
        out.extend(ctx.link_s(n, a, b) for (a, b), n in self.pair_bytes.items())
        out.sort(reverse=True)
        return out


def traffic(ctx: CostContext, assignment: Sequence[int]) -> Traffic:
    """Compute time per node and bytes per node pair of an assignment (each tensor sent once per node)."""
    compute: dict[int, float] = {}
    op_s = ctx.op_s_list
    for p, d in enumerate(assignment):
        compute[d] = compute.get(d, 0.0) + op_s[p][d]
    pair: dict[tuple[int, int], int] = {}
    prec = ctx.precision
    for p, nbytes, cons, wire8 in ctx.flows:
        a = assignment[p]
        dests = {assignment[c] for c in cons}
        if prec[a] == "int8" and all(prec[b] == "int8" for b in dests):
            nbytes = wire8  # int8 stage to int8 stages only: sent quantized (scheduler.precision.int8_wire)
        for b in dests:
            if b != a:
                pair[(a, b)] = pair.get((a, b), 0) + nbytes
    from_caller: dict[int, int] = {}
    for nbytes, cons, pinned in ctx.input_flows:
        for b in {assignment[c] for c in cons}:
            if b != pinned:
                from_caller[b] = from_caller.get(b, 0) + nbytes
    to_caller: dict[int, int] = {}
    for p, nbytes in ctx.output_flows:
        to_caller[assignment[p]] = to_caller.get(assignment[p], 0) + nbytes
    return Traffic(compute, pair, from_caller, to_caller)


def evaluate(ctx: CostContext, assignment: Sequence[int]) -> Evaluation:
    """Score an assignment of ops (by position) to nodes (by index) exactly, or say why it is infeasible.

    An infeasible assignment still carries the resource loads it would have, so that a search can
    prefer the less bad of two infeasible assignments.
    """
    g = ctx.graph
    names = [n.name for n in ctx.nodes]
    reasons: list[str] = []
    for p, d in enumerate(assignment):
        if ctx.forced[p] >= 0 and ctx.forced[p] != d:
            reasons.append(f"op {g.ops[p].name!r} reads an input pinned to {names[int(ctx.forced[p])]!r}")
        if not math.isfinite(ctx.op_s[p, d]):
            reasons.append(f"node {names[d]!r} cannot run op {g.ops[p].name!r} ({g.ops[p].op_type})")
    k = ctx.constraints.stages
    used = len(set(assignment))
    if k is not None and used != k:
        reasons.extend([f"uses {used} stages, not {k}"] * abs(used - k))
    tr = traffic(ctx, assignment)
    loads = tr.loads(ctx)
    order = stage_order(g, assignment)
    if order is None:
        return _infeasible("stages form a cycle", len(reasons) + 1, loads)
    specs = split_stages(g, assignment, order)
    mems: list[int] = []
    params: list[int] = []
    arts = ctx.constraints.artifacts
    for s in specs:
        node = ctx.nodes[s.device]
        if arts is not None and "onnxruntime" not in node.runtimes:
            ops = frozenset(g.ops[p].name for p in s.ops)
            verdicts = [arts.get(r, {}).get(ops) for r in node.runtimes]
            unknown_ok = not ctx.constraints.artifacts_only and None in verdicts
            if True not in verdicts and not unknown_ok:
                reasons.append(
                    f"node {names[s.device]!r} runs only {', '.join(node.runtimes)}, and that stage "
                    f"({len(ops)} ops) {'did not convert or agree' if False in verdicts else 'has no artifact'} for it"
                )
        prec = ctx.precision[s.device] or "fp32"
        mem, par = stage_memory(ctx, s, PRECISION_SCALE.get(prec, 1.0))
        cap = ctx.nodes[s.device].profile.memory_bytes
        if mem > cap:
            reasons.append(f"stage on {names[s.device]!r} needs {mem} bytes, node has {cap}")
        mems.append(mem)
        params.append(par)
    if reasons:
        return _infeasible(reasons[0], len(reasons), loads)

    compute = [tr.compute[s.device] for s in specs]
    # latency: event times over the stage DAG (stages are in topological order)
    arrive = [ctx.link_s(tr.from_caller.get(s.device, 0), -1, s.device) for s in specs]
    latency = 0.0
    for i, s in enumerate(specs):
        finish = arrive[i] + compute[i]
        for j in range(i + 1, len(specs)):
            b = tr.pair_bytes.get((s.device, specs[j].device), 0)
            if b:
                arrive[j] = max(arrive[j], finish + ctx.link_s(b, s.device, specs[j].device))
        latency = max(latency, finish + ctx.link_s(tr.to_caller.get(s.device, 0), s.device, -1))

    transfer = sum(tr.pair_bytes.values()) + sum(tr.from_caller.values()) + sum(tr.to_caller.values())
    energy = sum(compute[i] * ctx.nodes[s.device].profile.active_w for i, s in enumerate(specs))
    for (a, _b), n in tr.pair_bytes.items():
        energy += n * ctx.nodes[a].profile.link.joules_per_byte
    for d, n in [*tr.from_caller.items(), *tr.to_caller.items()]:
        energy += n * ctx.nodes[d].profile.link.joules_per_byte
    bytes_out = [
        sum(n for (a, _b), n in tr.pair_bytes.items() if a == s.device) + tr.to_caller.get(s.device, 0)
        for s in specs
    ]
    return Evaluation(
        True,
        "",
        latency,
        loads[0],
        transfer,
        energy,
        tuple(specs),
        tuple(compute),
        tuple(mems),
        tuple(params),
        tuple(bytes_out),
        tuple(loads),
    )
