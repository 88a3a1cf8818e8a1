"""From an assignment of ops to devices to pipeline stages: what each stage runs, takes and sends.

A stage is every op assigned to one device.  Stages must form an acyclic pipeline (the quotient
graph of the assignment is a DAG); they are numbered in a topological order of that DAG, ties broken
by the position of their first op, so the numbering is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshai.errors import PlanError
from scheduler.graph import GraphIR


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage of an assignment: device index, op positions, and the tensors it exchanges."""

    device: int
    ops: tuple[int, ...]
    const_ops: tuple[str, ...]
    const_tensors: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    routes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # tensor -> consuming stages


def stage_order(graph: GraphIR, assignment: Sequence[int]) -> list[int] | None:
    """Devices in pipeline order, or None when the stages would form a cycle."""
    first: dict[int, int] = {}
    for pos, dev in enumerate(assignment):
        first.setdefault(dev, pos)
    edges: dict[int, set[int]] = {d: set() for d in first}
    indeg = dict.fromkeys(first, 0)
    for pos, op in enumerate(graph.ops):
        dst = assignment[pos]
        for t in op.inputs:
            src_pos = graph.producer.get(t)
            if src_pos is None:
                continue
            src = assignment[src_pos]
            if src != dst and dst not in edges[src]:
                edges[src].add(dst)
                indeg[dst] += 1
    ready = sorted((first[d], d) for d in first if indeg[d] == 0)
    order: list[int] = []
    while ready:
        _, d = ready.pop(0)
        order.append(d)
        for e in sorted(edges[d]):
            indeg[e] -= 1
            if indeg[e] == 0:
                ready.append((first[e], e))
                ready.sort()
    return order if len(order) == len(first) else None


def split_stages(
    graph: GraphIR, assignment: Sequence[int], order: Sequence[int] | None = None
) -> list[StageSpec]:
    """Stages of an assignment (one per device used), in pipeline order; cycles raise PlanError.

    ``order`` is the devices' pipeline order when the caller already has it from ``stage_order``.
    """
    if len(assignment) != len(graph.ops):
        raise PlanError(f"assignment has {len(assignment)} entries for {len(graph.ops)} ops")
    if order is None:
        order = stage_order(graph, assignment)
    if order is None:
        raise PlanError("assignment makes the stages depend on each other in a cycle")
    stage_of_dev = {d: k for k, d in enumerate(order)}
    op_stage = [stage_of_dev[d] for d in assignment]
    graph_inputs = set(graph.inputs)
    graph_outputs = set(graph.outputs)

    members: list[list[int]] = [[] for _ in order]
    for pos, s in enumerate(op_stage):
        members[s].append(pos)

    specs: list[StageSpec] = []
    for k, dev in enumerate(order):
        ops = members[k]
        inputs: dict[str, None] = {}  # dicts as ordered sets
        const_t: dict[str, None] = {}
        const_ops: dict[str, None] = {}
        for pos in ops:
            for t in graph.ops[pos].inputs:
                if t in graph.const_bytes:
                    if t not in const_t:
                        const_t[t] = None
                        const_ops.update(dict.fromkeys(graph.const_closure.get(t, ())))
                    continue
                src = graph.producer.get(t)
                if (src is None and t in graph_inputs) or (src is not None and op_stage[src] != k):
                    inputs[t] = None
        outputs: list[str] = []
        routes: dict[str, tuple[int, ...]] = {}
        for pos in ops:
            for t in graph.ops[pos].outputs:
                dests = sorted({op_stage[c] for c in graph.consumers.get(t, ()) if op_stage[c] != k})
                if dests or t in graph_outputs:
                    outputs.append(t)
                if dests:
                    routes[t] = tuple(dests)
        specs.append(
            StageSpec(
                dev, tuple(ops), tuple(const_ops), tuple(const_t), tuple(inputs), tuple(outputs), routes
            )
        )
    return specs
