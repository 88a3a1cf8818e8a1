"""How good the partitioner is: random small DAGs, brute-force optima, and the ratio between them.

``random_case(seed)`` builds a small random DAG (≤ 8 ops: skip connections, several inputs and
outputs, parallel branches, op types some devices lack) over ≤ 3 random heterogeneous nodes with a
random objective, stage count, memory limits and pins.  ``brute_force`` scores every assignment of
ops to nodes with the same exact cost model the planner uses.  Both are pure and seeded.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from meshai.capabilities import BUILTIN_PROFILES, NodeCapability
from meshai.errors import PlanError
from meshai.plan import Constraints
from scheduler.cost import build_context, evaluate
from scheduler.graph import GraphIR, OpInfo, TensorInfo
from scheduler.partition import plan

_OP_TYPES = ("Conv", "Relu", "Gemm", "Add", "Concat", "LRN", "MaxPool", "Softmax")


@dataclass(frozen=True, slots=True)
class Case:
    """One random planning problem."""

    seed: int
    graph: GraphIR
    nodes: tuple[NodeCapability, ...]
    constraints: Constraints


def random_case(seed: int, max_ops: int = 8, max_nodes: int = 3) -> Case:
    """A seeded random DAG with ≤ ``max_ops`` ops over ≤ ``max_nodes`` heterogeneous nodes."""
    rng = np.random.default_rng(seed)
    n_ops = int(rng.integers(2, max_ops + 1))
    n_inputs = int(rng.integers(1, 3))
    tensors: dict[str, TensorInfo] = {}

    def tensor(name: str) -> str:
        nbytes = int(10 ** rng.uniform(3, 6.5))
        tensors[name] = TensorInfo(name, "float32", (nbytes // 4,), (nbytes // 4) * 4)
        return name

    inputs = [tensor(f"in{i}") for i in range(n_inputs)]
    available = list(inputs)
    ops: list[OpInfo] = []
    const_bytes: dict[str, int] = {}
    for p in range(n_ops):
        k = int(rng.integers(1, min(3, len(available)) + 1))
        # prefer recent tensors (chains) but allow skips and input reuse
        weights = np.linspace(1.0, 3.0, len(available))
        weights /= weights.sum()
        ins = sorted(
            {available[int(i)] for i in rng.choice(len(available), size=k, p=weights)}, key=available.index
        )
        out = tensor(f"t{p}")
        w = f"w{p}"
        const_bytes[w] = int(10 ** rng.uniform(3, 7))
        op_type = _OP_TYPES[int(rng.integers(0, len(_OP_TYPES)))]
        flops = float(10 ** rng.uniform(6, 9.5))
        act = sum(tensors[t].nbytes for t in ins) + tensors[out].nbytes
        ops.append(OpInfo(p, f"op{p}", op_type, (*ins, w), (out,), (w,), flops, act))
        available.append(out)
    consumed = {t for op in ops for t in op.inputs}
    outputs = [op.outputs[0] for op in ops if op.outputs[0] not in consumed]
    if n_ops > 2 and rng.random() < 0.3:
        extra = ops[int(rng.integers(0, n_ops - 1))].outputs[0]
        if extra not in outputs:
            outputs.insert(0, extra)
    producer = {op.outputs[0]: p for p, op in enumerate(ops)}
    consumers: dict[str, list[int]] = {}
    for p, op in enumerate(ops):
        for t in op.inputs:
            consumers.setdefault(t, []).append(p)
    for t in inputs:  # an input nobody reads is not an input
        if t not in consumers:
            ops[0] = replace(ops[0], inputs=(t, *ops[0].inputs))
            consumers.setdefault(t, []).append(0)
    graph = GraphIR(
        name=f"random{seed}",
        ops=tuple(ops),
        tensors=tensors,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        const_bytes=const_bytes,
        const_closure={w: () for w in const_bytes},
        producer=producer,
        consumers={k: tuple(v) for k, v in consumers.items()},
    )
    n_nodes = int(rng.integers(1, max_nodes + 1))
    kinds = ("cpu", "gpu", "npu")
    nodes = []
    speed = {}
    for d in range(n_nodes):
        prof = BUILTIN_PROFILES[kinds[int(rng.integers(0, len(kinds)))]]
        if rng.random() < 0.3:
            prof = replace(prof, memory_bytes=int(10 ** rng.uniform(6, 7.5)))
        if rng.random() < 0.3:
            bw = float(10 ** rng.uniform(5, 8))
            prof = replace(prof, link=replace(prof.link, bandwidth_bps=bw))
        nodes.append(NodeCapability(name=f"n{d}", profile=prof))
        speed[f"n{d}"] = float(rng.uniform(0.3, 3.0))
    objective = "latency" if rng.random() < 0.5 else "throughput"
    stages = int(rng.integers(1, n_nodes + 1)) if rng.random() < 0.3 else None
    pins = {}
    if rng.random() < 0.25:
        pins[inputs[0]] = f"n{int(rng.integers(0, n_nodes))}"
    return Case(
        seed, graph, tuple(nodes), Constraints(objective=objective, stages=stages, pins=pins, speed=speed)
    )


def brute_force(case: Case) -> float:
    """The optimum objective (seconds) over every assignment of ops to nodes; inf if none is feasible."""
    ctx = build_context(case.graph, case.nodes, case.constraints)
    best: tuple[float, ...] | None = None
    best_score = math.inf
    objective = case.constraints.objective
    for a in itertools.product(range(len(case.nodes)), repeat=len(case.graph.ops)):
        ev = evaluate(ctx, a)
        if not ev.feasible:
            continue
        k = ev.key(objective)
        if best is None or k < best:
            best, best_score = k, ev.score(objective)
    return best_score


@dataclass(frozen=True, slots=True)
class CaseResult:
    """The planner against the optimum on one case."""

    seed: int
    optimum_s: float
    planned_s: float

    @property
    def ratio(self) -> float:
        """planned / optimum (1.0 is optimal; both infeasible counts as 1.0)."""
        if math.isinf(self.optimum_s):
            return 1.0 if math.isinf(self.planned_s) else math.nan
        return self.planned_s / self.optimum_s if self.optimum_s > 0 else 1.0


def compare(case: Case) -> CaseResult:
    """Plan one case and brute-force it."""
    opt = brute_force(case)
    try:
        p = plan(case.graph, case.nodes, case.constraints)
        got = (
            p.predicted.bottleneck_ms
            if case.constraints.objective == "throughput"
            else p.predicted.latency_ms
        ) / 1e3
    except PlanError:
        got = math.inf
    return CaseResult(case.seed, opt, got)
