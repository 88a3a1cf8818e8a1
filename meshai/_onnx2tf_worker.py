"""Convert one ONNX file to ``.tflite`` with onnx2tf; runs in ``.venv-convert``, never in meshai's venv.

Usage: ``python -I _onnx2tf_worker.py MODEL.onnx OUT_DIR`` (run by path, so that no meshai module is
imported: this file needs only the standard library, numpy and onnx2tf).  Writes ``OUT_DIR/fp32.tflite``
and ``OUT_DIR/fp16.tflite`` (onnx2tf makes both in one run).  The working directory must be writable:
onnx2tf reads its calibration sample from there, and this script writes a generated one first so that
onnx2tf never downloads it.  Exits 0 when both files are written, else non-zero with the cause as the
last line of stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: onnx2tf downloads this file from the internet when it is not in the working directory.
CALIBRATION_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
#: onnx2tf's output file suffix per precision.
SUFFIX = {"fp32": "_float32.tflite", "fp16": "_float16.tflite"}


def write_calibration(workdir: Path) -> None:
    """A plausible calibration sample (20 images, 128×128×3, values in [0, 1]) in ``workdir``."""
    import numpy as np

    path = workdir / CALIBRATION_FILE
    if not path.is_file():
        rng = np.random.default_rng(0)
        np.save(path, rng.random((20, 128, 128, 3), dtype=np.float32))


def convert(src: Path, out: Path) -> None:
    """Convert ``src`` with onnx2tf and write ``out/fp32.tflite`` and ``out/fp16.tflite``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # conversion needs no GPU; TF probing one is slow
    write_calibration(Path.cwd())
    import onnx2tf

    out_dir = out / "onnx2tf"
    onnx2tf.convert(
        input_onnx_file_path=str(src),
        output_folder_path=str(out_dir),
        copy_onnx_input_output_names_to_tflite=True,
        non_verbose=True,
        verbosity="error",
    )
    for precision, suffix in SUFFIX.items():
        made = out_dir / f"{src.stem}{suffix}"
        if not made.is_file():
            raise RuntimeError(f"onnx2tf wrote no {made.name}")
        (out / f"{precision}.tflite").write_bytes(made.read_bytes())


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    if len(argv) != 2:
        print("usage: _onnx2tf_worker.py MODEL.onnx OUT_DIR", file=sys.stderr)
        return 2
    try:
        convert(Path(argv[0]), Path(argv[1]))
    except BaseException as exc:  # onnx2tf exits via sys.exit on some failures
        text = str(exc).strip()
        line = text.splitlines()[-1] if text else type(exc).__name__
        print(f"{type(exc).__name__}: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
