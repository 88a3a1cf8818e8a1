"""Static post-training INT8 quantization (onnxruntime's QDQ quantizer) and its measured accuracy cost.

Calibration runs once over the whole fp32 model and yields the range of every tensor
(``Calibration``, onnxruntime's calibration-cache JSON).  ``quantize`` then turns any model whose
tensor names come from that model — the whole model, or one stage cut out of it — into its QDQ int8
variant from those ranges, without calibrating again; ``ops`` limits it to some nodes.  So an int8
stage is the same computation wherever it is built (the entry, or a node from a package that carries
the calibration): a stage's fp32 boundary tensors keep their names, and a tensor quantized at the end
of one stage and again at the start of the next is quantized twice with the same scale, which is
exact.

``measure`` runs the fp32 model and int8 variants over evaluation data and returns a ``QuantProfile``
— the measured accuracy drop of the whole int8 model and of each quantizable op on its own — that the
planner reads as data (``Constraints.int8_drop_pts``).  With labels the drop is the accuracy delta in
points; without, it is the top-1 disagreement with the fp32 model in points.

This module does I/O (onnxruntime sessions, temporary files); the planner never imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from meshai.errors import ConfigError, InferenceError

__all__ = [
    "Calibration",
    "QuantProfile",
    "accuracy_pts",
    "calibrate",
    "drop_pts",
    "measure",
    "quantizable_ops",
    "quantize",
    "run_model",
    "top1",
]

Tensors = dict[str, np.ndarray]
#: The file a model package carries its calibration in (nodes quantize their int8 stages from it).
CALIBRATION_FILE = "calibration.json"
#: Keep Relu/Clip after Conv/Gemm as ops of their own: folding them into the producer's quantization
#: would make a cut between the two (the planner may make one) compute something else than the whole.
QUANT_OPTIONS = {"QDQKeepRemovableActivations": True}
#: Op types onnxruntime's QDQ quantizer gives int8 weights or activations (the ones worth counting).
QUANT_OP_TYPES = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs advice through the root logger; keep stderr to our own messages."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@dataclass(frozen=True)
class Calibration:
    """Every tensor's calibrated range (onnxruntime's calibration-cache JSON) and the weight layout."""

    data: bytes
    per_channel: bool = False
    samples: int = 0

    def to_bytes(self) -> bytes:
        """One JSON document: what a package carries next to its model."""
        doc = {"per_channel": self.per_channel, "samples": self.samples, "ranges": json.loads(self.data)}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, what: str = "calibration") -> Calibration:
        """Parse ``to_bytes`` output; ConfigError names what is wrong."""
        try:
            doc = json.loads(raw)
            ranges = doc["ranges"]
            per_channel = doc["per_channel"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{what} is not a meshai calibration: {exc}") from None
        if not isinstance(ranges, dict) or not isinstance(per_channel, bool):
            raise ConfigError(f"{what} is not a meshai calibration (ranges / per_channel)")
        return cls(json.dumps(ranges).encode(), per_channel, int(doc.get("samples", 0)))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read calibration {str(path)!r}: {exc.strerror}") from None
        return cls.from_bytes(raw, f"calibration {str(path)!r}")


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]], progress: Callable[[], None] | None):
        self._it = iter(samples)
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is not None and self._progress is not None:
            self._progress()
        return None if item is None else {k: np.asarray(v) for k, v in item.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item


def _saved(model: onnx.ModelProto, tmp: str) -> Path:
    """The model as a file (onnxruntime's quantizer reloads it from disk with shape inference)."""
    path = Path(tmp) / "model.onnx"
    onnx.save(model, str(path))
    return path


def _feed_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _check_samples(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]], what: str) -> None:
    if not samples:
        raise ConfigError(f"{what} holds no samples")
    missing = [n for n in _feed_names(model) if n not in samples[0]]
    if missing:
        raise ConfigError(f"{what} lacks model input {missing[0]!r} (has: {', '.join(samples[0])})")


def calibrate(
    model: onnx.ModelProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    per_channel: bool = False,
    progress: Callable[[], None] | None = None,
) -> Calibration:
    """Run the fp32 ``model`` over ``samples`` (one feed dict each) and record every tensor's range
    (min/max calibration).  ``progress()`` is called once per sample."""
    _check_samples(model, samples, "calibration data")
    _, ranges = _quantize_static(model, per_channel, "calibration", reader=_Reader(samples, progress))
    return Calibration(_share_activation_ranges(model, ranges), per_channel, len(samples))


