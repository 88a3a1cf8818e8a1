"""The Plan: what runs where, as frozen, JSON-serialisable data.

A Plan can be printed, diffed, stored and replayed; ``Plan.from_dict(plan.to_dict()) == plan``.
Schema (the contract in ARCHITECTURE.md, plus extra keys):

``{"objective", "model", "inputs", "outputs", "pins",
   "stages": [{"id", "node", "accelerator", "precision", "ops", "const_ops", "inputs", "outputs",
               "routes", "predicted_ms", "param_bytes", "memory_bytes", "bytes_out"}],
   "predicted": {"latency_ms", "bottleneck_ms", "transfer_bytes", "energy_mj"[, "accuracy_drop_pts"]},
   "notes": [...]}``

``accuracy_drop_pts`` is present when some stage runs int8: the accuracy the plan's int8 stages cost, in
points (predicted by the planner from per-op measurements; replaced by the measured figure once the
mixed-precision plan has been run on evaluation data).  ``notes`` say what the planner left out and why.

``ops`` are the ONNX node names a stage computes; ``const_ops`` the constant-only nodes (weights in
disguise) it carries with it.  ``routes`` maps each output tensor to the stage ids that consume it;
tensors in the plan's ``outputs`` also go back to the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshai.errors import PlanError

OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: a connected piece of the graph on one node."""

    id: int
    node: str
    accelerator: str
    precision: str
    ops: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    routes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    const_ops: tuple[str, ...] = ()
    predicted_ms: float = 0.0
    param_bytes: int = 0
    memory_bytes: int = 0
    bytes_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "node": self.node,
            "accelerator": self.accelerator,
            "precision": self.precision,
            "ops": list(self.ops),
            "const_ops": list(self.const_ops),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "routes": {k: list(v) for k, v in self.routes.items()},
            "predicted_ms": self.predicted_ms,
            "param_bytes": self.param_bytes,
            "memory_bytes": self.memory_bytes,
            "bytes_out": self.bytes_out,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage:
        """Inverse of ``to_dict``; a malformed stage raises PlanError naming the key."""
        try:
            return cls(
                id=int(d["id"]),
                node=str(d["node"]),
                accelerator=str(d["accelerator"]),
                precision=str(d["precision"]),
                ops=tuple(str(o) for o in d["ops"]),
                inputs=tuple(str(t) for t in d["inputs"]),
                outputs=tuple(str(t) for t in d["outputs"]),
                routes={str(k): tuple(int(x) for x in v) for k, v in dict(d.get("routes", {})).items()},
                const_ops=tuple(str(o) for o in d.get("const_ops", ())),
                predicted_ms=float(d.get("predicted_ms", 0.0)),
                param_bytes=int(d.get("param_bytes", 0)),
                memory_bytes=int(d.get("memory_bytes", 0)),
                bytes_out=int(d.get("bytes_out", 0)),
            )
        except KeyError as exc:
            raise PlanError(f"plan stage is missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan stage has a bad value: {exc}") from None


@dataclass(frozen=True, slots=True)
class Predicted:
    """What the cost model predicts for a whole plan."""

    latency_ms: float
    bottleneck_ms: float
    transfer_bytes: int
    energy_mj: float
    accuracy_drop_pts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d: dict[str, Any] = {
            "latency_ms": self.latency_ms,
            "bottleneck_ms": self.bottleneck_ms,
            "transfer_bytes": self.transfer_bytes,
            "energy_mj": self.energy_mj,
        }
        if self.accuracy_drop_pts is not None:
            d["accuracy_drop_pts"] = self.accuracy_drop_pts
        return d


