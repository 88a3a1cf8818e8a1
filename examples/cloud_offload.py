"""Cloud offload: a live camera stream on the swarm while a bulk re-scoring job runs on Ray.

Two paced robot nodes (real ``meshai node`` processes: mDNS, mutual TLS, a signed and encrypted
package) serve a live stream of frames arriving at a fixed rate.  An embedded Ray (127.0.0.1 only,
two CPUs) stands in for the cloud.  The offload policy (``scheduler.offload``, a pure function)
decides every unit of work: each live frame stays on the swarm unless the swarm's queue has reached
the threshold (then it overflows to Ray), and the archive re-scoring job goes to Ray as one bulk
batch unless the uplink is too slow to ship it.  Both run at the same time.  Every result, live or
bulk, is checked against the whole model run by onnxruntime here.  Needs the ``ray`` extra.

    .venv/bin/python examples/cloud_offload.py [--live N] [--rate R] [--archive N] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

# examples/_common.py: the plumbing the examples share (node processes, command line, PNG, printing)
from _common import add_output_flags, local_swarm, run_and_report, verdict

from meshai.argtypes import positive_int
from meshai.cnn import small_cnn
from meshai.errors import MeshaiError
from meshai.overflow import OverflowRouter
from meshai.planning import load_for_planning
from meshai.tables import format_table
from meshai.tensors import max_abs_diff
from nodes.executor import StageSession
from scheduler.offload import OffloadPolicy, WorkState, decide
from scheduler.ray_backend import RayBackend

NODES = {"robot0": "npu", "robot1": "npu"}
T = TypeVar("T")
TOL = 1e-4


def frames(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` camera frames for the CNN (standard-normal 3×32×32 images)."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


async def run(
    live_n: int, rate: float, archive_n: int, threshold: int, uplink_mbit: float, out: Path
) -> dict[str, Any]:
    """Ray first, then the swarm; the live stream and the bulk job at once; then the checks."""
    model_path = out / "camera_cnn.onnx"
    onnx.save(small_cnn(), str(model_path))
    loaded = load_for_planning(str(model_path))
    live, archive = frames(live_n, seed=1), frames(archive_n, seed=2)
    policy = OffloadPolicy(queue_threshold=threshold)
    bulk = WorkState(  # the archive as one job, and the uplink it would travel over to the cloud
        queue_depth=0,
        in_flight=0,
        swarm_p95_ms=None,
        batch_size=archive_n,
        request_bytes=sum(f["image"].nbytes for f in archive),
        link_bandwidth_bps=uplink_mbit * 1e6,
        link_latency_s=0.02,
    )
    bulk_decision = decide(policy, bulk)
    # Ray before the node processes: its start-up blocks for seconds, which live channels must not wait on
    with RayBackend(num_cpus=2, actors=2) as backend:
        on_ray = backend.load(loaded.model.SerializeToString())  # the whole model, once, on 2 actors
        async with local_swarm(NODES, model_path, loaded.name) as (mesh, package):
            plan, _ = mesh.plan(loaded, objective="throughput")
            async with mesh.deploy(plan, loaded, package=package) as pipe:
                bulk_job: asyncio.Task[tuple[list[Any], float]]
                if bulk_decision.target == "ray":  # blocking Ray calls: in a thread, off the event loop
                    bulk_job = asyncio.create_task(timed(asyncio.to_thread(on_ray.run_batch, archive, 32)))
                else:
                    bulk_job = asyncio.create_task(timed(collect(pipe.stream(archive))))
                router = OverflowRouter(pipe, on_ray, policy)
                report, live_s = await timed(router.run(live, rate=rate))
                bulk_out, bulk_s = await bulk_job
                example = router.state(live[0])
    whole = StageSession(loaded.model, name="whole model")
    worst = 0.0
    for got, req in [*zip(report.results, live, strict=True), *zip(bulk_out, archive, strict=True)]:
        if isinstance(got, BaseException):
            raise MeshaiError(f"a request failed: {got}")
        worst = max(worst, max_abs_diff(got, whole.run(req)))
    # the policy's own words for each rule it used: the reasons it gives at the queue depths that decide
    reasons = {
        "local": decide(policy, example).reason,
        "overflow": decide(
            policy, dataclasses.replace(example, queue_depth=threshold, in_flight=threshold)
        ).reason,
        bulk_decision.rule or "?": bulk_decision.reason,
    }
    off = report.to_dict()
    return {
        "plan": plan.to_dict(),
        "policy": {
            "queue_threshold": threshold,
            "bulk_batch": policy.bulk_batch,
            "max_link_s": policy.max_link_s,
        },
        "live": {
            "requests": live_n,
            "rate_rps": rate,
            "swarm": off["swarm"],
            "ray": off["ray"],
            "completed": off["completed"],
            "rules": off["rules"],
            "latency_ms": off["latency_ms"],
            "throughput_rps": report.throughput_rps(),
            "seconds": round(live_s, 3),
        },
        "bulk": {
            "requests": archive_n,
            "target": bulk_decision.target,
            "rule": bulk_decision.rule,
            "reason": bulk_decision.reason,
            "seconds": round(bulk_s, 3),
            "throughput_rps": round(archive_n / bulk_s, 3),
        },
        "reasons": reasons,
        "decisions": off["swarm"] + off["ray"] + 1,  # one per live frame, one for the bulk job
        "max_abs_diff": worst,
        "outputs_match": worst <= TOL,
    }


async def collect(stream: AsyncIterator[T]) -> list[T]:
    """Every item of an async iterator, in order."""
    return [x async for x in stream]


async def timed(work: Awaitable[T]) -> tuple[T, float]:
    """The result of ``work`` and the seconds it took."""
    t0 = time.perf_counter()
    out = await work
    return out, time.perf_counter() - t0


def report_table(rep: dict[str, Any]) -> str:
    """Rule counts (where each unit of work went, and why), then latency per side."""
    live, bulk = rep["live"], rep["bulk"]
    rows = [
        [rule, "ray" if rule == "overflow" else "swarm", n, rep["reasons"][rule]]
        for rule, n in sorted(live["rules"].items())
    ]
    rows.append([bulk["rule"], bulk["target"], f"{bulk['requests']} (1 job)", bulk["reason"]])
    lat = live["latency_ms"]
    stages = " → ".join(f"{s['node']} ({len(s['ops'])} ops)" for s in rep["plan"]["stages"])
    lines = [
        format_table(["rule", "went to", "requests", "the policy's reason"], rows, right=(2,)),
        "",
        f"live: {live['requests']} frames at {live['rate_rps']:g}/s → {live['swarm']} on the swarm, {live['ray']} on Ray "
        f"(queue threshold {rep['policy']['queue_threshold']}); {live['throughput_rps']:.1f} results/s; "
        f"p50 swarm {lat['swarm']['p50']:.1f} ms, Ray {lat['ray']['p50']:.1f} ms",
        f"bulk: {bulk['requests']} archived frames re-scored on {bulk['target']} in {bulk['seconds']:.2f} s "
        f"({bulk['throughput_rps']:.0f}/s), alongside the live stream ({live['seconds']:.2f} s)",
        f"swarm plan: {stages}; "
        f"every result vs the whole model (onnxruntime): max abs diff {rep['max_abs_diff']:.3g}, "
        f"{verdict(rep['outputs_match'])}",
    ]
    return "\n".join(lines)


def plot(rep: dict[str, Any], plt: Any) -> Any:
    """Where the work went (per rule) and the live latency on each side."""
    live, bulk = rep["live"], rep["bulk"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    labels = [f"live · {r}" for r in live["rules"]] + [f"bulk · {bulk['rule']}"]
    counts = [*live["rules"].values(), bulk["requests"]]
    colors = ["#DD8452" if r == "overflow" else "#4C72B0" for r in live["rules"]]
    colors.append("#DD8452" if bulk["target"] == "ray" else "#4C72B0")
    ax1.barh(labels, counts, color=colors)
    ax1.set_xlabel("requests (orange: Ray, blue: swarm)")
    ax1.set_title("the offload policy's decisions")
    sides = ["swarm", "ray"]
    p = [[live["latency_ms"][s][q] for q in ("p50", "p95", "p99")] for s in sides]
    x = np.arange(3)
    for i, (side, values) in enumerate(zip(sides, p, strict=True)):
        ax2.bar(x + (i - 0.5) * 0.4, values, 0.4, label=f"{side} ({live[side]} frames)")
    ax2.set_xticks(x, ["p50", "p95", "p99"])
    ax2.set_ylabel("ms")
    ax2.set_title(f"live latency at {live['rate_rps']:g} frames/s")
    ax2.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--live", type=positive_int, default=400, help="live frames (default 400)")
    p.add_argument("--rate", type=float, default=250.0, help="live frames per second (default 250)")
    p.add_argument(
        "--archive", type=positive_int, default=1000, help="archived frames to re-score (default 1000)"
    )
    p.add_argument(
        "--threshold",
        type=positive_int,
        default=4,
        help="swarm queue depth that overflows to Ray (default 4)",
    )
    p.add_argument(
        "--uplink-mbit", type=float, default=100.0, help="uplink to the cloud in Mbit/s (default 100)"
    )
    add_output_flags(p, "cloud_offload", quick="120 live, 300 archived")
    args = p.parse_args(argv)
    if not (args.rate > 0 and args.uplink_mbit > 0):
        p.error("--rate and --uplink-mbit must be positive numbers")
    live, archive = (120, 300) if args.quick else (args.live, args.archive)
    # a MeshaiError is one line, e.g. Ray missing: "the Ray backend needs Ray: pip install 'meshai[ray]'"
    work = run(live, args.rate, archive, args.threshold, args.uplink_mbit, args.out)
    return run_and_report("cloud_offload", args, work, plot, report_table)


if __name__ == "__main__":
    sys.exit(main())
