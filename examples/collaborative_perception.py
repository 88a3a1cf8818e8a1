"""Collaborative perception: three robot cameras and one fusion head, run across a swarm.

Each robot's camera frame is pinned to that robot (the raw frame never leaves it): its backbone
runs there and only a small feature vector crosses the network.  The fusion head goes where the
planner puts it (here: the strongest node).  Four real ``meshai node`` processes on loopback (mDNS,
mutual TLS, a signed and encrypted model package), paced to their profiles; every fused result is
checked against the whole model run by onnxruntime in this process.

    .venv/bin/python examples/collaborative_perception.py [--frames N] [--fps F] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# examples/_common.py: the plumbing the examples share (node processes, command line, PNG, printing)
from _common import add_output_flags, local_swarm, run_and_report, verdict
from onnx import TensorProto, helper, numpy_helper

from meshai.argtypes import positive_int
from meshai.errors import MeshaiError
from meshai.planning import load_for_planning
from meshai.tables import format_table, human_bytes
from meshai.tensors import max_abs_diff
from nodes.executor import StageSession

ROBOTS = {"robot0": "npu", "robot1": "cpu", "robot2": "cpu"}  # one camera each
HUB = {"hub": "gpu"}  # a stronger node nearby: where fusion should land
SIZE = 64  # camera frames are 3×SIZE×SIZE
TOL = 1e-4


def perception_model(
    cameras: int = 3, features: int = 64, hidden: int = 1024, seed: int = 0
) -> onnx.ModelProto:
    """Inputs ``cam0``… (1×3×SIZE×SIZE each) → per-camera backbone (3× Conv+Relu+MaxPool, global
    pooling) → Concat → fusion head (Gemm+Relu, Gemm+Relu, Gemm) → ``scores`` (1×10).
    He-initialised random weights: real numbers, so every comparison means something."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    feats = []
    for c in range(cameras):
        x = f"cam{c}"
        for k, (cin, cout) in enumerate(((3, 16), (16, 32), (32, features))):
            w = weight(f"cam{c}_conv{k}.w", (cout, cin, 3, 3), cin * 9)
            b = weight(f"cam{c}_conv{k}.b", (cout,), 50)
            x = node("Conv", [x, w, b], f"cam{c}_conv{k}", pads=[1, 1, 1, 1])
            x = node("Relu", [x], f"cam{c}_relu{k}")
            x = node("MaxPool", [x], f"cam{c}_pool{k}", kernel_shape=[2, 2], strides=[2, 2])
        x = node("GlobalAveragePool", [x], f"cam{c}_gap")
        feats.append(node("Flatten", [x], f"cam{c}_features", axis=1))
    x = node("Concat", feats, "fusion_concat", axis=1)
    dims = [cameras * features, hidden, hidden, 10]
    for k in range(3):
        w = weight(f"fusion_fc{k}.w", (dims[k + 1], dims[k]), dims[k])
        b = weight(f"fusion_fc{k}.b", (dims[k + 1],), 50)
        x = node("Gemm", [x, w, b], "scores" if k == 2 else f"fusion_fc{k}", transB=1)
        if k < 2:
            x = node("Relu", [x], f"fusion_relu{k}")
    graph = helper.make_graph(
        nodes,
        "collaborative_perception",
        [
            helper.make_tensor_value_info(f"cam{c}", TensorProto.FLOAT, [1, 3, SIZE, SIZE])
            for c in range(cameras)
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


async def camera_feed(
    requests: list[dict[str, np.ndarray]], fps: float
) -> AsyncIterator[dict[str, np.ndarray]]:
    """The three cameras' frames as they are captured: one triple every 1/``fps`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, frame in enumerate(requests):
        await asyncio.sleep(max(0.0, start + i / fps - loop.time()))
        yield frame


async def run(frames: int, fps: float, out: Path) -> dict[str, Any]:
    """Start the swarm, plan with pins, stream ``frames`` frame triples at ``fps``, collect the figures."""
    model_path = out / "perception.onnx"
    onnx.save(perception_model(), str(model_path))
    loaded = load_for_planning(str(model_path))
    rng = np.random.default_rng(1)
    requests = [
        {f"cam{c}": rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32) for c in range(len(ROBOTS))}
        for _ in range(frames)
    ]
    nodes = {**ROBOTS, **HUB}
    pins = {f"cam{c}": robot for c, robot in enumerate(ROBOTS)}
    # four node processes on loopback; the package: the model, signed and encrypted for them
    async with local_swarm(nodes, model_path, loaded.name) as (mesh, package):
        plan, _ = mesh.plan(loaded, pins=pins)
        async with mesh.deploy(plan, loaded, package=package) as pipe:
            results = [r async for r in pipe.stream(camera_feed(requests, fps))]
            events = []
            for name in nodes:
                reply = await mesh.pool.control(name, "events", {"deployment": pipe.name})
                events += reply.body["events"]
            sent = {name: int((await mesh.status(name))["bytes_sent"]) for name in nodes}
            latency = pipe.stats.latency_ms()
            throughput = pipe.stats.throughput_rps()
        strongest = max(mesh.peers().values(), key=lambda p: p.capability.profile.flops.get("fp32", 0))
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise MeshaiError(f"{len(failed)} of {frames} frames failed; first: {failed[0]}")
    outputs = [r for r in results if not isinstance(r, BaseException)]
    whole = StageSession(loaded.model, name="whole model")  # the reference: the whole model, here
    worst = max(max_abs_diff(r, whole.run(q)) for r, q in zip(outputs, requests, strict=True))

    stage_node = {s.id: s.node for s in plan.stages}
    fusion = next(s.node for s in plan.stages if "fusion_concat" in s.ops)
    by_request: dict[int, dict[str, dict[str, float]]] = {}
    for e in events:
        by_request.setdefault(e["request"], {})[stage_node[e["stage"]]] = e
    robots: dict[str, Any] = {}
    raw_frame = requests[0]["cam0"].nbytes
    for c, robot in enumerate(ROBOTS):
        stage = plan.stage_of(robot)
        seen = [e for e in by_request.values() if robot in e and fusion in e]
        # from the moment the frame is on the robot to the fused result leaving the fusion node
        to_fused = [(e[fusion]["end"] - e[robot]["start"]) * 1e3 for e in seen]
        backbone = [op.name for op in loaded.graph.ops if op.name.startswith(f"cam{c}_")]
        robots[robot] = {
            "profile": ROBOTS[robot],
            "camera": f"cam{c}",
            "backbone_here": all(op in stage.ops for op in backbone),
            "stage_ms_p50": round(
                float(np.median([(e[robot]["compute_end"] - e[robot]["start"]) * 1e3 for e in seen])), 3
            ),
            "frame_to_fused_ms_p50": round(float(np.percentile(to_fused, 50)), 3),
            "frame_to_fused_ms_p95": round(float(np.percentile(to_fused, 95)), 3),
            "bytes_sent_per_frame": sent[robot] / frames,
            "raw_frame_bytes": raw_frame,
        }
    crossed = sum(sent[r] for r in ROBOTS)  # features only: the entry stands in for the cameras
    raw = raw_frame * len(ROBOTS) * frames  # shipping every camera's frames to one place instead
    return {
        "frames": frames,
        "fps": fps,
        "ok": len(outputs),
        "max_abs_diff": worst,
        "outputs_match": worst <= TOL,
        "plan": plan.to_dict(),
        "pins": pins,
        "pins_honoured": all(r["backbone_here"] for r in robots.values()),
        "fusion_node": fusion,
        "strongest_node": strongest.name,
        "fusion_on_strongest": fusion == strongest.name,
        "robots": robots,
        "bytes_sent": {
            "features": crossed,
            "raw_frames": raw,
            "saved_pct": round(100 * (1 - crossed / raw), 3),
        },
        "latency_ms": latency,
        "throughput_rps": throughput,
    }


def report_table(rep: dict[str, Any]) -> str:
    """The plan, then one row per robot, then the bandwidth."""
    plan = format_table(
        ["stage", "node", "accel", "ops", "predicted ms", "bytes out"],
        [
            [
                s["id"],
                s["node"],
                s["accelerator"],
                f"{len(s['ops'])} ({s['ops'][0]} … {s['ops'][-1]})",
                s["predicted_ms"],
                human_bytes(s["bytes_out"]),
            ]
            for s in rep["plan"]["stages"]
        ],
        right=(4,),
    )
    robots = format_table(
        ["robot", "profile", "camera", "stage ms p50", "frame→fused p50 / p95 ms", "sent/frame", "raw frame"],
        [
            [
                name,
                r["profile"],
                r["camera"],
                r["stage_ms_p50"],
                f"{r['frame_to_fused_ms_p50']:.1f} / {r['frame_to_fused_ms_p95']:.1f}",
                human_bytes(r["bytes_sent_per_frame"]),
                human_bytes(r["raw_frame_bytes"]),
            ]
            for name, r in rep["robots"].items()
        ],
        right=(3,),
    )
    b = rep["bytes_sent"]
    lines = [
        plan,
        "",
        robots,
        "",
        f"pins honoured (each backbone on its robot): {'yes' if rep['pins_honoured'] else 'NO'}; fusion head on "
        f"{rep['fusion_node']} ({'the strongest node' if rep['fusion_on_strongest'] else 'NOT the strongest node'})",
        f"bytes sent: {human_bytes(b['features'])} of features vs {human_bytes(b['raw_frames'])} of raw frames "
        f"to one place ({b['saved_pct']:.2f} % saved)",
        f"{rep['ok']} fused results, max abs diff vs the whole model (onnxruntime) {rep['max_abs_diff']:.3g}: "
        f"{verdict(rep['outputs_match'])}; end-to-end p50 {rep['latency_ms']['p50']:.1f} ms, "
        f"{rep['throughput_rps']:.1f} frames/s",
    ]
    return "\n".join(lines)


def plot(rep: dict[str, Any], plt: Any) -> Any:
    """Per-robot latency and bytes sent vs raw frames, side by side."""
    names = list(rep["robots"])
    r = [rep["robots"][n] for n in names]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax1.bar(x - 0.2, [v["stage_ms_p50"] for v in r], 0.4, label="robot stage (p50)")
    ax1.bar(x + 0.2, [v["frame_to_fused_ms_p50"] for v in r], 0.4, label="frame → fused result (p50)")
    ax1.set_xticks(x, [f"{n}\n{v['profile']}" for n, v in zip(names, r, strict=True)])
    ax1.set_ylabel("ms")
    ax1.set_title(f"per-robot latency (fusion on {rep['fusion_node']})")
    ax1.legend(fontsize=8)
    ax2.bar(x - 0.2, [v["raw_frame_bytes"] for v in r], 0.4, label="raw frame", color="#C44E52")
    ax2.bar(x + 0.2, [v["bytes_sent_per_frame"] for v in r], 0.4, label="sent by meshai", color="#55A868")
    ax2.set_yscale("log")
    ax2.set_ylim(10, 30 * max(v["raw_frame_bytes"] for v in r))  # room for the legend
    ax2.set_xticks(x, names)
    ax2.set_ylabel("bytes per frame (log)")
    ax2.set_title(f"bandwidth: {rep['bytes_sent']['saved_pct']:.2f} % saved")
    ax2.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=positive_int, default=200, help="frame triples to stream (default 200)")
    p.add_argument("--fps", type=float, default=30.0, help="camera frame rate (default 30)")
    add_output_flags(p, "collaborative_perception", quick="40 frames")
    args = p.parse_args(argv)
    if not args.fps > 0:
        p.error("--fps must be a positive number of frames per second")
    frames = 40 if args.quick else args.frames
    work = run(frames, args.fps, args.out)
    return run_and_report("collaborative_perception", args, work, plot, report_table)


if __name__ == "__main__":
    sys.exit(main())
