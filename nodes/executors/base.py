"""What every stage runner offers, whatever runtime executes it.

A runner is built from a stage's artifact for its runtime (an ONNX model, an ``.ort`` file, a
``.tflite`` file) and speaks the ONNX stage's interface: ``run`` takes the ONNX input names, dtypes and
layout (NCHW for images) and returns the ONNX output names, dtypes and layout.  Converting layouts
(LiteRT is NHWC) is the runner's business, never the wire's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["RUNTIMES", "StageRunner"]

#: The runtimes a node may have, by the name nodes advertise and ``--runtimes`` takes (``litert-fp16``:
#: LiteRT running a stage's fp16 conversion).
RUNTIMES = ("onnxruntime", "ort-mobile", "litert", "litert-fp16")


@runtime_checkable
class StageRunner(Protocol):
    """One loaded stage: checked feeds in, outputs out, by ONNX name (InferenceError on failure)."""

    name: str
    runtime: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; every output by ONNX name, in the ONNX layout."""

    def warmup(self, batch: int = 1, runs: int = 1) -> None:
        """Run on zeros so that the first request is not slow."""
