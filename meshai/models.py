"""Models by name: a path to an ``.onnx`` file, or a light model that ships in the onnx wheel."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from meshai.errors import ModelError

LIGHT_MODELS: tuple[str, ...] = (
    "squeezenet",
    "resnet50",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "shufflenet",
    "bvlc_alexnet",
    "vgg19",
    "zfnet512",
)

#: The largest model file meshai reads by default (protobuf's own 2 GiB cap is lower still).
MAX_MODEL_BYTES = 1 << 30


def light_model_dir() -> Path:
    """The folder of light models inside the installed onnx wheel."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """Turn a model name or path into an existing file path, or raise ModelError."""
    s = os.fspath(spec)
    if s in LIGHT_MODELS:
        p = light_model_dir() / f"light_{s}.onnx"
        if not p.is_file():
            raise ModelError(f"light model {s!r} is not in this onnx wheel (looked for {p})")
        return p
    p = Path(s)
    if p.is_file():
        return p
    if p.suffix == "" and os.sep not in s:
        raise ModelError(
            f"unknown model {s!r}: not a file, and not a light model ({', '.join(LIGHT_MODELS)})"
        )
    raise ModelError(f"model file {s!r} does not exist")


def load_model(spec: str | os.PathLike[str], max_bytes: int = MAX_MODEL_BYTES) -> onnx.ModelProto:
    """Load an ONNX model by name or path; missing, oversized or corrupt files raise ModelError."""
    path = resolve_model(spec)
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelError(f"model file {str(path)!r} is {size} bytes, over the limit of {max_bytes}")
    return model_from_bytes(path.read_bytes(), str(path))


def model_from_bytes(data: bytes, what: str = "model") -> onnx.ModelProto:
    """Parse serialized ONNX bytes; anything that is not a usable ONNX model raises ModelError."""
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise ModelError(f"{what} is not a valid ONNX file: {exc}") from None
    if not m.HasField("graph") or len(m.graph.node) == 0:
        raise ModelError(f"{what} is not a valid ONNX file: it has no graph nodes")
    if len(m.graph.output) == 0:
        raise ModelError(f"{what} has no graph outputs")
    return m


def model_name(spec: str | os.PathLike[str]) -> str:
    """A short display name for a model spec."""
    s = os.fspath(spec)
    return s if s in LIGHT_MODELS else Path(s).stem
