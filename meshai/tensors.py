"""Tensors a model takes and gives: input specs, deterministic random inputs, ``.npz`` files, diffs.

The ``.npz`` layout (ARCHITECTURE.md): one array per ONNX input or output, keyed by its ONNX name; the
first axis indexes requests, and each slice along it is exactly the tensor one request feeds or
returns, its own batch dimension included.  So a file of R requests for an input ``x`` of shape
``(1, 3, 224, 224)`` holds ``x`` with shape ``(R, 1, 3, 224, 224)``.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import helper

from meshai.errors import ConfigError, ModelError, check_min

__all__ = [
    "InputSpec",
    "input_specs",
    "load_npz",
    "max_abs_diff",
    "random_inputs",
    "request_slices",
    "save_npz",
    "stack_requests",
]

#: Integer inputs are drawn from [0, INT_HIGH): valid as indices, class ids and small counts.
INT_HIGH = 10


class InputSpec(NamedTuple):
    """A real graph input: ONNX name, numpy dtype, shape (symbolic dims as strings, None if unknown)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str, ...] | None


def _np_dtype(elem_type: int, name: str) -> np.dtype[Any]:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise ModelError(
            f"input {name!r} has ONNX element type {elem_type}, which numpy cannot hold"
        ) from None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real graph inputs in order (initializers and node outputs listed as inputs, as IR-3
    models do, are left out); non-tensor inputs raise ModelError."""
    g = model.graph
    skip = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    skip |= {o for n in g.node for o in n.output if o}
    specs: list[InputSpec] = []
    for v in g.input:
        if v.name in skip:
            continue
        if not v.type.HasField("tensor_type"):
            raise ModelError(f"input {v.name!r} is not a tensor ({v.type.WhichOneof('value')})")
        tt = v.type.tensor_type
        shape: tuple[int | str, ...] | None = None
        if tt.HasField("shape"):
            dims: list[int | str] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    dims.append(d.dim_param or "?")
            shape = tuple(dims)
        specs.append(InputSpec(v.name, _np_dtype(tt.elem_type, v.name), shape))
    return specs


def _random_array(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "f" or dtype.name in ("bfloat16",) or dtype.name.startswith("float8"):
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind in "OUS":
        codes = rng.integers(0, INT_HIGH, size=shape)
        return np.vectorize(lambda c: f"s{c}", otypes=[object])(codes) if codes.size else codes.astype(object)
    raise ConfigError(f"cannot make random values of dtype {dtype}")


def random_inputs(
    model: onnx.ModelProto, batch: int = 1, seed: int = 0, requests: int | None = None
) -> dict[str, np.ndarray]:
    """Deterministic random tensors for every real input: floats standard normal, ints in
    [0, INT_HIGH), bools fair coins; symbolic dims become ``batch``.  With ``requests`` each array gets
    a leading requests axis of that size (the ``.npz`` layout).  The same arguments give the same
    arrays; an input of unknown rank raises ConfigError."""
    check_min("batch", batch, 1)
    if requests is not None and requests < 0:
        raise ConfigError(f"requests must be >= 0, got {requests}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in input_specs(model):
        if spec.shape is None:
            raise ConfigError(f"input {spec.name!r} has no shape in the model: give its values in a file")
        dims = tuple(d if isinstance(d, int) else batch for d in spec.shape)
        if requests is not None:
            dims = (requests, *dims)
        out[spec.name] = _random_array(rng, spec.dtype, dims)
    return out


def _request_count(tensors: Mapping[str, np.ndarray], what: str) -> int:
    """The common first-axis length, or ConfigError naming the tensors that disagree."""
    count: int | None = None
    first = ""
    for name, arr in tensors.items():
        if arr.ndim == 0:
            raise ConfigError(f"{what}: array {name!r} is a scalar; its first axis must index requests")
        if count is None:
            count, first = int(arr.shape[0]), name
        elif arr.shape[0] != count:
            raise ConfigError(
                f"{what}: array {name!r} holds {arr.shape[0]} requests but {first!r} holds {count}"
            )
    return count or 0


def load_npz(
    path: str | os.PathLike[str], expected_names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of per-request tensors; with ``expected_names`` the keys must be exactly those
    (returned in that order).  A missing file, a file that is not an npz, missing or unknown keys and
    first axes of different lengths raise ConfigError naming the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tensor file {str(p)!r} does not exist")
    try:
        data = np.load(p, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ConfigError(f"tensor file {str(p)!r} is a single .npy array, not an .npz of named arrays")
        with data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"tensor file {str(p)!r} is not a readable .npz: {exc}") from None
    what = f"tensor file {str(p)!r}"
    if expected_names is not None:
        missing = [n for n in expected_names if n not in arrays]
        if missing:
            raise ConfigError(
                f"{what} lacks array {missing[0]!r} (has: {', '.join(sorted(arrays)) or 'nothing'})"
            )
        unknown = [k for k in arrays if k not in set(expected_names)]
        if unknown:
            raise ConfigError(
                f"{what} has array {unknown[0]!r}, which is not one of {', '.join(expected_names)}"
            )
        arrays = {n: arrays[n] for n in expected_names}
    _request_count(arrays, what)
    return arrays


def save_npz(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (first axis = requests) to exactly ``path`` as an uncompressed ``.npz``;
    the file appears whole or not at all.  Scalars, object arrays and unequal request counts raise
    ConfigError."""
    p = Path(path)
    arrays = {str(k): np.asanyarray(v) for k, v in tensors.items()}
    _request_count(arrays, f"tensors for {str(p)!r}")
    for k, a in arrays.items():
        if a.dtype.kind == "O":
            raise ConfigError(f"tensor {k!r} has dtype object, which .npz files cannot hold safely")
        if not k:
            raise ConfigError("a tensor name in an .npz must not be empty")
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for k, a in arrays.items():
                with zf.open(k + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, a, allow_pickle=False)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def request_slices(tensors: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split per-request stacked tensors into one feed dict per request (views, not copies)."""
    n = _request_count(tensors, "tensors")
    return [{k: v[i] for k, v in tensors.items()} for i in range(n)]


def stack_requests(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of ``request_slices``: stack per-request dicts along a new first axis.  Requests with
    different keys, shapes or dtypes raise ConfigError naming the request and tensor; none gives {}."""
    if not requests:
        return {}
    keys = list(requests[0])
    for i, r in enumerate(requests):
        if set(r) != set(keys):
            extra = sorted(set(r) ^ set(keys))
            raise ConfigError(f"request {i} has different tensors from request 0 (differs in {extra[0]!r})")
    out: dict[str, np.ndarray] = {}
    for k in keys:
        first = np.asarray(requests[0][k])
        for i, r in enumerate(requests):
            a = np.asarray(r[k])
            if a.shape != first.shape or a.dtype != first.dtype:
                raise ConfigError(
                    f"tensor {k!r} of request {i} is {a.dtype}{list(a.shape)}, "
                    f"but request 0's is {first.dtype}{list(first.shape)}"
                )
        out[k] = np.stack([np.asarray(r[k]) for r in requests])
    return out


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
        return 0.0 if bool(np.all(a == b)) else math.inf
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        if a.dtype.kind == "b" or b.dtype.kind == "b":
            return float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64))))
        both_signed = a.dtype.kind == "i" or b.dtype.kind == "i"
        wide = np.int64 if both_signed else np.uint64
        hi = np.maximum(a.astype(wide), b.astype(wide))
        lo = np.minimum(a.astype(wide), b.astype(wide))
        return float(np.max(hi - lo))
    x = a.astype(np.complex128) if a.dtype.kind == "c" or b.dtype.kind == "c" else a.astype(np.float64)
    y = b.astype(x.dtype)
    fx, fy = np.isfinite(x), np.isfinite(y)
    if bool(np.any(fx != fy)):
        return math.inf
    # where both are non-finite they agree only when equal (inf == inf) or both NaN
    nonfinite = ~fx
    if bool(np.any(nonfinite)):
        same = (x[nonfinite] == y[nonfinite]) | (np.isnan(x[nonfinite]) & np.isnan(y[nonfinite]))
        if not bool(np.all(same)):
            return math.inf
    if not bool(np.any(fx)):
        return 0.0
    return float(np.max(np.abs(x[fx] - y[fx])))


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Largest absolute elementwise difference over the keys both hold (0.0 if none): inf where shapes
    differ or a value is finite on one side only; NaN matches NaN and inf matches an equal inf."""
    worst = 0.0
    for k in a:
        if k in b:
            worst = max(worst, _diff(np.asarray(a[k]), np.asarray(b[k])))
    return worst
