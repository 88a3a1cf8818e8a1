"""ONNX stage → LiteRT ``.tflite`` (fp32 or fp16) with onnx2tf, on the host that builds packages.

onnx2tf and TensorFlow are heavy (a venv of about 2.6 GB) and pin their own onnx and onnxruntime, so
they live in their own environment, ``.venv-convert/`` at the repository root, made by
``scripts/convert-env.sh`` (``make convert-env``); ``MESHAI_CONVERT_PYTHON`` names another interpreter.
A conversion runs ``meshai/_onnx2tf_worker.py`` by path in that interpreter (so no meshai module, and
nothing of this venv, is imported there), in a working directory that holds a generated calibration
sample, so onnx2tf never downloads one.  One onnx2tf run makes both precisions; the last few results
are kept in memory, so asking for fp16 right after fp32 of the same stage costs nothing.

onnx2tf makes NHWC graphs: a 4-D ONNX tensor [N,C,H,W] becomes [N,H,W,C] in the ``.tflite``, which
``nodes.executors.litert.LiteRtSession`` undoes at the stage boundary.  Both precisions take and
return float32 at the boundary (fp16 stores weights as float16 and dequantizes them).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections import OrderedDict
from pathlib import Path

import onnx

from meshai.errors import ConfigError, ModelError

__all__ = [
    "CONVERT_ENV",
    "CONVERT_TIMEOUT_S",
    "PRECISIONS",
    "convert_python",
    "converter_unavailable",
    "to_tflite",
]

#: The conversion environment ``scripts/convert-env.sh`` makes, at the repository root.
CONVERT_ENV = Path(__file__).resolve().parents[1] / ".venv-convert"
#: Seconds one onnx2tf run may take.
CONVERT_TIMEOUT_S = 300.0
PRECISIONS = ("fp32", "fp16")
_WORKER = Path(__file__).with_name("_onnx2tf_worker.py")
_FIX = "run `make convert-env` (scripts/convert-env.sh), or set MESHAI_CONVERT_PYTHON"
#: Results of the last few conversions: sha256 of the ONNX bytes → precision → .tflite bytes.
_CACHE: OrderedDict[str, dict[str, bytes]] = OrderedDict()
_CACHE_ENTRIES = 8
#: Interpreters found able to convert (a failed probe is asked again: the fix may come meanwhile).
_READY: set[str] = set()


def convert_python() -> Path:
    """The interpreter that converts: ``$MESHAI_CONVERT_PYTHON``, else ``.venv-convert/bin/python``."""
    override = os.environ.get("MESHAI_CONVERT_PYTHON")
    return Path(override) if override else CONVERT_ENV / "bin" / "python"


def _probe(python: str) -> str:
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"no conversion interpreter at {python}: {_FIX}"
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('onnx2tf') is None)"
    try:
        r = subprocess.run([python, "-I", "-c", code], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"conversion interpreter {python} does not run ({type(exc).__name__}): {_FIX}"
    return "" if r.returncode == 0 else f"conversion interpreter {python} has no onnx2tf: {_FIX}"


def converter_unavailable() -> str:
    """Why ``to_tflite`` cannot run here, with the fix; "" when it can (remembered per interpreter)."""
    python = str(convert_python())
    if python in _READY:
        return ""
    why = _probe(python)
    if not why:
        _READY.add(python)
    return why


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _run_onnx2tf(data: bytes, name: str, work: Path, timeout_s: float) -> dict[str, bytes]:
    """Both precisions of the ONNX ``data``, converted in ``work``; ModelError on failure."""
    src = work / "stage.onnx"
    src.write_bytes(data)
    python = convert_python()
    cmd = [str(python), "-I", str(_WORKER), str(src), str(work / "out")]
    # onnx2tf runs the onnxsim command it installed: the environment's bin/ goes first on PATH
    path = os.pathsep.join([str(python.parent), os.environ.get("PATH", os.defpath)])
    env = {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    try:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{name}: onnx2tf took over {timeout_s:g} s") from None
    if r.returncode != 0:
        raise ModelError(f"{name}: onnx2tf could not convert it: {_last_line(r.stderr or r.stdout)}")
    return {p: (work / "out" / f"{p}.tflite").read_bytes() for p in PRECISIONS}


def to_tflite(
    model: onnx.ModelProto,
    precision: str = "fp32",
    work: Path | None = None,
    *,
    timeout_s: float = CONVERT_TIMEOUT_S,
) -> bytes:
    """The ``.tflite`` bytes of one ONNX stage model at ``precision`` ("fp32" or "fp16").

    ``work`` keeps the conversion's files (default: a temporary folder, removed after; a result kept
    in memory from an earlier call converts nothing and writes nothing there).  Raises
    ConfigError for a bad precision or when no converter is installed, ModelError (naming the stage
    and onnx2tf's last error line) when the conversion fails or takes over ``timeout_s``.
    """
    name = model.graph.name or "stage"
    if precision not in PRECISIONS:
        raise ConfigError(f"{name}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    data = model.SerializeToString()
    key = hashlib.sha256(data).hexdigest()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key][precision]
    why = converter_unavailable()
    if why:
        raise ConfigError(f"{name}: cannot convert to .tflite: {why}")
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        made = _run_onnx2tf(data, name, work, timeout_s)
    else:
        with tempfile.TemporaryDirectory(prefix="meshai-tflite-") as tmp:
            made = _run_onnx2tf(data, name, Path(tmp), timeout_s)
    _CACHE[key] = made
    while len(_CACHE) > _CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return made[precision]