@dataclass(frozen=True, slots=True)
class Plan:
    """A partition of one model over named nodes, with its predicted cost."""

    objective: str
    stages: tuple[Stage, ...]
    predicted: Predicted
    model: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    pins: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PlanError(f"unknown objective {self.objective!r} (known: {', '.join(OBJECTIVES)})")
        if [s.id for s in self.stages] != list(range(len(self.stages))):
            raise PlanError("plan stage ids must be 0..K-1 in order")

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in stage order."""
        return tuple(s.node for s in self.stages)

    def stage_of(self, node: str) -> Stage:
        """The stage that runs on ``node``."""
        for s in self.stages:
            if s.node == node:
                return s
        raise PlanError(f"no stage of this plan runs on node {node!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "objective": self.objective,
            "model": self.model,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "pins": dict(self.pins),
            "stages": [s.to_dict() for s in self.stages],
            "predicted": self.predicted.to_dict(),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = None) -> str:
        """Deterministic JSON text (sorted keys)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Inverse of ``to_dict``; malformed input raises PlanError."""
        try:
            p = d["predicted"]
            return cls(
                objective=str(d["objective"]),
                stages=tuple(Stage.from_dict(s) for s in d["stages"]),
                predicted=Predicted(
                    latency_ms=float(p["latency_ms"]),
                    bottleneck_ms=float(p["bottleneck_ms"]),
                    transfer_bytes=int(p["transfer_bytes"]),
                    energy_mj=float(p["energy_mj"]),
                    accuracy_drop_pts=(
                        None if p.get("accuracy_drop_pts") is None else float(p["accuracy_drop_pts"])
                    ),
                ),
                model=str(d.get("model", "")),
                inputs=tuple(str(t) for t in d.get("inputs", ())),
                outputs=tuple(str(t) for t in d.get("outputs", ())),
                pins={str(k): str(v) for k, v in dict(d.get("pins", {})).items()},
                notes=tuple(str(n) for n in d.get("notes", ())),
            )
        except KeyError as exc:
            raise PlanError(f"plan is missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan has a bad value: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a Plan from JSON text."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class Constraints:
    """What the caller asks of a plan: objective, stage count, pins, variants and measured figures.

    ``pins`` maps a graph input to the node it is born on: every op reading it runs there, so the raw
    tensor never crosses a link.  ``precisions`` are the model variants that exist (``fp32`` until
    quantized variants are built).  ``speed`` scales a node's profile throughput by a measured factor.
    ``caller_link`` is how the caller reaches the swarm (graph inputs in, outputs back).
    """

    objective: str = "latency"
    stages: int | None = None
    pins: Mapping[str, str] = field(default_factory=dict)
    precisions: tuple[str, ...] = ("fp32",)
    speed: Mapping[str, float] = field(default_factory=dict)
    caller_bandwidth_bps: float = 1e9 / 8
    caller_latency_s: float = 0.2e-3
    # precision chosen with placement: the measured accuracy cost (points) of each op run in int8 on
    # its own and of the whole int8 model, and the budget a plan's int8 stages must stay within
    int8_drop_pts: Mapping[str, float] | None = None
    whole_int8_drop_pts: float | None = None
    max_accuracy_drop: float | None = None
    int8_blocked: str = ""  # set by the planner: which constraint ruled int8 out, for its messages
    # stages converted for runtimes other than onnxruntime, as measured when the package was built:
    # runtime -> {the op names of a cut: whether it converted and agreed}.  A node without onnxruntime
    # never takes a cut measured bad for its runtimes; with ``artifacts_only`` it takes only cuts
    # measured good (a package's artifacts are all there is).  None: nothing measured yet
    artifacts: Mapping[str, Mapping[frozenset[str], bool]] | None = None
    artifacts_only: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PlanError(f"unknown objective {self.objective!r} (known: {', '.join(OBJECTIVES)})")
        if self.stages is not None and self.stages < 1:
            raise PlanError(f"--stages must be >= 1, got {self.stages}")
        for n, f in self.speed.items():
            if not f > 0:
                raise PlanError(f"measured speed factor of node {n!r} must be > 0, got {f!r}")
        budget = self.max_accuracy_drop
        if budget is not None and not (budget >= 0 and budget < float("inf")):
            raise PlanError(f"--max-accuracy-drop must be a number of points >= 0, got {budget!r}")
