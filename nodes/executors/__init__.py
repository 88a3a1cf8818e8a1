"""Stage runners for the runtimes a node can have: onnxruntime (CPU, CUDA, TensorRT), ORT Mobile
(``.ort``) and LiteRT (``.tflite``).  Every runner takes and returns tensors in the ONNX stage's names,
dtypes and layout, so stages on different runtimes are interchangeable on the wire (``base``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from typing import Any

from meshai.errors import ConfigError
from nodes.executors.base import RUNTIMES, StageRunner

__all__ = [
    "RUNTIMES",
    "RUNTIMES_FILE",
    "StageRunner",
    "artifact_path",
    "check_runtimes",
    "cut_key",
    "detect_runtimes",
    "planner_artifacts",
]


#: The table of a package's converted artifacts (``meshai.artifacts``).
RUNTIMES_FILE = "runtimes.json"


def cut_key(inputs: Sequence[str], outputs: Sequence[str]) -> str:
    """The name a stage's converted artifacts are filed under in a package: a digest of its cut
    tensors (order-free), which the host that builds the package and the node that runs it both know."""
    text = json.dumps([sorted(inputs), sorted(outputs)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def artifact_path(key: str, runtime: str, precision: str = "fp32") -> str:
    """Where in a package the artifact of cut ``key`` for ``runtime`` lies."""
    if runtime == "ort-mobile":
        return f"runtimes/{key}/ort-mobile.ort"
    if runtime == "litert-fp16":
        return f"runtimes/{key}/litert-fp16.tflite"
    if runtime == "litert":
        return f"runtimes/{key}/litert-{'fp16' if precision == 'fp16' else 'fp32'}.tflite"
    raise ConfigError(f"runtime {runtime!r} takes no converted artifact")


def detect_runtimes() -> tuple[str, ...]:
    """The runtimes this host has, preferred first: onnxruntime, ORT Mobile (onnxruntime loads ``.ort``
    files), LiteRT when ``ai_edge_litert`` is installed (the ``[litert]`` extra)."""
    found = ["onnxruntime", "ort-mobile"]
    if importlib.util.find_spec("ai_edge_litert") is not None:
        found += ["litert", "litert-fp16"]
    return tuple(found)


def check_runtimes(names: Sequence[str]) -> tuple[str, ...]:
    """``--runtime`` names checked against what this host has (ConfigError naming the first problem)."""
    have = detect_runtimes()
    out: list[str] = []
    for n in names:
        if n not in RUNTIMES:
            raise ConfigError(f"unknown runtime {n!r} (known: {', '.join(RUNTIMES)})")
        if n not in have:
            raise ConfigError(f"runtime {n!r} is not installed here (pip install 'meshai[litert]')")
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError("--runtime needs at least one runtime")
    return tuple(out)


def planner_artifacts(table: Mapping[str, Any]) -> dict[str, dict[frozenset[str], bool]]:
    """``runtimes.json`` as the planner's data: per runtime, the op sets of the cuts it was measured on
    and whether it runs them (``litert`` is the fp32 conversion, ``litert-fp16`` the fp16 one)."""
    out: dict[str, dict[frozenset[str], bool]] = {}
    for st in dict(table.get("stages", {})).values():
        ops = frozenset(str(o) for o in st.get("ops", ()))
        for what, a in dict(st.get("artifacts", {})).items():
            runtime = "litert" if what == "litert-fp32" else what
            out.setdefault(runtime, {})[ops] = bool(a.get("ok"))
    return out
