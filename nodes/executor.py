"""The node's onnxruntime wrapper: one session per stage, checked feeds, provider choice, warm-up.

A node trusts nothing it receives: ``StageSession.run`` checks every feed's name, dtype, rank and
fixed dims against the stage's inputs before onnxruntime sees it, and turns onnxruntime's own failures
into ``InferenceError`` naming the stage.  Sessions never spin (``allow_spinning = 0``): several
sessions in one process on a small CPU otherwise slow each other down about threefold.

``run_stages`` runs a partitioned model stage by stage in this process; ``run_whole`` is the reference
run of the whole model the partitioned outputs must equal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx
import onnxruntime as ort

from meshai.errors import ConfigError, InferenceError, check_min, first_line
from meshai.plan import Plan

__all__ = [
    "CPU",
    "CUDA",
    "StageLike",
    "StageSession",
    "check_feeds",
    "choose_providers",
    "run_stages",
    "run_whole",
    "session_options",
]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

#: onnxruntime's type strings → numpy dtypes (strings arrive as object or str arrays).
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Session options for one stage: ``threads`` (clamped to 1..cpu count) intra and inter-op
    threads, no spinning, all graph optimizations, sequential execution, warnings silenced."""
    n = max(1, min(int(threads), os.cpu_count() or 1))
    so = ort.SessionOptions()
    so.intra_op_num_threads = n
    so.inter_op_num_threads = n
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: light models trip "unused initializer" warnings
    return so


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The providers to use: those of ``requested`` this onnxruntime has, CPU always last.

    ``None`` means CPU only; a provider onnxruntime does not know at all raises ``ConfigError``; one
    it knows but this build or host lacks (CUDA on a CPU-only host) is skipped.
    """
    if not requested:
        return [CPU]
    known = set(ort.get_all_providers())
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for p in requested:
        if p not in known:
            raise ConfigError(f"unknown onnxruntime provider {p!r} (known: {', '.join(sorted(known))})")
        if p in available and p not in chosen:
            chosen.append(p)
    if CPU in chosen:
        chosen.remove(CPU)
    chosen.append(CPU)
    return chosen


def _input_ranks(model: onnx.ModelProto) -> dict[str, int | None]:
    """Rank per graph input as the model declares it (None where no shape is given)."""
    out: dict[str, int | None] = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        out[v.name] = len(t.shape.dim) if t.HasField("shape") else None
    return out


class StageSession:
    """An onnxruntime session for one stage (or a whole model) whose feeds are checked before use."""

    def __init__(
        self,
        model: bytes | onnx.ModelProto,
        providers: Sequence[str] | None = None,
        threads: int = 1,
        name: str = "stage",
        *,
        ort_format: bool = False,
    ) -> None:
        """Create the session from serialized bytes or a ModelProto; failures raise InferenceError.
        ``ort_format``: the bytes are an ORT Mobile ``.ort`` model (``runtime`` is then ``ort-mobile``)."""
        self.name = name
        self.runtime = "ort-mobile" if ort_format else "onnxruntime"
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else bytes(model)
        chosen = choose_providers(providers)
        so = session_options(threads)
        if ort_format:
            so.add_session_config_entry("session.load_model_format", "ORT")
        try:
            self._session = ort.InferenceSession(data, sess_options=so, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise InferenceError(f"{name}: onnxruntime cannot load the model: {first_line(exc)}") from None
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        ins = self._session.get_inputs()
        outs = self._session.get_outputs()
        self.input_names: tuple[str, ...] = tuple(i.name for i in ins)
        self.output_names: tuple[str, ...] = tuple(o.name for o in outs)
        self.input_types: dict[str, str] = {i.name: i.type for i in ins}
        self.input_dtypes: dict[str, np.dtype[Any] | None] = {i.name: _ORT_DTYPES.get(i.type) for i in ins}
        # onnxruntime shows an unknown shape and a scalar both as []; ask the model when that happens
        shapes: dict[str, tuple[int | str | None, ...] | None] = {i.name: tuple(i.shape) for i in ins}
        ambiguous = [n for n, s in shapes.items() if s == ()]
        if ambiguous and ort_format:  # an .ort file is no ModelProto to ask: leave those unchecked
            shapes.update(dict.fromkeys(ambiguous))
        elif ambiguous:
            proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(data)
            ranks = _input_ranks(proto)
            for n in ambiguous:
                if ranks.get(n) is None:
                    shapes[n] = None
        self.input_shapes: dict[str, tuple[int | str | None, ...] | None] = shapes

    def __repr__(self) -> str:
        return f"StageSession({self.name!r}, inputs={self.input_names}, outputs={self.output_names})"

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as contiguous arrays, or InferenceError naming the first bad tensor."""
        return check_feeds(self.name, feeds, self.input_names, self.input_dtypes, self.input_shapes)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on checked feeds; returns every output by name; failures raise InferenceError."""
        checked = self.check_feeds(feeds)
        try:
            results = self._session.run(None, checked)
        except Exception as exc:  # onnxruntime's errors are not MeshaiErrors
            raise InferenceError(f"{self.name}: onnxruntime failed: {first_line(exc)}") from None
        return {n: np.asarray(r) for n, r in zip(self.output_names, results, strict=True)}

    def warmup(self, batch: int = 1, runs: int = 1) -> None:
        """Run ``runs`` times on zeros (symbolic dims set to ``batch``) so the first request is not slow."""
        check_min("warm-up batch", batch, 1)
        feeds: dict[str, np.ndarray] = {}
        for n in self.input_names:
            shape = self.input_shapes[n]
            dtype = self.input_dtypes[n]
            if shape is None or dtype is None:
                raise InferenceError(f"{self.name}: cannot warm up: input {n!r} has no known shape or dtype")
            dims = tuple(d if isinstance(d, int) else batch for d in shape)
            feeds[n] = np.full(dims, "", dtype=object) if dtype == np.dtype(object) else np.zeros(dims, dtype)
        for _ in range(max(1, runs)):
            self.run(feeds)


def check_feeds(
    name: str,
    feeds: Mapping[str, Any],
    input_names: Sequence[str],
    dtypes: Mapping[str, np.dtype[Any] | None],
    shapes: Mapping[str, tuple[int | str | None, ...] | None],
) -> dict[str, np.ndarray]:
    """Stage ``name``'s feeds checked against its inputs (names; dtype per name, None = unchecked; shape
    per name, symbolic dims and None unchecked) as C-contiguous arrays, or InferenceError naming the first
    bad tensor.  Every runner calls this before its runtime sees a feed."""
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise InferenceError(f"{name}: input {missing[0]!r} is missing from the feeds")
    unknown = [n for n in feeds if n not in input_names]
    if unknown:
        raise InferenceError(
            f"{name}: feed {unknown[0]!r} is not an input (inputs: {', '.join(input_names)})"
        )
    out: dict[str, np.ndarray] = {}
    for n in input_names:
        arr = feeds[n]
        if not isinstance(arr, np.ndarray):
            raise InferenceError(f"{name}: input {n!r} is a {type(arr).__name__}, not a numpy array")
        want = dtypes[n]
        if want is None:
            pass  # a type this wrapper does not map: let the runtime judge it
        elif want == np.dtype(object):
            if arr.dtype.kind not in "OUS":
                raise InferenceError(f"{name}: input {n!r} must hold strings, got dtype {arr.dtype}")
        elif arr.dtype != want:
            raise InferenceError(f"{name}: input {n!r} must have dtype {want}, got {arr.dtype}")
        shape = shapes[n]
        if shape is not None:
            if arr.ndim != len(shape):
                raise InferenceError(
                    f"{name}: input {n!r} must have rank {len(shape)} {_fmt(shape)}, got shape {arr.shape}"
                )
            for axis, (want_d, got_d) in enumerate(zip(shape, arr.shape, strict=True)):
                if isinstance(want_d, int) and want_d != got_d:
                    raise InferenceError(
                        f"{name}: input {n!r} must have shape {_fmt(shape)}, got {arr.shape} (axis {axis})"
                    )
        # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        out[n] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    return out


def _fmt(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@runtime_checkable
class StageLike(Protocol):
    """Anything that says which tensors a stage takes and gives: a plan Stage, a StageSpec."""

    @property
    def inputs(self) -> Sequence[str]: ...

    @property
    def outputs(self) -> Sequence[str]: ...


def _session(
    model: bytes | onnx.ModelProto | StageSession, providers: Sequence[str] | None, name: str
) -> StageSession:
    return model if isinstance(model, StageSession) else StageSession(model, providers=providers, name=name)


def run_stages(
    stage_models: Sequence[bytes | onnx.ModelProto | StageSession],
    stages: Plan | Sequence[StageLike],
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run a partitioned model stage by stage in this process and return its graph outputs.

    ``stages`` is a Plan (its ``stages`` and ``outputs`` are used) or a sequence of objects with
    ``inputs`` and ``outputs`` (plan Stages, StageSpecs), one per model, in pipeline order.  Each stage
    gets exactly the tensors it declares as inputs, from ``inputs`` or earlier stages' outputs.  The
    result holds ``outputs`` when given, else the plan's outputs when it names them, else every tensor
    any stage outputs.  Sessions made here are dropped after their stage runs, so only one stage's
    weights are in memory at a time.  A tensor no earlier stage gave raises InferenceError.
    """
    plan_outputs: Sequence[str] = ()
    stage_list: list[StageLike]
    if isinstance(stages, Plan):
        plan_outputs = stages.outputs
        stage_list = list(stages.stages)
    else:
        stage_list = list(stages)
    if len(stage_list) != len(stage_models):
        raise InferenceError(f"{len(stage_models)} stage models for {len(stage_list)} stages")
    for k, s in enumerate(stage_list):
        if not isinstance(s, StageLike):
            raise InferenceError(f"stage {k} ({type(s).__name__}) has no inputs/outputs")

    env: dict[str, np.ndarray] = dict(inputs)
    produced: list[str] = []
    for k, (model, spec) in enumerate(zip(stage_models, stage_list, strict=True)):
        name = f"stage {k}"
        feeds: dict[str, np.ndarray] = {}
        for t in spec.inputs:
            if t not in env:
                raise InferenceError(
                    f"{name}: input {t!r} is neither a model input nor an earlier stage's output"
                )
            feeds[t] = env[t]
        sess = _session(model, providers, name)
        result = sess.run(feeds)
        for t in spec.outputs:
            if t not in result:
                raise InferenceError(f"{name}: the stage model does not output {t!r}")
            env[t] = result[t]
            if t not in produced:
                produced.append(t)
        del sess
    wanted = list(outputs) if outputs is not None else (list(plan_outputs) or produced)
    missing = [t for t in wanted if t not in env]
    if missing:
        raise InferenceError(f"output {missing[0]!r} was produced by no stage")
    return {t: env[t] for t in wanted}


def run_whole(
    model: bytes | onnx.ModelProto | StageSession,
    inputs: Mapping[str, np.ndarray],
    providers: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The reference run: the whole model on ``inputs`` in one session; returns every graph output."""
    sess = _session(model, providers, "whole model")
    return sess.run(inputs)
