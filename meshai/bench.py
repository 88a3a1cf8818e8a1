"""Benchmarks (``meshai bench …``): each prints ratios against a baseline measured in the same run.

Part of the composition layer.  Every function returns the JSON-ready dict that ``--json`` prints.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from meshai.capabilities import resolve_profiles, swarm
from meshai.plan import Constraints
from meshai.progress import Progress

#: The heterogeneous 8-device swarm ``bench plan`` plans densenet121 over.
BENCH_PLAN_PROFILES = ("cpu", "gpu", "npu", "tpu", "mcu", "cpu", "gpu", "npu")


def bench_plan(cases: int = 300, repeats: int = 5, model: str = "densenet121") -> dict[str, Any]:
    """Planning time of ``model`` on 8 heterogeneous devices, and quality against brute force.

    ``plan_ms`` is the median, over ``repeats`` runs and both objectives, of the time from a loaded
    GraphIR to a Plan.  ``worst_ratio``/``mean_ratio`` compare the planner with the brute-force optimum
    over ``cases`` random DAGs (≤ 8 ops, ≤ 3 devices), scored by the same cost model.
    """
    from meshai.planning import load_for_planning
    from scheduler.partition import plan
    from scheduler.quality import compare, random_case

    loaded = load_for_planning(model)
    nodes = swarm(resolve_profiles(list(BENCH_PLAN_PROFILES)))
    times: dict[str, list[float]] = {"latency": [], "throughput": []}
    stages: dict[str, int] = {}
    for objective in times:
        for _ in range(repeats):
            t0 = time.perf_counter()
            p = plan(loaded.graph, nodes, Constraints(objective=objective))
            times[objective].append((time.perf_counter() - t0) * 1e3)
            stages[objective] = len(p.stages)
    all_ms = times["latency"] + times["throughput"]
    ratios = []
    within = 0
    worst_seed = -1
    with Progress("brute force", cases) as bar:
        for seed in range(cases):
            r = compare(random_case(seed))
            ratios.append(r.ratio)
            if r.ratio <= 1.02:
                within += 1
            if r.ratio >= max(ratios):
                worst_seed = seed
            bar.advance()
    return {
        "model": model,
        "ops": len(loaded.graph.ops),
        "devices": list(BENCH_PLAN_PROFILES),
        "plan_ms": round(statistics.median(all_ms), 3),
        "plan_ms_by_objective": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "stages_by_objective": stages,
        "cases": cases,
        "worst_ratio": max(ratios) if ratios else 1.0,
        "mean_ratio": statistics.fmean(ratios) if ratios else 1.0,
        "within_2pct": within,
        "worst_seed": worst_seed,
    }
