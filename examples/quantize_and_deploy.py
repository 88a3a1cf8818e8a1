"""Quantize and deploy: train a digits classifier, calibrate int8, run it on an int8-only device.

The digits MLP (scikit-learn's bundled 8×8 images, nothing downloaded) is trained here, calibrated
on 200 training images and measured in int8.  The planner then chooses placement and precision
together for a swarm of a Coral-class smart camera (``tpu``: int8 only; the images are born there)
and a Raspberry-Pi-class hub (``cpu``), within an accuracy budget.  Two real node processes (mDNS,
mutual TLS, the model and its calibration as one signed, encrypted package) run the stages; the
held-out images are streamed through them and scored against their labels.  Every result is checked
against the whole model with the same ops quantized, run by onnxruntime here.

    .venv/bin/python examples/quantize_and_deploy.py [--samples N] [--budget PTS] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import onnx

# examples/_common.py: the plumbing the examples share (node processes, command line, PNG, printing)
from _common import add_output_flags, local_swarm, run_and_report, verdict

from meshai.argtypes import positive_int
from meshai.capabilities import BUILTIN_PROFILES
from meshai.digits import train_digits
from meshai.errors import MeshaiError
from meshai.planning import load_for_planning, prepare_quantization
from meshai.tables import format_table, human_bytes
from meshai.tensors import max_abs_diff
from scheduler.quantize import CALIBRATION_FILE, accuracy_pts, quantize, run_model

NODES = {"camera": "tpu", "hub": "cpu"}  # the camera is int8-only
TOL = 1e-4


async def run(samples: int | None, budget: float, out: Path) -> dict[str, Any]:
    """Train, calibrate, plan, deploy, stream the evaluation images; return the figures."""
    case = train_digits(out / "digits")  # digits.onnx, calibration.npz, eval.npz, labels.npz
    loaded = load_for_planning(str(case.model))
    # calibrate once over the whole fp32 model, then measure what int8 costs on the eval images
    loaded, quant = prepare_quantization(loaded, str(case.calibration), str(case.eval), str(case.labels))
    int8_path = out / "digits.int8.onnx"
    onnx.save(quantize(loaded.model, quant.calibration), str(int8_path))
    requests = quant.samples[:samples]
    assert quant.labels is not None
    labels = quant.labels[: len(requests)]

    # nodes quantize their int8 stages themselves, from the calibration shipped in the package
    calibration = {CALIBRATION_FILE: quant.calibration.to_bytes()}
    async with local_swarm(NODES, case.model, loaded.name, extra=calibration) as (mesh, package):
        plan, _ = mesh.plan(
            loaded,
            stages=2,  # two stages, so that activations cross a link
            pins={"pixels": "camera"},
            quantization=quant,
            max_accuracy_drop=budget,
        )
        async with mesh.deploy(plan, loaded, package=package) as pipe:
            results = [r async for r in pipe.stream(requests)]
            sent = {n: int((await mesh.status(n))["bytes_sent"]) for n in NODES}
            latency, throughput = pipe.stats.latency_ms(), pipe.stats.throughput_rps()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise MeshaiError(f"{len(failed)} of {len(requests)} requests failed; first: {failed[0]}")
    outputs = [r for r in results if not isinstance(r, BaseException)]

    # references, run here by onnxruntime: the whole model with the plan's int8 ops quantized (what the
    # swarm must compute exactly), and the whole fp32 model (what int8 approximates)
    int8_ops = [op for s in plan.stages if s.precision == "int8" for op in s.ops]
    planned = run_model(quantize(loaded.model, quant.calibration, ops=int8_ops), requests)
    fp32 = quant.reference[: len(requests)]
    worst = max(max_abs_diff(r, w) for r, w in zip(outputs, planned, strict=True))
    fp32_acc, swarm_acc = accuracy_pts(fp32, labels), accuracy_pts(outputs, labels)
    int8_only = next(n for n, prof in NODES.items() if "fp32" not in BUILTIN_PROFILES[prof].flops)
    return {
        "requests": len(requests),
        "ok": len(outputs),
        "max_abs_diff": worst,
        "outputs_match": worst <= TOL,
        "max_abs_diff_fp32": max(max_abs_diff(r, w) for r, w in zip(outputs, fp32, strict=True)),
        "plan": plan.to_dict(),
        "precisions": {s.node: s.precision for s in plan.stages},
        "int8_only_node": int8_only,
        "int8_on_int8_only_node": any(s.node == int8_only and s.precision == "int8" for s in plan.stages),
        "accuracy": {
            "fp32": round(fp32_acc, 4),
            "swarm": round(swarm_acc, 4),
            "delta_pts": round(fp32_acc - swarm_acc, 4),
            "budget_pts": budget,
            "planned_delta_pts": plan.predicted.accuracy_drop_pts,
            "labelled_samples": len(requests),
        },
        "sizes": {
            "fp32_bytes": case.model.stat().st_size,
            "int8_bytes": int8_path.stat().st_size,
            "ratio": round(case.model.stat().st_size / int8_path.stat().st_size, 3),
        },
        "bytes_sent_per_request": {n: b / len(requests) for n, b in sent.items()},
        "latency_ms": latency,
        "throughput_rps": throughput,
        "files": {"fp32": str(case.model), "int8": str(int8_path)},
    }


def report_table(rep: dict[str, Any]) -> str:
    """The plan with its precisions, then accuracy and sizes."""
    plan = format_table(
        ["stage", "node", "accel", "precision", "ops", "weights", "sent/request"],
        [
            [
                s["id"],
                s["node"],
                s["accelerator"],
                s["precision"],
                " ".join(s["ops"]),
                human_bytes(s["param_bytes"]),
                human_bytes(rep["bytes_sent_per_request"][s["node"]]),
            ]
            for s in rep["plan"]["stages"]
        ],
    )
    a, z = rep["accuracy"], rep["sizes"]
    rows = [
        [
            "accuracy fp32 → swarm",
            f"{a['fp32']:.2f} % → {a['swarm']:.2f} % on {a['labelled_samples']} held-out images",
        ],
        [
            "accuracy delta",
            f"{a['delta_pts']:.2f} pts (budget {a['budget_pts']:g}; the planner measured {a['planned_delta_pts']:g} on all eval images)",
        ],
        [
            "model size fp32 → int8",
            f"{human_bytes(z['fp32_bytes'])} → {human_bytes(z['int8_bytes'])} ({z['ratio']:.2f}×)",
        ],
        [
            "int8 on the int8-only node",
            f"{rep['int8_only_node']}: {'yes' if rep['int8_on_int8_only_node'] else 'NO'}",
        ],
        [
            "vs whole model, same ops int8",
            f"max abs diff {rep['max_abs_diff']:.3g}: {verdict(rep['outputs_match'])}",
        ],
        ["vs whole fp32 model", f"max abs diff {rep['max_abs_diff_fp32']:.3g} (int8 rounding)"],
        [
            "latency p50 / throughput",
            f"{rep['latency_ms']['p50']:.2f} ms / {rep['throughput_rps']:.1f} req/s",
        ],
    ]
    return plan + "\n\n" + format_table(["quantize and deploy", "result"], rows)


def plot(rep: dict[str, Any], plt: Any) -> Any:
    """Accuracy and model size, fp32 vs int8."""
    a, z = rep["accuracy"], rep["sizes"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    colors = ["#4C72B0", "#DD8452"]
    ax1.bar(["fp32 (whole model)", "swarm (int8)"], [a["fp32"], a["swarm"]], color=colors)
    ax1.set_ylim(max(0.0, min(a["fp32"], a["swarm"]) - 5), 100)
    ax1.set_ylabel("accuracy %")
    ax1.set_title(f"accuracy: Δ {a['delta_pts']:.2f} pts (budget {a['budget_pts']:g})")
    ax2.bar(["fp32", "int8"], [z["fp32_bytes"] / 1024, z["int8_bytes"] / 1024], color=colors)
    ax2.set_ylabel("KiB")
    ax2.set_title(f"model size: {z['ratio']:.2f}× smaller")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--samples", type=positive_int, default=None, help="held-out images to stream (default: all 539)"
    )
    p.add_argument(
        "--budget", type=float, default=1.0, help="accuracy the int8 stages may cost, in points (default 1)"
    )
    add_output_flags(p, "quantize_and_deploy", quick="150 images")
    args = p.parse_args(argv)
    work = run(150 if args.quick else args.samples, args.budget, args.out)
    return run_and_report("quantize_and_deploy", args, work, plot, report_table)


if __name__ == "__main__":
    sys.exit(main())
