"""``meshai bench runtimes``: each backend's per-stage latency on this machine.

Each model is planned into stages over identical cpu nodes; every stage is run on onnxruntime (the
baseline, measured in the same run), on ORT Mobile (its ``.ort`` conversion) and on LiteRT (its fp32
and fp16 ``.tflite`` conversions, where the conversion environment exists), one thread each, on the
stage's real inputs.  Rows: ``runtime``, ``model``, ``stage``, ``p50_ms``, ``p95_ms``, ``ratio`` (p50
over onnxruntime's for that stage), ``max_abs_diff`` against onnxruntime, or ``unavailable`` with why.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from meshai.errors import MeshaiError

__all__ = ["bench_runtimes", "runtimes_table"]

#: The small CNN with real weights, by this name (no file needed).
CNN = "cnn"


def _load(model: str, work: Path) -> Any:
    import onnx

    from meshai.cnn import small_cnn
    from meshai.planning import load_for_planning

    if model == CNN:
        path = work / "cnn.onnx"
        onnx.save(small_cnn(seed=3), str(path))
        return load_for_planning(str(path))
    return load_for_planning(model)


def _time(run: Callable[[], object], runs: int) -> tuple[float, float]:
    for _ in range(3):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.percentile(times, 50)), 4), round(float(np.percentile(times, 95)), 4)


def _backends(stage: Any, name: str) -> list[tuple[str, Callable[[], Any]]]:
    """(label, a function that builds the runner) for every backend to measure."""
    from meshai.artifacts import to_ort
    from nodes.executor import StageSession

    def ort_mobile() -> Any:
        return StageSession(to_ort(stage, name)[0], name=name, ort_format=True)

    def litert(precision: str) -> Callable[[], Any]:
        def build() -> Any:
            from meshai.litert_convert import to_tflite
            from nodes.executors.litert import LiteRtSession

            return LiteRtSession(to_tflite(stage, precision), stage, name=name)

        return build

    return [
        ("onnxruntime", lambda: StageSession(stage, name=name)),
        ("ort-mobile", ort_mobile),
        ("litert-fp32", litert("fp32")),
        ("litert-fp16", litert("fp16")),
    ]


def bench_runtimes(
    models: Sequence[str] = (CNN, "squeezenet"), stages: int = 3, runs: int = 50
) -> dict[str, Any]:
    """Per-stage latency of every backend for each model (see the module doc)."""
    from meshai.artifacts import stage_io
    from meshai.capabilities import NodeCapability, resolve_profiles
    from meshai.litert_convert import converter_unavailable
    from meshai.plan import Constraints
    from meshai.planning import make_plan
    from meshai.progress import Progress
    from meshai.tensors import random_inputs, request_slices
    from nodes.executors import detect_runtimes
    from scheduler.extract import extract_cut

    no_litert = converter_unavailable() or (
        ""
        if "litert" in detect_runtimes()
        else "ai-edge-litert is not installed (pip install 'meshai[litert]')"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshai-bench-rt-") as tmp:
        loaded = [_load(m, Path(tmp)) for m in models]
        cpu = resolve_profiles(["cpu"])[0]
        work = []
        for lm in loaded:
            caps = [NodeCapability(f"n{i}", cpu) for i in range(stages)]
            plan = make_plan(lm, caps, Constraints(stages=stages))
            sample = request_slices(random_inputs(lm.model, seed=0, requests=1))
            cuts = [extract_cut(lm.model, lm.graph, s.inputs, s.outputs, f"stage{s.id}") for s in plan.stages]
            for s, stage, io in zip(plan.stages, cuts, stage_io(cuts, plan, sample), strict=True):
                work.append((lm.name, s.id, stage, io[0][0]))
        with Progress("stages", len(work)) as bar:
            for model, sid, stage, feeds in work:
                base: dict[str, Any] = {}
                for label, build in _backends(stage, f"{model} stage {sid}"):
                    row: dict[str, Any] = {"runtime": label, "model": model, "stage": sid}
                    if label.startswith("litert") and no_litert:
                        rows.append({**row, "unavailable": no_litert})
                        continue
                    try:
                        runner = build()
                        p50, p95 = _time(partial(runner.run, feeds), runs)
                        out = runner.run(feeds)
                    except MeshaiError as exc:
                        rows.append({**row, "unavailable": str(exc)})
                        continue
                    if label == "onnxruntime":
                        base = {"p50": p50, "out": out}
                    diff = max(
                        (float(np.max(np.abs(out[t].astype(np.float64) - base["out"][t]))) for t in out),
                        default=0.0,
                    )
                    rows.append(
                        {
                            **row,
                            "p50_ms": p50,
                            "p95_ms": p95,
                            "ratio": round(p50 / base["p50"], 3) if base.get("p50") else None,
                            "max_abs_diff": diff,
                        }
                    )
                bar.advance()
    return {"runs": runs, "stages": stages, "models": [lm.name for lm in loaded], "rows": rows}


def runtimes_table(res: dict[str, Any]) -> str:
    """One row per (model, stage, runtime)."""
    from meshai.tables import format_table

    rows = [
        [r["model"], r["stage"], r["runtime"]]
        + (
            [r["p50_ms"], r["p95_ms"], r["ratio"], f"{r['max_abs_diff']:.3g}"]
            if "p50_ms" in r
            else ["–", "–", "–", r["unavailable"][:60]]
        )
        for r in res["rows"]
    ]
    head = ["model", "stage", "runtime", "p50 ms", "p95 ms", "× onnxruntime", "max abs diff"]
    return format_table(head, rows, right=(1, 3, 4, 5))
