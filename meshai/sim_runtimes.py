"""``meshai sim --runtimes onnxruntime,litert,ort-mobile``: node i runs only the i-th runtime.

After the first plan, every stage that lands on a node without onnxruntime is converted for that
node's runtime and measured (``meshai.artifacts``); the measurements go back to the planner as data
(``Constraints.artifacts``) and it plans again — a cut that did not convert or agree is then placed
only where onnxruntime runs it — until the plan's cuts all have good artifacts (a few rounds at most).
The sim's package carries the artifacts, so each node loads its stage on its own runtime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.errors import PlanError

if TYPE_CHECKING:
    from meshai.artifacts import Artifacts
    from meshai.plan import Plan
    from meshai.planning import LoadedModel

#: Requests whose stage inputs measure each converted stage.
SAMPLES = 8
#: Plan → convert → plan rounds before giving up.
ROUNDS = 3


def needs_artifacts(runtimes: Sequence[str]) -> bool:
    """Whether any node runs without onnxruntime (and so needs converted stages)."""
    return any(r != "onnxruntime" for r in runtimes)


async def plan_for_runtimes(
    loaded: LoadedModel,
    plan: Plan,
    node_runtimes: Mapping[str, Sequence[str]],
    requests: Sequence[Mapping[str, np.ndarray]],
    replan: Callable[[Mapping[str, Mapping[frozenset[str], bool]]], Plan],
    remember: Callable[[Mapping[str, Mapping[frozenset[str], bool]]], None],
) -> tuple[Plan, Artifacts, dict[str, Any]]:
    """The plan whose stages each run on their node's runtime, the artifacts for it, and a report.
    ``replan`` plans again with the measurements (only when a stage failed: a plan whose cuts all
    converted stands); ``remember`` hands them to the planner for later replans (recoveries)."""
    from meshai.artifacts import Artifacts, build_artifacts
    from nodes.executors import planner_artifacts

    arts = Artifacts()
    t0 = time.perf_counter()
    for _ in range(ROUNDS):
        todo = _unmeasured(plan, node_runtimes, arts)
        if todo:
            more = await asyncio.to_thread(
                build_artifacts, loaded, plan, node_runtimes, list(requests[:SAMPLES])
            )
            arts.files.update(more.files)
            for key, st in more.stages.items():
                arts.stages.setdefault(key, st)["artifacts"].update(st["artifacts"])
        table = planner_artifacts(arts.table())
        if not _failed(plan, node_runtimes, arts):
            remember(table)
            return plan, arts, _report(plan, node_runtimes, arts, time.perf_counter() - t0)
        plan = replan(table)
    raise PlanError(
        f"no plan whose stages all converted for their nodes' runtimes after {ROUNDS} rounds: "
        + "; ".join(arts.failures()[:3])
    )


def _verdicts(
    plan: Plan, node_runtimes: Mapping[str, Sequence[str]], arts: Artifacts
) -> dict[int, bool | None]:
    """Per stage on a node without onnxruntime: whether its artifact converted and agreed (None: not
    measured yet)."""
    from nodes.executors import cut_key

    out: dict[int, bool | None] = {}
    for s in plan.stages:
        rt = _runtime(node_runtimes, s.node)
        if rt == "onnxruntime":
            continue
        st = arts.stages.get(cut_key(s.inputs, s.outputs), {"artifacts": {}})
        rec = st["artifacts"].get({"litert": "litert-fp32"}.get(rt, rt))
        out[s.id] = None if rec is None else bool(rec["ok"])
    return out


def _unmeasured(plan: Plan, node_runtimes: Mapping[str, Sequence[str]], arts: Artifacts) -> list[int]:
    """Stages on a node without onnxruntime whose cut has no measurement for that runtime yet."""
    return [k for k, v in _verdicts(plan, node_runtimes, arts).items() if v is None]


def _failed(plan: Plan, node_runtimes: Mapping[str, Sequence[str]], arts: Artifacts) -> list[int]:
    """Stages on a node without onnxruntime whose artifact is missing or did not agree."""
    return [k for k, v in _verdicts(plan, node_runtimes, arts).items() if v is not True]


def _runtime(node_runtimes: Mapping[str, Sequence[str]], node: str) -> str:
    """The runtime ``node`` prefers (its first)."""
    return next(iter(node_runtimes.get(node, ())), "onnxruntime")


def _report(
    plan: Plan, node_runtimes: Mapping[str, Sequence[str]], arts: Artifacts, seconds: float
) -> dict[str, Any]:
    """The sim JSON's ``runtimes``: per stage its node, runtime and the measurements of its artifacts."""
    from nodes.executors import cut_key

    stages = []
    for s in plan.stages:
        st = arts.stages.get(cut_key(s.inputs, s.outputs), {})
        stages.append(
            {
                "stage": s.id,
                "node": s.node,
                "runtime": _runtime(node_runtimes, s.node),
                "artifacts": st.get("artifacts", {}),
            }
        )
    return {
        "nodes": {n: list(r) for n, r in node_runtimes.items()},
        "stages": stages,
        "conversion_s": round(seconds, 3),
        "package_files": sorted(arts.package_files()),
    }
