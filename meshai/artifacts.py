"""Per-stage artifacts for the runtimes a swarm has, built on the host that builds packages.

A node with full onnxruntime cuts its stage out of the package's ONNX model itself.  A node that only
has ORT Mobile or LiteRT needs its stage already converted: ``build_artifacts`` cuts each stage of a
plan that lands on such a node, converts it (``.ort`` with onnxruntime's own tool, the reduced operator
configuration recorded beside it; ``.tflite`` fp32/fp16 with onnx2tf, ``meshai.litert_convert``),
and **measures** it: the converted stage runs on sample inputs (the stage's real inputs, computed by
running the earlier stages) beside the ONNX stage on onnxruntime, and its largest output difference is
recorded against the runtime's tolerance.  The files go into the package under ``runtimes/<cut key>/``
(so each is covered by the package's signature) with ``runtimes.json`` describing them; a node finds
its artifact by the cut it is asked to run (``cut_key``).  ``planner_artifacts`` turns the table into
the planner's data: which cuts each runtime can run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.errors import ConfigError, MeshaiError, ModelError
from nodes.executors import RUNTIMES_FILE, artifact_path, cut_key

if TYPE_CHECKING:
    import onnx

    from meshai.plan import Plan
    from meshai.planning import LoadedModel

__all__ = [
    "RUNTIMES_FILE",
    "TOLERANCE",
    "Artifacts",
    "artifact_path",
    "artifacts_for_plan",
    "build_artifacts",
    "cut_key",
    "stage_io",
    "to_ort",
]

#: Largest output difference from onnxruntime a converted stage may show, per artifact, relative to the
#: largest output magnitude when that exceeds 1 (absolute below).
TOLERANCE = {"ort-mobile": 1e-4, "litert-fp32": 1e-4, "litert-fp16": 5e-2}
#: Seconds one conversion may take.
CONVERT_TIMEOUT_S = 300.0


def to_ort(model: onnx.ModelProto, name: str = "stage") -> tuple[bytes, str]:
    """``model`` in the ORT Mobile format (optimised 'Fixed'), and its required-operators config."""
    with tempfile.TemporaryDirectory(prefix="meshai-ort-") as tmp:
        src = Path(tmp) / "stage.onnx"
        src.write_bytes(model.SerializeToString())
        cmd = [
            sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
            "--output_dir", str(Path(tmp) / "out"), "--optimization_style", "Fixed",
        ]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ModelError(f"{name}: conversion to .ort took over {CONVERT_TIMEOUT_S:g} s") from None
        out = Path(tmp) / "out" / "stage.ort"
        if r.returncode != 0 or not out.is_file():
            last = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"])[-1]
            raise ModelError(f"{name}: onnxruntime could not convert it to .ort: {last}")
        config = next(iter((Path(tmp) / "out").glob("*.config")), None)
        return out.read_bytes(), config.read_text() if config is not None else ""


@dataclass
class Artifacts:
    """What ``build_artifacts`` made: package files (path → bytes) and the table behind them."""

    files: dict[str, bytes] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # cut key → inputs, outputs, ops, artifacts

    def table(self) -> dict[str, Any]:
        """``runtimes.json``'s content."""
        return {"format": 1, "stages": self.stages}

    def package_files(self) -> dict[str, bytes]:
        """The files to add to a package, ``runtimes.json`` included."""
        return {**self.files, RUNTIMES_FILE: json.dumps(self.table(), indent=1, sort_keys=True).encode()}

    def failures(self) -> list[str]:
        """One line per artifact that did not convert or did not agree."""
        out = []
        for key, st in self.stages.items():
            for what, a in st["artifacts"].items():
                if not a["ok"]:
                    out.append(f"stage {st['stage']} ({key}) on {what}: {a['why']}")
        return out


def stage_io(
    stage_models: Sequence[onnx.ModelProto], plan: Plan, samples: Sequence[Mapping[str, np.ndarray]]
) -> list[list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]]:
    """Per stage, per sample: the tensors that stage reads and what it gives on onnxruntime (the
    stages run here in plan order, each on the outputs of those before it)."""
    from nodes.executor import StageSession

    sessions = [StageSession(m, name=f"stage {i}") for i, m in enumerate(stage_models)]
    per_stage: list[list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]] = [[] for _ in plan.stages]
    for sample in samples:
        env = dict(sample)
        for i, (s, sess) in enumerate(zip(plan.stages, sessions, strict=True)):
            feeds = {t: env[t] for t in s.inputs}
            outs = sess.run(feeds)
            per_stage[i].append((feeds, outs))
            env.update(outs)
    return per_stage


def _runner(runtime: str, data: bytes, stage: onnx.ModelProto, name: str) -> Any:
    if runtime == "ort-mobile":
        from nodes.executor import StageSession

        return StageSession(data, name=name, ort_format=True)
    from nodes.executors.litert import LiteRtSession

    return LiteRtSession(data, stage, name=name)


def _convert(
    runtime: str, precision: str, stage: onnx.ModelProto, name: str
) -> tuple[bytes, dict[str, bytes]]:
    """The artifact's bytes and any files recorded beside it."""
    if runtime == "ort-mobile":
        data, config = to_ort(stage, name)
        return data, {"ort-mobile.required_operators.config": config.encode()}
    from meshai.litert_convert import to_tflite

    return to_tflite(stage, precision), {}


