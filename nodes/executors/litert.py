"""The LiteRT stage runner: a ``.tflite`` stage (from ``meshai.litert_convert``) behind the ONNX stage's
interface.

The ONNX stage model says what the wire carries (names, dtypes, NCHW shapes); the ``.tflite`` says what
LiteRT runs.  ``LiteRtSession`` pairs them once, at load, and fails there (``InferenceError``) when it
cannot:

- **names**: a tflite signature or tensor name equal to the ONNX name (onnx2tf keeps them in the
  ``serving_default`` signature), else the same name with every character other than ``[A-Za-z0-9_]``
  as ``_``; tensors still unpaired are paired in order when both sides have as many, and every pair's
  shapes must then fit;
- **layout**: a 4-D tensor whose tflite shape is the ONNX shape with channels last ([N,C,H,W] →
  [N,H,W,C]) is transposed on the way in and back on the way out; any other tensor (2-D logits, flat
  features) must have the ONNX shape and passes as it is.  When both readings fit (C = H = W, or
  unknown dims) the tensor is taken as NHWC, onnx2tf's convention for every 4-D tensor;
- **dtypes**: each tflite boundary tensor must have the ONNX dtype; nothing is cast.  onnx2tf's fp16
  models keep float32 inputs and outputs (weights are float16, dequantized inside), so they pair.

Feeds are checked exactly as onnxruntime stages check them (``nodes.executor.check_feeds``).  A dim
that is symbolic in ONNX and -1 in the tflite (a free batch) follows the feed: the interpreter is
resized when a feed's shape changes.  One interpreter serves one call at a time (a lock).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from meshai.errors import ConfigError, InferenceError, check_min, first_line
from nodes.executor import check_feeds

__all__ = ["Binding", "LiteRtSession"]

_NCHW_TO_NHWC = (0, 2, 3, 1)
_NHWC_TO_NCHW = (0, 3, 1, 2)
_SIGNATURE = "serving_default"

Dims = tuple[int | str | None, ...]


@dataclass(frozen=True)
class Binding:
    """One ONNX boundary tensor paired with its tflite tensor."""

    onnx_name: str
    tflite_name: str
    index: int  # the tflite tensor index
    dtype: np.dtype[Any]
    onnx_shape: Dims | None  # None: the ONNX model gives no shape
    transpose: bool  # NCHW on the wire, NHWC in the tflite


def _onnx_boundary(values: Sequence[onnx.ValueInfoProto], what: str, name: str) -> dict[str, tuple[Any, ...]]:
    """Name → (dtype, shape or None) of a graph's inputs or outputs; InferenceError for non-tensors."""
    out: dict[str, tuple[Any, ...]] = {}
    for v in values:
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or t.elem_type == onnx.TensorProto.UNDEFINED:
            raise InferenceError(
                f"{name}: ONNX {what} {v.name!r} is not a typed tensor; LiteRT cannot take it"
            )
        dims: Dims | None = None
        if t.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            )
        out[v.name] = (np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)
    return out


def _fits(onnx_shape: Dims, tflite_shape: Sequence[int]) -> bool:
    """Whether a tflite shape (-1 = free) can be the ONNX shape (symbolic dims match anything)."""
    if len(onnx_shape) != len(tflite_shape):
        return False
    return all(not isinstance(o, int) or t in (-1, o) for o, t in zip(onnx_shape, tflite_shape, strict=True))


def _layout(onnx_shape: Dims | None, tflite_shape: Sequence[int]) -> bool | None:
    """True: transpose NCHW↔NHWC; False: pass as it is; None: the shapes cannot be the same tensor."""
    if onnx_shape is None:
        return len(tflite_shape) == 4
    if len(onnx_shape) == 4 and _fits(tuple(onnx_shape[i] for i in _NCHW_TO_NHWC), tflite_shape):
        return True
    return False if _fits(onnx_shape, tflite_shape) else None


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _tflite_names(details: Sequence[dict[str, Any]], signature: Mapping[str, dict[str, Any]]) -> list[str]:
    """A name per tflite tensor: its signature key where the signature has one, else its tensor name
    without onnx2tf's ``serving_default_`` prefix and ``:0`` suffix."""
    by_index = {d["index"]: key for key, d in signature.items()}
    names = []
    for d in details:
        plain = re.sub(r":\d+$", "", str(d["name"])).removeprefix(f"{_SIGNATURE}_")
        names.append(by_index.get(d["index"], plain))
    return names


def _bind(
    onnx_side: Mapping[str, tuple[Any, ...]],
    details: Sequence[dict[str, Any]],
    signature: Mapping[str, dict[str, Any]],
    what: str,
    name: str,
) -> tuple[Binding, ...]:
    """Pair every ONNX tensor with one tflite tensor (by name, then by order), or InferenceError."""
    tfl_names = _tflite_names(details, signature)
    pairs: dict[str, int] = {}  # ONNX name → position in details
    for n in onnx_side:
        for key in (n, _sanitize(n)):
            hits = [k for k, t in enumerate(tfl_names) if t == key and k not in pairs.values()]
            if len(hits) == 1:
                pairs[n] = hits[0]
                break
    rest_onnx = [n for n in onnx_side if n not in pairs]
    rest_tfl = [k for k in range(len(details)) if k not in pairs.values()]
    if len(rest_onnx) != len(rest_tfl):
        listed = ", ".join(tfl_names) or "none"
        raise InferenceError(
            f"{name}: the .tflite has {len(details)} {what}s ({listed}) for the ONNX stage's "
            f"{len(onnx_side)} ({', '.join(onnx_side)}); cannot pair them"
        )
    pairs.update(zip(rest_onnx, rest_tfl, strict=True))
    out = []
    for n, (dtype, shape) in onnx_side.items():
        d = details[pairs[n]]
        tfl_shape = [int(x) for x in d.get("shape_signature", d["shape"])]
        transpose = _layout(shape, tfl_shape)
        if transpose is None:
            raise InferenceError(
                f"{name}: ONNX {what} {n!r} {list(shape or ())} does not fit .tflite tensor "
                f"{tfl_names[pairs[n]]!r} {tfl_shape} (neither as it is nor NCHW→NHWC)"
            )
        if np.dtype(d["dtype"]) != dtype:
            raise InferenceError(
                f"{name}: ONNX {what} {n!r} is {dtype} but .tflite tensor {tfl_names[pairs[n]]!r} is "
                f"{np.dtype(d['dtype'])} (no silent casts)"
            )
        out.append(Binding(n, tfl_names[pairs[n]], int(d["index"]), dtype, shape, transpose))
    return tuple(out)


