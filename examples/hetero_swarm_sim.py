"""Heterogeneous swarm: the latency and throughput objectives side by side, predicted vs measured.

Five real node processes on loopback, one of each device class (cpu, gpu, npu, tpu, mcu), each paced
to its profile and behind an emulated link (meshai's link emulator: 5 ms delay, 100 Mbit/s by
default).  A camera CNN (real random weights) reads frames born on the npu robot (``n2``, pinned).
The same model is planned twice — objective ``latency`` (one request's end-to-end time, as in
Neurosurgeon) and ``throughput`` (the pipeline's bottleneck, as in PipeEdge) — and each plan is run
twice by ``meshai.sim.run_sim``: one request at a time for latency, 8 in flight for throughput.
Every result is checked against the whole model run by onnxruntime.  The model is fp32, so the
int8-only tpu and mcu take no stage (quantize_and_deploy.py gives one a stage in int8).

    .venv/bin/python examples/hetero_swarm_sim.py [--requests N] [--link SPEC] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# examples/_common.py: the plumbing the examples share (node processes, command line, PNG, printing)
from _common import add_output_flags, run_and_report, verdict
from onnx import TensorProto, helper, numpy_helper

from meshai.argtypes import positive_int
from meshai.capabilities import BUILTIN_PROFILES
from meshai.sim import SimOptions, run_sim
from meshai.tables import format_table

PROFILES = ("cpu", "gpu", "npu", "tpu", "mcu")
NODES = {f"n{i}": p for i, p in enumerate(PROFILES)}  # run_sim names nodes n0, n1, … in profile order
CAMERA_NODE = "n2"  # the npu robot: frames are born there
WINDOWS = {"latency": 1, "throughput": 8}  # requests in flight when measuring each figure
TOL = 1e-4


def camera_cnn(seed: int = 0) -> onnx.ModelProto:
    """``image`` (1×3×32×32) → six Conv+Relu (64, 64, 128, 128, 256, 256 channels; stride 2 at the
    third and fifth) → global pooling → Gemm → ``logits`` (1×10); about 0.3 GFLOP a frame."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x, cin = "image", 3
    for k, (cout, stride) in enumerate(((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1))):
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"conv{k}.w"))
        nodes.append(
            helper.make_node(
                "Conv", [x, f"conv{k}.w"], [f"conv{k}"], name=f"conv{k}", pads=[1] * 4, strides=[stride] * 2
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"], name=f"relu{k}"))
        x, cin = f"relu{k}", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten"))
    inits.append(numpy_helper.from_array((rng.standard_normal((10, cin)) * 0.1).astype(np.float32), "fc.w"))
    nodes.append(helper.make_node("Gemm", ["features", "fc.w"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes,
        "camera_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def idle_reason(profile: str) -> str:
    """Why a node of this profile may take no stage of an fp32 plan."""
    if "fp32" not in BUILTIN_PROFILES[profile].flops:
        return f"{profile}: int8 only, and the model is fp32"
    return f"{profile}: not needed by this plan"


async def run(requests: int, link: str, out: Path) -> dict[str, Any]:
    """Plan and run the model under both objectives, each at 1 and at 8 requests in flight."""
    model = out / "camera_cnn.onnx"
    onnx.save(camera_cnn(), str(model))
    rows: dict[str, Any] = {}
    for objective in ("latency", "throughput"):
        runs = {}
        for measure, window in WINDOWS.items():
            opts = SimOptions(
                model=str(model),
                nodes=len(PROFILES),
                profiles=PROFILES,
                pins={"image": CAMERA_NODE},
                objective=objective,
                pace=True,  # each stage takes the time its device's profile predicts (or longer)
                link=link,  # every node's link shaped by meshai's emulator, and declared to the planner
                window=window,
                requests=requests if window == 1 else 2 * requests,
            )
            runs[measure] = await run_sim(opts)
        plan = runs["latency"]["plan"]
        pred = plan["predicted"]
        rows[objective] = {
            "stages": [
                {
                    "node": s["node"],
                    "accelerator": s["accelerator"],
                    "ops": len(s["ops"]),
                    "bytes_out": s["bytes_out"],
                }
                for s in plan["stages"]
            ],
            "same_plan_both_runs": runs["throughput"]["plan"]["stages"] == plan["stages"],
            "predicted": {
                "latency_ms": round(pred["latency_ms"], 3),
                "throughput_rps": round(1e3 / pred["bottleneck_ms"], 3),
            },
            "measured": {
                "latency_ms": runs["latency"]["latency_ms"],  # one request at a time
                "loaded_latency_ms": runs["throughput"]["latency_ms"],  # 8 in flight
                "throughput_rps": runs["throughput"]["throughput_rps"],
            },
            "requests": sum(r["requests"] for r in runs.values()),
            "ok": sum(r["ok"] for r in runs.values()),
            "max_abs_diff": max(r["max_abs_diff"] for r in runs.values()),
            "idle": {
                n: idle_reason(p) for n, p in NODES.items() if n not in {s["node"] for s in plan["stages"]}
            },
        }
    return {
        "model": "camera_cnn",
        "nodes": NODES,
        "pins": {"image": CAMERA_NODE},
        "link": link,
        "objectives": rows,
        "outputs_match": all(r["max_abs_diff"] <= TOL and r["ok"] == r["requests"] for r in rows.values()),
    }


def report_table(rep: dict[str, Any]) -> str:
    """One row per objective: the plan, latency and throughput, predicted and measured."""
    rows = []
    for obj, r in rep["objectives"].items():
        stages = " → ".join(f"{s['node']} {s['accelerator']} ({s['ops']} ops)" for s in r["stages"])
        lat, m = r["measured"]["latency_ms"], r["measured"]
        rows.append(
            [
                obj,
                stages,
                f"{r['predicted']['latency_ms']:.1f}",
                f"{lat['p50']:.1f} / {lat['p95']:.1f}",
                f"{r['predicted']['throughput_rps']:.1f}",
                f"{m['throughput_rps']:.1f}",
                f"{r['max_abs_diff']:.3g}",
            ]
        )
    table = format_table(
        ["objective", "stages", "pred ms", "p50 / p95 ms", "pred req/s", "req/s", "max abs diff"],
        rows,
        right=(2, 3, 4, 5, 6),
    )
    lines = [
        table,
        f"nodes {', '.join(f'{n}={p}' for n, p in rep['nodes'].items())}; frames born on {rep['pins']['image']}; "
        f"links {rep['link']}",
        "latency measured one request at a time, throughput with 8 in flight; outputs vs the whole model "
        f"(onnxruntime): {verdict(rep['outputs_match'])}",
    ]
    for obj, r in rep["objectives"].items():
        lines.append(f"idle under {obj}: " + "; ".join(f"{n} ({why})" for n, why in r["idle"].items()))
    return "\n".join(lines)


def plot(rep: dict[str, Any], plt: Any) -> Any:
    """Two bar groups: latency (predicted, p50, p95) and throughput (predicted, measured) per objective."""
    objs = list(rep["objectives"])
    r = [rep["objectives"][o] for o in objs]
    x = np.arange(len(objs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for i, (label, values) in enumerate(
        [
            ("predicted", [v["predicted"]["latency_ms"] for v in r]),
            ("measured p50", [v["measured"]["latency_ms"]["p50"] for v in r]),
            ("measured p95", [v["measured"]["latency_ms"]["p95"] for v in r]),
        ]
    ):
        ax1.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
    ax1.set_xticks(x, [f"objective\n{o}" for o in objs])
    ax1.set_ylabel("ms (one request at a time)")
    ax1.set_title("latency")
    ax1.legend(fontsize=8)
    ax2.bar(x - 0.2, [v["predicted"]["throughput_rps"] for v in r], 0.4, label="predicted")
    ax2.bar(x + 0.2, [v["measured"]["throughput_rps"] for v in r], 0.4, label="measured")
    ax2.set_xticks(x, [f"objective\n{o}" for o in objs])
    ax2.set_ylabel("requests/s (8 in flight)")
    ax2.set_title("throughput")
    ax2.legend(fontsize=8)
    fig.suptitle(f"camera CNN on a paced cpu/gpu/npu/tpu/mcu swarm, links {rep['link']}")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--requests",
        type=positive_int,
        default=100,
        help="requests per latency run; throughput runs twice as many",
    )
    p.add_argument("--link", default="delay=5ms,rate=100mbit", help="every node's link (tc-like spec)")
    add_output_flags(p, "hetero_swarm_sim", quick="25 requests", tables="a table")
    args = p.parse_args(argv)
    work = run(25 if args.quick else args.requests, args.link, args.out)
    return run_and_report("hetero_swarm_sim", args, work, plot, report_table)


if __name__ == "__main__":
    sys.exit(main())