def _disagreement(
    runner: Any, feeds: Sequence[Mapping[str, np.ndarray]], want: Sequence[Mapping[str, np.ndarray]]
) -> tuple[float, float]:
    """The largest absolute output difference of ``runner`` from the reference outputs ``want``, and
    the largest reference output magnitude (tolerances are relative to it, at least 1: activations of
    models with synthetic weights reach 1e9, where fp32 rounding alone differs by hundreds)."""
    diff = scale = 0.0
    for f, w in zip(feeds, want, strict=True):
        got = runner.run(f)
        for t, ref in w.items():
            r = np.asarray(ref, np.float64)
            gap = np.abs(np.asarray(got[t], np.float64) - r)
            if gap.size:
                diff, scale = max(diff, float(gap.max())), max(scale, float(np.abs(r).max()))
    return diff, scale


def build_artifacts(
    loaded: LoadedModel,
    plan: Plan,
    node_runtimes: Mapping[str, Sequence[str]],
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    every: Sequence[str] = (),
) -> Artifacts:
    """Convert and measure every stage of ``plan`` for the runtime its node prefers (when that is not
    onnxruntime), plus every runtime named in ``every`` (for benchmarks and spare nodes).  A stage that
    does not convert or does not agree is recorded with the reason (``ok: false``), not raised."""
    from scheduler.extract import extract_cut

    graph = loaded.graph
    models = [extract_cut(loaded.model, graph, s.inputs, s.outputs, f"stage{s.id}") for s in plan.stages]
    ios = stage_io(models, plan, samples)
    out = Artifacts()
    for s, stage, io in zip(plan.stages, models, ios, strict=True):
        stage_feeds = [f for f, _ in io]
        want = [o for _, o in io]  # onnxruntime's outputs: what a converted stage must agree with
        wanted = list(dict.fromkeys([*node_runtimes.get(s.node, ("onnxruntime",))[:1], *every]))
        key = cut_key(s.inputs, s.outputs)
        entry = out.stages.setdefault(
            key,
            {
                "stage": s.id,
                "inputs": list(s.inputs),
                "outputs": list(s.outputs),
                "ops": list(s.ops),
                "artifacts": {},
            },
        )
        for runtime in dict.fromkeys("litert" if r == "litert-fp16" else r for r in wanted):
            if runtime == "onnxruntime":
                continue
            precisions = ("fp32", "fp16") if runtime == "litert" else ("fp32",)
            for precision in precisions:
                what = "ort-mobile" if runtime == "ort-mobile" else f"litert-{precision}"
                path = artifact_path(key, runtime, precision)
                t0 = time.perf_counter()
                rec: dict[str, Any] = {"file": path, "runtime": runtime, "precision": precision}
                try:
                    data, extra = _convert(runtime, precision, stage, f"stage {s.id}")
                    seconds = time.perf_counter() - t0
                    runner = _runner(runtime, data, stage, f"stage {s.id} ({what})")
                    diff, scale = _disagreement(runner, stage_feeds, want)
                    rel = diff / max(1.0, scale)
                    ok = rel <= TOLERANCE[what]
                    rec.update(
                        ok=ok,
                        max_abs_diff=diff,
                        max_abs_output=scale,
                        rel_diff=rel,
                        tolerance=TOLERANCE[what],
                        seconds=round(seconds, 3),
                        bytes=len(data),
                        why=""
                        if ok
                        else f"max abs diff {diff:.3g} (relative {rel:.3g}) over the tolerance {TOLERANCE[what]:g}",
                    )
                    if ok:
                        out.files[path] = data
                        for name, blob in extra.items():
                            out.files[f"runtimes/{key}/{name}"] = blob
                except MeshaiError as exc:
                    rec.update(ok=False, why=str(exc), seconds=round(time.perf_counter() - t0, 3))
                entry["artifacts"][what] = rec
    return out


def artifacts_for_plan(
    model: str, plan_file: str, runtimes: Sequence[str], samples: int = 8, seed: int = 0
) -> Artifacts:
    """``meshai package build --runtimes … --plan PLAN.json``: every stage of a saved plan (``meshai
    plan --json``) converted for each runtime and measured on ``samples`` random requests."""
    from meshai.plan import Plan
    from meshai.planning import load_for_planning
    from meshai.tensors import random_inputs, request_slices
    from nodes.executors import RUNTIMES

    bad = [r for r in runtimes if r not in RUNTIMES or r == "onnxruntime"]  # litert makes fp32 and fp16
    if bad:
        raise ConfigError(
            f"--runtimes takes ort-mobile and litert (onnxruntime needs no artifact), got {bad[0]!r}"
        )
    try:
        text = Path(plan_file).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --plan {plan_file!r}: {exc.strerror}") from None
    plan = Plan.from_json(text)
    loaded = load_for_planning(model)
    known = {op.name for op in loaded.graph.ops}
    missing = [o for s in plan.stages for o in s.ops if o not in known]
    if missing:
        raise ConfigError(
            f"--plan {plan_file!r} names op {missing[0]!r}, which model {loaded.name!r} does not have"
        )
    reqs = request_slices(random_inputs(loaded.model, seed=seed, requests=samples))
    return build_artifacts(loaded, plan, {}, reqs, every=runtimes)