class LiteRtSession:
    """A ``.tflite`` stage run with LiteRT that takes and returns the ONNX stage's tensors."""

    runtime = "litert"

    def __init__(self, tflite: bytes, stage: onnx.ModelProto, threads: int = 1, name: str = "stage") -> None:
        """Load ``tflite`` (converted from ``stage``) and pair its tensors with the ONNX stage's;
        ConfigError when LiteRT is not installed, InferenceError when the bytes do not load or a
        tensor cannot be paired."""
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ConfigError(f"{name}: LiteRT is not installed (pip install 'meshai[litert]')") from None
        self.name = name
        if not tflite:
            raise InferenceError(f"{name}: LiteRT cannot load the .tflite: it is empty")
        n_threads = max(1, min(int(threads), os.cpu_count() or 1))
        try:
            self._interp = Interpreter(model_content=bytes(tflite), num_threads=n_threads)
            self._interp.allocate_tensors()
            signatures = self._interp.get_signature_list()
            sig_in: dict[str, dict[str, Any]] = {}
            sig_out: dict[str, dict[str, Any]] = {}
            if len(signatures) == 1:
                runner = self._interp.get_signature_runner(next(iter(signatures)))
                sig_in, sig_out = runner.get_input_details(), runner.get_output_details()
            in_details = self._interp.get_input_details()
            out_details = self._interp.get_output_details()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with its own messages
            raise InferenceError(f"{name}: LiteRT cannot load the .tflite: {first_line(exc)}") from None
        initializers = {i.name for i in stage.graph.initializer}
        onnx_in = _onnx_boundary([v for v in stage.graph.input if v.name not in initializers], "input", name)
        onnx_out = _onnx_boundary(stage.graph.output, "output", name)
        self._inputs = _bind(onnx_in, in_details, sig_in, "input", name)
        self._outputs = _bind(onnx_out, out_details, sig_out, "output", name)
        self.input_names: tuple[str, ...] = tuple(onnx_in)
        self.output_names: tuple[str, ...] = tuple(onnx_out)
        self.input_dtypes: dict[str, np.dtype[Any] | None] = {n: v[0] for n, v in onnx_in.items()}
        self.input_shapes: dict[str, Dims | None] = {n: v[1] for n, v in onnx_in.items()}
        #: The shape each tflite input is allocated with now (a free batch follows the feeds).
        self._shapes: dict[int, tuple[int, ...]] = {
            int(d["index"]): tuple(int(x) for x in d["shape"]) for d in in_details
        }
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LiteRtSession({self.name!r}, inputs={self.input_names}, outputs={self.output_names})"

    @property
    def bindings(self) -> tuple[tuple[Binding, ...], tuple[Binding, ...]]:
        """How the ONNX inputs and outputs were paired with tflite tensors (for logs and tests)."""
        return self._inputs, self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on checked feeds; every output by ONNX name in the ONNX layout; InferenceError."""
        checked = check_feeds(self.name, feeds, self.input_names, self.input_dtypes, self.input_shapes)
        with self._lock:
            try:
                tensors: dict[int, np.ndarray] = {}
                for b in self._inputs:
                    x = checked[b.onnx_name]
                    tensors[b.index] = np.ascontiguousarray(x.transpose(_NCHW_TO_NHWC)) if b.transpose else x
                resized = [i for i, x in tensors.items() if x.shape != self._shapes[i]]
                for i in resized:
                    self._interp.resize_tensor_input(i, list(tensors[i].shape), strict=True)
                    self._shapes[i] = tensors[i].shape
                if resized:
                    self._interp.allocate_tensors()
                for i, x in tensors.items():
                    self._interp.set_tensor(i, x)
                self._interp.invoke()
                out: dict[str, np.ndarray] = {}
                for b in self._outputs:
                    y = self._interp.get_tensor(b.index)
                    out[b.onnx_name] = np.ascontiguousarray(y.transpose(_NHWC_TO_NCHW)) if b.transpose else y
            except Exception as exc:  # LiteRT's errors are not MeshaiErrors
                raise InferenceError(f"{self.name}: LiteRT failed: {first_line(exc)}") from None
        return out

    def warmup(self, batch: int = 1, runs: int = 1) -> None:
        """Run ``runs`` times on zeros (symbolic dims set to ``batch``) so the first request is not slow."""
        check_min("warm-up batch", batch, 1)
        zeros: dict[str, np.ndarray] = {}
        for b in self._inputs:
            if b.onnx_shape is None:
                raise InferenceError(f"{self.name}: cannot warm up: input {b.onnx_name!r} has no known shape")
            zeros[b.onnx_name] = np.zeros([d if isinstance(d, int) else batch for d in b.onnx_shape], b.dtype)
        for _ in range(max(1, runs)):
            self.run(zeros)