def _quantize_static(
    model: onnx.ModelProto,
    per_channel: bool,
    what: str,
    *,
    reader: _Reader | None = None,
    ranges: bytes | None = None,
    ops: Sequence[str] | None = None,
) -> tuple[bytes, bytes]:
    """onnxruntime's QDQ ``quantize_static`` in a temporary folder, calibrating over ``reader`` or
    reusing ``ranges`` (its calibration-cache JSON); returns the quantized model file and the ranges.
    InferenceError names ``what`` failed."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    with tempfile.TemporaryDirectory(prefix="meshai-quant-") as tmp, _quiet():
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "q.onnx"
        if ranges is not None:
            cache.write_bytes(ranges)
        try:
            quantize_static(
                _saved(model, tmp),
                out,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                nodes_to_quantize=list(ops) if ops is not None else None,
                calibration_cache_path=cache,
                extra_options=dict(QUANT_OPTIONS),
            )
        except (ValueError, RuntimeError, KeyError, onnx.checker.ValidationError) as exc:
            raise InferenceError(f"{what} failed: {exc}") from None
        return out.read_bytes(), cache.read_bytes()


def _share_activation_ranges(model: onnx.ModelProto, data: bytes) -> bytes:
    """Give the input of a Relu/Clip that is its only reader the activation's range, as onnxruntime's
    quantizer does inside a whole model: a stage cut between the two then quantizes that tensor as the
    whole model would, so the stages chain to exactly the whole int8 computation."""
    doc = json.loads(data)
    ranges = doc.get("data", {})
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    outputs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        if n.op_type in ("Relu", "Clip") and n.input and n.output:
            x, y = n.input[0], n.output[0]
            if readers.get(x) == 1 and x not in outputs and x in ranges and y in ranges:
                ranges[x] = ranges[y]
    return json.dumps(doc).encode()


def quantize(model: onnx.ModelProto, cal: Calibration, ops: Sequence[str] | None = None) -> onnx.ModelProto:
    """The QDQ int8 variant of ``model`` (the calibrated model or a stage cut from it) from the ranges in
    ``cal``; with ``ops``, only those nodes are quantized (the rest stay fp32)."""
    if ops is not None and not ops:
        return model
    raw, _ = _quantize_static(model, cal.per_channel, "int8 quantization", ranges=cal.data, ops=ops)
    return onnx.load_from_string(raw)


def quantizable_ops(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose weights or activations int8 quantization changes, in graph order."""
    return [n.name for n in model.graph.node if n.op_type in QUANT_OP_TYPES]


def run_model(model: onnx.ModelProto | bytes, samples: Sequence[Mapping[str, np.ndarray]]) -> list[Tensors]:
    """Every sample through one onnxruntime session (CPU); outputs by name."""
    from nodes.executor import StageSession

    sess = StageSession(model if isinstance(model, bytes) else model.SerializeToString())
    return [sess.run(s) for s in samples]


def timed_ms(
    model: onnx.ModelProto | bytes, samples: Sequence[Mapping[str, np.ndarray]], repeats: int = 3
) -> float:
    """Median milliseconds per sample over ``repeats`` passes (after one warm-up pass)."""
    from nodes.executor import StageSession

    sess = StageSession(model if isinstance(model, bytes) else model.SerializeToString())
    for s in samples[:2]:
        sess.run(s)
    per: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in samples:
            sess.run(s)
        per.append((time.perf_counter() - t0) * 1e3 / len(samples))
    return float(np.median(per))


def top1(outputs: Sequence[Mapping[str, np.ndarray]], name: str | None = None) -> np.ndarray:
    """The arg-max class of each sample's output ``name`` (default: the first output), one int per
    sample row (a sample of batch B gives B rows)."""
    if not outputs:
        return np.zeros(0, np.int64)
    key = name or next(iter(outputs[0]))
    rows = [np.asarray(o[key]).reshape(-1, np.asarray(o[key]).shape[-1]) for o in outputs]
    return np.concatenate([np.argmax(r, axis=-1) for r in rows])


def accuracy_pts(outputs: Sequence[Mapping[str, np.ndarray]], labels: np.ndarray) -> float:
    """Top-1 accuracy in percent against ``labels`` (one per output row)."""
    pred = top1(outputs)
    lab = np.asarray(labels).reshape(-1)
    if pred.shape != lab.shape:
        raise ConfigError(f"{lab.size} labels for {pred.size} predictions")
    return float(np.mean(pred == lab) * 100.0)


def drop_pts(
    ref: Sequence[Mapping[str, np.ndarray]],
    got: Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray | None = None,
) -> float:
    """The accuracy lost going from ``ref`` (fp32) to ``got``, in points: accuracy delta with labels,
    else top-1 disagreement with ``ref``.  Negative when int8 happens to score better."""
    if labels is not None:
        return accuracy_pts(ref, labels) - accuracy_pts(got, labels)
    a, b = top1(ref), top1(got)
    return float(np.mean(a != b) * 100.0) if a.size else 0.0


