"""``meshai bench recovery``: how long a swarm takes to serve again after a node of its plan dies.

Each round is a full ``meshai sim`` (real node processes, mutual TLS, a signed package): a stream of
requests, the node of stage 1 killed (SIGKILL) after ``kill_at`` results, recovery measured from the
kill to the first result of the new plan.  The baseline, measured in the same round, is the time the
first deployment of the plan took: a recovery that costs less than deploying afresh is the point of
replanning only what changed.  Every round also checks exactly-once delivery and exact outputs.
Composition layer.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from meshai.errors import ConfigError, check_min
from meshai.faults import Fault
from meshai.sim import SimOptions, run_sim_blocking


def bench_recovery(
    kills: int = 10,
    model: str = "squeezenet",
    nodes: int = 4,
    stages: int = 3,
    requests: int = 120,
    kill_at: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """``kills`` rounds of stream, kill, recover; the distribution of recovery times, JSON-ready."""
    check_min("--kills", kills, 1)
    check_min("--nodes", nodes, 2)
    if not 0 < kill_at < requests:
        raise ConfigError(
            f"the kill must come during the stream: 0 < kill_at ({kill_at}) < requests ({requests})"
        )
    rows: list[dict[str, Any]] = []
    for i in range(kills):
        opts = SimOptions(
            model=model,
            nodes=nodes,
            stages=stages,
            requests=requests,
            seed=seed + i,
            faults=(Fault("kill", "stage:1", kill_at),),
        )
        rep = run_sim_blocking(opts)
        rec = rep["recoveries"][0] if rep["recoveries"] else {}
        row = {
            "round": i + 1,
            "killed": rep["faults"][0]["node"],
            "recovery_s": rep["recovery_s"],
            "redeploy_s": rec.get("redeploy_s"),
            "deploy_s": rep["deploy_s"],
            "replayed": rep["replayed"],
            "lost": rep["lost"],
            "duplicated": rep["duplicated"],
            "max_abs_diff": rep["max_abs_diff"],
            "stages_after": rep["final_plan"],
        }
        rows.append(row)
        print(
            f"meshai bench recovery: round {i + 1}/{kills}: killed {row['killed']}, recovered in "
            f"{row['recovery_s']} s, {row['replayed']} replayed, {row['lost']} lost",
            file=sys.stderr,
            flush=True,
        )
    times = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
    deploys = [r["deploy_s"] for r in rows]
    arr = np.asarray(times) if times else np.zeros(1)
    summary = {
        "min_s": round(float(arr.min()), 4),
        "p50_s": round(float(np.percentile(arr, 50)), 4),
        "p95_s": round(float(np.percentile(arr, 95)), 4),
        "max_s": round(float(arr.max()), 4),
        "mean_s": round(float(arr.mean()), 4),
    }
    base = float(np.median(deploys))
    return {
        "model": model,
        "nodes": nodes,
        "stages": stages,
        "requests": requests,
        "kill_at": kill_at,
        "kills": kills,
        "recovered": len(times),
        "recovery": summary,
        "baseline_deploy_s": round(base, 4),
        "recovery_vs_deploy": round(summary["p50_s"] / base, 3) if base > 0 else None,
        "deadline_s": 3.0,
        "within_deadline": sum(1 for t in times if t <= 3.0),
        "lost": sum(r["lost"] for r in rows),
        "duplicated": sum(r["duplicated"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "rows": rows,
    }


def recovery_table(res: dict[str, Any]) -> str:
    """The readable form: one row per kill, then the distribution and the baseline."""
    from meshai.tables import format_table

    rows = [
        [r["round"], r["killed"], r["recovery_s"], r["redeploy_s"], r["deploy_s"], r["replayed"], r["lost"]]
        for r in res["rows"]
    ]
    table = format_table(
        ["round", "killed", "recovery s", "redeploy s", "first deploy s", "replayed", "lost"],
        rows,
        right=(0, 2, 3, 4, 5, 6),
    )
    s = res["recovery"]
    return (
        f"{table}\n{res['model']}, {res['nodes']} nodes, {res['stages']} stages, kill of stage 1 after "
        f"{res['kill_at']} of {res['requests']} requests: recovery p50 {s['p50_s']} s, p95 {s['p95_s']} s, "
        f"max {s['max_s']} s ({res['within_deadline']}/{res['kills']} within {res['deadline_s']:g} s); "
        f"p50 recovery / first deployment {res['recovery_vs_deploy']}; lost {res['lost']}, "
        f"duplicated {res['duplicated']}"
    )
