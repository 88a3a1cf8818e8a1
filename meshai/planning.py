"""Composition: from a model name and a swarm description to a Plan and its stage models.

Part of the composition layer (with ``mesh.py``, ``cli.py``, ``bench.py``): it wires the pure
scheduler to model files and device profiles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from meshai.capabilities import NodeCapability, load_profiles, parse_profile_list, resolve_profiles, swarm
from meshai.errors import ConfigError
from meshai.models import load_model, model_name, resolve_model
from meshai.plan import Constraints, Plan
from scheduler.extract import extract_plan, stage_types
from scheduler.graph import GraphIR, build_graph, normalize_model
from scheduler.partition import plan as partition


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to plan: normalized ONNX, its GraphIR, and a display name."""

    name: str
    model: onnx.ModelProto
    graph: GraphIR
    source_sha256: str = ""  # of the model file as given (what a package's manifest lists)


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
    """One ONNX model per stage of ``plan``."""
    return extract_plan(loaded.model, loaded.graph, plan)


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