@dataclass
class QuantProfile:
    """What int8 costs, measured: the whole int8 model's drop and each quantizable op's on its own."""

    metric: str  # "accuracy" (labels) or "agreement" (top-1 vs fp32)
    samples: int
    whole_drop_pts: float
    op_drop_pts: dict[str, float] = field(default_factory=dict)
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "samples": self.samples,
            "whole_drop_pts": self.whole_drop_pts,
            "op_drop_pts": dict(self.op_drop_pts),
            "fp32_accuracy": self.fp32_accuracy,
            "int8_accuracy": self.int8_accuracy,
        }


def measure(
    model: onnx.ModelProto,
    cal: Calibration,
    samples: Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray | None = None,
    *,
    reference: Sequence[Mapping[str, np.ndarray]] | None = None,
    progress: Callable[[], None] | None = None,
) -> QuantProfile:
    """Measure int8's cost on ``samples``: the whole int8 model, and each quantizable op quantized
    alone, against ``reference`` (the fp32 outputs; run here when not given).  ``progress()`` is
    called once per model variant run."""
    _check_samples(model, samples, "evaluation data")
    ref = reference if reference is not None else run_model(model, samples)
    whole = run_model(quantize(model, cal), samples)
    if progress is not None:
        progress()
    prof = QuantProfile(
        metric="accuracy" if labels is not None else "agreement",
        samples=len(samples),
        whole_drop_pts=round(drop_pts(ref, whole, labels), 4),
    )
    if labels is not None:
        prof.fp32_accuracy = round(accuracy_pts(ref, labels), 4)
        prof.int8_accuracy = round(accuracy_pts(whole, labels), 4)
    for op in quantizable_ops(model):
        got = run_model(quantize(model, cal, [op]), samples)
        prof.op_drop_pts[op] = round(drop_pts(ref, got, labels), 4)
        if progress is not None:
            progress()
    return prof


def wire_int8(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Let the stage ``model`` (already quantized) send or receive ``tensors`` as int8 on the wire.

    An output T that the quantizer ends with ``Q → DQ → T`` loses its DequantizeLinear: the stage
    sends Q's int8 result under the name T.  An input T whose only reader is ``Q(T)`` loses that
    QuantizeLinear: the stage reads the int8 tensor T straight into the DequantizeLinear nodes.  Both
    ends use the scale and zero point calibrated for T, so the result is what the two stages compute
    with fp32 between them, at a quarter of the bytes.  InferenceError names a tensor that does not
    follow either pattern (``int8_wire_problem`` says so beforehand)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in tensors:
        problem = int8_wire_problem(m, t)
        if problem:
            raise InferenceError(f"int8 wire: {problem}")
        if any(o.name == t for o in g.output):
            dq, q = _output_pair(g, t)
            assert dq is not None and q is not None
            g.node.remove(dq)
            q.output[0] = t
            _set_int8(next(o for o in g.output if o.name == t))
        else:
            q = _readers(g, t)[0]
            q_out = q.output[0]
            for n in g.node:
                for i, name in enumerate(n.input):
                    if name == q_out:
                        n.input[i] = t
            g.node.remove(q)
            _set_int8(next(i for i in g.input if i.name == t))
    return m


def int8_wire_problem(model: onnx.ModelProto, t: str) -> str:
    """Why the stage ``model`` cannot send or receive ``t`` as int8 ('' when it can)."""
    g = model.graph
    if any(o.name == t for o in g.output):
        dq, q = _output_pair(g, t)
        if dq is None or q is None or _readers(g, t):
            return f"stage output {t!r} does not end in QuantizeLinear → DequantizeLinear"
        if any(n is not dq for n in _readers(g, q.output[0])):
            return f"the int8 form of {t!r} has other readers in the stage"
        return ""
    if any(i.name == t for i in g.input):
        readers = _readers(g, t)
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            return f"stage input {t!r} is not read by one QuantizeLinear alone"
        return ""
    return f"{t!r} is neither an input nor an output of the stage"


def _output_pair(g: onnx.GraphProto, t: str) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and list(n.output) == [t]), None)
    if dq is None:
        return None, None
    q = next((n for n in g.node if n.op_type == "QuantizeLinear" and n.output[0] == dq.input[0]), None)
    return dq, q


def _readers(g: onnx.GraphProto, t: str) -> list[onnx.NodeProto]:
    return [n for n in g.node if t in n.input]


def _set_int8(v: onnx.ValueInfoProto) -> None:
    v.type.tensor_type.elem_type = onnx.TensorProto.INT8
