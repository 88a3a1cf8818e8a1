"""Composition: from a model name and a swarm description to a Plan and its stage models.

Part of the composition layer (with ``mesh.py``, ``cli.py``, ``bench.py``): it wires the pure
scheduler to model files and device profiles.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from meshai.capabilities import NodeCapability, load_profiles, parse_profile_list, resolve_profiles, swarm
from meshai.errors import ConfigError, DeploymentError
from meshai.models import load_model, model_name, resolve_model
from meshai.plan import Constraints, Plan
from scheduler.extract import extract_plan, stage_types
from scheduler.graph import GraphIR, build_graph, normalize_model
from scheduler.partition import plan as partition

if TYPE_CHECKING:
    from scheduler.quantize import Calibration, QuantProfile


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to plan: normalized ONNX, its GraphIR, and a display name."""

    name: str
    model: onnx.ModelProto
    graph: GraphIR
    source_sha256: str = ""  # of the model file as given (what a package's manifest lists)
    calibration: Calibration | None = None  # tensor ranges: int8 stages are quantized from these


def load_for_planning(spec: str | os.PathLike[str], batch: int = 1) -> LoadedModel:
    """Load, normalize and analyse a model by name or path."""
    import hashlib

    name = model_name(spec)
    path = resolve_model(spec)
    raw = load_model(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = normalize_model(raw)
    return LoadedModel(name, model, build_graph(model, name, batch=batch), digest)


def swarm_from_flags(profiles: str, profiles_file: str | None = None) -> list[NodeCapability]:
    """``--profiles cpu,gpu,npu`` (plus a user profiles file) → nodes n0, n1, …"""
    extra = load_profiles(profiles_file) if profiles_file else None
    return swarm(resolve_profiles(parse_profile_list(profiles), extra))


def parse_pins(pins: Sequence[str]) -> dict[str, str]:
    """``["data_0=n0"]`` → ``{"data_0": "n0"}``; malformed entries raise ConfigError."""
    out: dict[str, str] = {}
    for p in pins:
        tensor, sep, node = p.rpartition("=")
        if not sep or not tensor or not node:
            raise ConfigError(f"bad --pin {p!r}: expected INPUT=NODE")
        if tensor in out and out[tensor] != node:
            raise ConfigError(f"--pin {tensor} given twice ({out[tensor]!r} and {node!r})")
        out[tensor] = node
    return out


def make_plan(loaded: LoadedModel, nodes: Sequence[NodeCapability], constraints: Constraints) -> Plan:
    """Run the pure planner."""
    return partition(loaded.graph, nodes, constraints)


def stage_models(loaded: LoadedModel, plan: Plan) -> list[onnx.ModelProto]:
    """One ONNX model per stage of ``plan``; int8 stages quantized from the model's calibration."""
    return built_stages(loaded, plan)[0]


def built_stages(loaded: LoadedModel, plan: Plan) -> tuple[list[onnx.ModelProto], dict[int, list[str]]]:
    """The stage models and, per stage id, the boundary tensors sent as int8 between int8 stages.

    A tensor crosses as int8 when the planner counted it so (``scheduler.precision.int8_wire``) and
    both ends, as quantized, can drop their Q/DQ pair for it; otherwise it stays fp32.  A node that
    builds its int8 stage from a package gets the same list and builds the same model."""
    models = extract_plan(loaded.model, loaded.graph, plan)
    if not any(s.precision == "int8" for s in plan.stages):
        return models, {}
    from scheduler.precision import int8_wire
    from scheduler.quantize import int8_wire_problem, quantize, wire_int8

    out = []
    for stage, m in zip(plan.stages, models, strict=True):
        if stage.precision == "int8":
            if loaded.calibration is None:
                raise DeploymentError(
                    f"stage {stage.id} runs int8 but model {loaded.name!r} carries no calibration "
                    "(plan and deploy it with --calibration)"
                )
            m = quantize(m, loaded.calibration)
        out.append(m)
    planned = int8_wire(plan, loaded.graph)
    wire: dict[int, list[str]] = {s.id: [] for s in plan.stages}
    for s in plan.stages:
        for t in planned[s.id]:
            if t not in s.outputs:
                continue
            ends = [s.id, *s.routes.get(t, ())]
            if all(not int8_wire_problem(out[i], t) for i in ends):
                for i in ends:
                    wire[i].append(t)
    return [wire_int8(m, wire[i]) for i, m in enumerate(out)], wire


def chained_outputs(
    models: Sequence[onnx.ModelProto], plan: Plan, samples: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Every sample through the stage models in plan order, here (what the pipeline computes)."""
    from nodes.executor import StageSession, run_stages

    sessions = [StageSession(m.SerializeToString(), name=f"stage {i}") for i, m in enumerate(models)]
    return [run_stages(sessions, plan, dict(sample)) for sample in samples]


# ------------------------------------------------------------------------- precision with placement

#: How many times a plan is re-made when its measured accuracy drop exceeds the prediction.
MEASURE_ROUNDS = 4


@dataclass
class Quantization:
    """What planning with int8 needs: the calibration, the evaluation data and int8's measured cost."""

    calibration: Calibration
    samples: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    profile: QuantProfile
    reference: list[dict[str, np.ndarray]]  # the fp32 model's outputs for ``samples``

    def constraints(self, base: Constraints) -> Constraints:
        """``base`` with the int8 variant and its measured figures."""
        return dataclasses.replace(
            base,
            precisions=tuple(dict.fromkeys((*base.precisions, "int8"))),
            int8_drop_pts=dict(self.profile.op_drop_pts),
            whole_int8_drop_pts=self.profile.whole_drop_pts,
        )


def read_samples(
    path: str | os.PathLike[str], model: onnx.ModelProto, what: str
) -> list[dict[str, np.ndarray]]:
    """Samples (one feed dict each) from one npz or a directory of them (ARCHITECTURE.md layout),
    checked against ``model``'s inputs (names, dtypes, ranks); ConfigError names ``what``."""
    from meshai.batch_cli import read_inputs
    from meshai.tensors import input_specs, request_slices
    from nodes.executor import StageSession

    if not Path(path).exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    samples = request_slices(read_inputs(Path(path), [s.name for s in input_specs(model)]))
    if not samples:
        raise ConfigError(f"{what} {str(path)!r} holds no samples")
    StageSession(model, name=f"{what} {str(path)!r}").check_feeds(samples[0])
    return samples


def read_labels(path: str | os.PathLike[str], rows: int) -> np.ndarray:
    """The integer ``labels`` array of an npz, one per evaluation row (``rows`` of them)."""
    from meshai.tensors import load_npz

    labels = load_npz(path, ["labels"])["labels"]
    if labels.dtype.kind not in "iu":
        raise ConfigError(
            f"--labels {str(path)!r}: 'labels' must hold integer class ids, got dtype {labels.dtype}"
        )
    if labels.size != rows:
        raise ConfigError(
            f"--labels {str(path)!r} holds {labels.size} labels, but the eval data gives {rows} predictions"
        )
    return labels.reshape(-1)


def prepare_quantization(
    loaded: LoadedModel,
    calibration: str,
    eval_data: str | None = None,
    labels: str | None = None,
    per_channel: bool = False,
) -> tuple[LoadedModel, Quantization]:
    """Calibrate (or load a calibration JSON), then measure int8's cost on the evaluation data (the
    calibration samples when none is given), with progress bars.  Returns the model carrying its
    calibration and the figures the planner needs."""
    from meshai.progress import Progress
    from scheduler.quantize import Calibration, calibrate, measure, quantizable_ops, run_model, top1

    if labels and not eval_data:
        raise ConfigError("--labels needs --eval (the samples they label)")
    cal_samples: list[dict[str, np.ndarray]] = []
    if str(calibration).endswith(".json"):
        cal = Calibration.load(calibration)
    else:
        cal_samples = read_samples(calibration, loaded.model, "--calibration")
        with Progress("calibrating", len(cal_samples)) as bar:
            cal = calibrate(loaded.model, cal_samples, per_channel=per_channel, progress=bar.advance)
    samples = read_samples(eval_data, loaded.model, "--eval") if eval_data else cal_samples
    if not samples:
        raise ConfigError("--calibration is a calibration file: name --eval samples to measure int8 on")
    ref = run_model(loaded.model, samples)
    lab = read_labels(labels, top1(ref).size) if labels else None
    with Progress("measuring int8", 1 + len(quantizable_ops(loaded.model))) as bar:
        profile = measure(loaded.model, cal, samples, lab, reference=ref, progress=bar.advance)
    return dataclasses.replace(loaded, calibration=cal), Quantization(cal, samples, lab, profile, ref)


def plan_measured(
    loaded: LoadedModel, nodes: Sequence[NodeCapability], constraints: Constraints, q: Quantization
) -> Plan:
    """Plan precision with placement, then check the plan's int8 stages on the evaluation data: a
    measured drop over the budget is charged to the plan's int8 ops and the planner runs again (at most
    MEASURE_ROUNDS times), so the budget holds for what was measured, not only for what was predicted."""
    from scheduler.precision import DEFAULT_BUDGET_PTS
    from scheduler.quantize import drop_pts

    budget = constraints.max_accuracy_drop
    limit = DEFAULT_BUDGET_PTS if budget is None else budget  # what the planner assumes, too
    c = q.constraints(constraints)
    drops = dict(c.int8_drop_pts or {})
    for _ in range(MEASURE_ROUNDS):
        plan = partition(loaded.graph, nodes, c)
        int8_ops = [o for s in plan.stages if s.precision == "int8" for o in s.ops]
        if not int8_ops:
            return plan
        models = built_stages(dataclasses.replace(loaded, calibration=q.calibration), plan)[0]
        measured = round(drop_pts(q.reference, chained_outputs(models, plan, q.samples), q.labels), 4)
        predicted = plan.predicted.accuracy_drop_pts or 0.0
        note = (
            f"int8 stages measured on {len(q.samples)} samples: {measured:g} points of "
            f"{q.profile.metric} lost (predicted {predicted:g}, budget {limit:g})"
        )
        if measured <= limit:
            pred = dataclasses.replace(plan.predicted, accuracy_drop_pts=measured)
            return dataclasses.replace(plan, predicted=pred, notes=(*plan.notes, note))
        charged = [o for o in int8_ops if o in drops] or int8_ops
        extra = (measured - predicted) / len(charged) + 1e-6
        for o in charged:
            drops[o] = drops.get(o, 0.0) + extra
        c = dataclasses.replace(c, int8_drop_pts=dict(drops))
    c = dataclasses.replace(c, max_accuracy_drop=0.0)
    plan = partition(loaded.graph, nodes, c)
    note = f"int8 kept missing the accuracy budget when measured ({MEASURE_ROUNDS} tries): planned without it"
    return dataclasses.replace(plan, notes=(*plan.notes, note))


def quant_report(q: Quantization) -> dict[str, Any]:
    """What was measured, for a command's JSON."""
    return {**q.profile.to_dict(), "calibration_samples": q.calibration.samples}


def check_plan(loaded: LoadedModel, plan: Plan, inputs: Mapping[str, np.ndarray]) -> float:
    """Run the stages in order in this process and return max abs diff against the whole model."""
    from meshai.tensors import max_abs_diff
    from nodes.executor import run_stages, run_whole

    models = stage_models(loaded, plan)
    got = run_stages(models, plan, dict(inputs))
    want = run_whole(loaded.model, dict(inputs))
    return max_abs_diff(got, want)


__all__ = [
    "LoadedModel",
    "check_plan",
    "load_for_planning",
    "make_plan",
    "parse_pins",
    "stage_models",
    "stage_types",
    "swarm_from_flags",
]
