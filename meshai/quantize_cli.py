"""``meshai quantize MODEL --calibration DATA -o OUT …`` (static INT8, QDQ) and ``meshai digits OUT_DIR``.

``quantize`` calibrates the fp32 model over DATA (one ``.npz`` or a directory of them, ARCHITECTURE.md
layout: first axis = samples), writes the QDQ int8 model to OUT and the calibrated ranges next to it
(``OUT.calibration.json``, what the planner and packages reuse to quantize stages without calibrating
again), then measures what int8 did: file sizes, milliseconds per sample on this machine, accuracy
with ``--eval/--labels``, and top-1 agreement with the fp32 model.  ``digits`` writes the digits case
(a trained MLP with calibration, eval and label files) to try it on.

``compare_int8`` is shared with ``meshai bench quantize``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from meshai.argtypes import positive_int as _positive
from meshai.errors import ConfigError, MeshaiError, first_line
from meshai.models import load_model, model_name, resolve_model
from meshai.progress import Progress
from meshai.tables import format_table, human_bytes

__all__ = ["add_digits_parser", "add_quantize_parser", "cmd_digits", "cmd_quantize", "compare_int8"]

P = TypeVar("P", bound=argparse.ArgumentParser)
Feeds = Mapping[str, np.ndarray]

#: Samples ``quantize`` times each model over (the first ones of the eval or calibration data).
TIMING_SAMPLES = 200


def compare_int8(
    fp32: onnx.ModelProto,
    int8: onnx.ModelProto,
    samples: Sequence[Feeds],
    labels: np.ndarray | None = None,
    timing_samples: int = TIMING_SAMPLES,
    repeats: int = 5,
    ref: Sequence[Feeds] | None = None,
) -> dict[str, Any]:
    """Run both models over ``samples``: ``fp32_ms``, ``int8_ms`` (median ms per sample over the
    first ``timing_samples``, one thread), ``speedup``, ``agreement_pts`` (int8 top-1 equal to fp32's,
    %), and with ``labels`` ``fp32_accuracy``, ``int8_accuracy`` and ``accuracy_delta_pts`` (fp32 −
    int8), else those None.  ``ref``: the fp32 outputs, if already run."""
    from scheduler.quantize import accuracy_pts, drop_pts, run_model, timed_ms

    ref = run_model(fp32, samples) if ref is None else ref
    got = run_model(int8, samples)
    timed = list(samples[:timing_samples])
    fp32_ms = timed_ms(fp32, timed, repeats)
    int8_ms = timed_ms(int8, timed, repeats)
    out: dict[str, Any] = {
        "fp32_ms": round(fp32_ms, 4),
        "int8_ms": round(int8_ms, 4),
        "speedup": round(fp32_ms / int8_ms, 3) if int8_ms > 0 else None,
        "timing_samples": len(timed),
        "agreement_pts": round(100.0 - drop_pts(ref, got), 4),
        "fp32_accuracy": None,
        "int8_accuracy": None,
        "accuracy_delta_pts": None,
    }
    if labels is not None:
        fa, ia = accuracy_pts(ref, labels), accuracy_pts(got, labels)
        out.update(
            fp32_accuracy=round(fa, 4), int8_accuracy=round(ia, 4), accuracy_delta_pts=round(fa - ia, 4)
        )
    return out


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {what} {str(path)!r}: {exc.strerror}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    """``meshai quantize``: calibrate, write the int8 model and its ranges, report what int8 costs."""
    from meshai.planning import read_labels, read_samples
    from scheduler.graph import normalize_model
    from scheduler.quantize import calibrate, quantize, run_model, top1

    if args.labels and not args.eval:
        raise ConfigError("--labels needs --eval (the samples the labels belong to)")
    src = resolve_model(args.model)
    out = Path(args.output)
    if out.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"-o {args.output!r} would overwrite the fp32 model")
    cal_out = Path(args.calibration_out) if args.calibration_out else out.with_suffix(".calibration.json")
    for path, flag in ((out, "-o"), (cal_out, "--calibration-out")):
        if not path.parent.is_dir():
            raise ConfigError(f"{flag} {str(path)!r}: folder {str(path.parent)!r} does not exist")
    model = normalize_model(load_model(src))
    cal_samples = read_samples(args.calibration, model, "--calibration")
    eval_samples = read_samples(args.eval, model, "--eval") if args.eval else None
    ref = run_model(model, eval_samples) if eval_samples is not None else None
    labels = read_labels(args.labels, top1(ref).size) if args.labels and ref is not None else None
    try:
        with Progress("calibrate", total=len(cal_samples)) as bar:
            cal = calibrate(model, cal_samples, per_channel=args.per_channel, progress=bar.advance)
        int8 = quantize(model, cal)
    except MeshaiError as exc:
        raise type(exc)(first_line(exc)) from None
    _write(out, int8.SerializeToString(), "the int8 model")
    _write(cal_out, cal.to_bytes(), "the calibration")
    fp32_bytes, int8_bytes = src.stat().st_size, out.stat().st_size
    report: dict[str, Any] = {
        "model": model_name(args.model),
        "output": str(out),
        "calibration_out": str(cal_out),
        "format": args.format,
        "per_channel": args.per_channel,
        "calibration_samples": len(cal_samples),
        "eval_samples": len(eval_samples) if eval_samples is not None else None,
        "agreement_on": "eval" if eval_samples is not None else "calibration",
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "size_ratio": round(fp32_bytes / int8_bytes, 3),
    }
    samples = eval_samples if eval_samples is not None else cal_samples
    report.update(compare_int8(model, int8, samples, labels, args.timing_samples, ref=ref))
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return 0
    print(quantize_table(report))
    print(f"int8 model written to {out}; calibration to {cal_out}")
    return 0


def quantize_table(r: Mapping[str, Any]) -> str:
    """The ``quantize`` report for people."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} %"

    delta = r["accuracy_delta_pts"]
    rows = [
        (
            "file size",
            human_bytes(r["fp32_bytes"]),
            human_bytes(r["int8_bytes"]),
            f"{r['size_ratio']:.2f}x",
        ),
        ("ms per sample", f"{r['fp32_ms']:.4f}", f"{r['int8_ms']:.4f}", f"{r['speedup']:.2f}x"),
        (
            "accuracy",
            pct(r["fp32_accuracy"]),
            pct(r["int8_accuracy"]),
            "-" if delta is None else f"{delta:.2f} pts lost",
        ),
    ]
    head = f"{r['model']}: {r['format']} int8, {'per-channel' if r['per_channel'] else 'per-tensor'} weights"
    tail = f"top-1 agreement with fp32: {r['agreement_pts']:.2f} % on the {r['agreement_on']} samples"
    return "\n".join([head, format_table(("", "fp32", "int8", "fp32 / int8"), rows, right=(1, 2, 3)), tail])


def cmd_digits(args: argparse.Namespace) -> int:
    """``meshai digits OUT_DIR``: train the digits MLP and write its model and data files."""
    from meshai.digits import train_digits

    if args.federated is not None:
        return _federated_digits(args)
    case = train_digits(args.out_dir, seed=args.seed)
    if args.json:
        sys.stdout.write(json.dumps(case.to_dict(), indent=2, sort_keys=True) + "\n")
        return 0
    rows = [
        ("model", str(case.model)),
        ("calibration", f"{case.calibration} ({case.calibration_samples} samples)"),
        ("eval", f"{case.eval} ({case.eval_samples} samples)"),
        ("labels", str(case.labels)),
        ("fp32 accuracy", f"{case.fp32_accuracy:.2f} %"),
    ]
    print(format_table(("digits", ""), rows))
    return 0


def _federated_digits(args: argparse.Namespace) -> int:
    """``meshai digits OUT_DIR --federated N``: a base model and non-IID per-node data."""
    from meshai.digits import federated_digits

    fed = federated_digits(args.out_dir, args.federated, seed=args.seed)
    if args.json:
        sys.stdout.write(json.dumps(fed.to_dict(), indent=2, sort_keys=True) + "\n")
        return 0
    rows = [
        (f"node {i}", str(p), sum(c), " ".join(f"{k}:{n}" for k, n in enumerate(c)))
        for i, (p, c) in enumerate(zip(fed.nodes, fed.node_classes, strict=True))
    ]
    print(format_table(("", "data (x, y)", "samples", "images per class"), rows))
    print(
        f"base model {fed.model}: {fed.base_accuracy:.2f} % on the held-out {fed.holdout} "
        f"(trained on {fed.base_samples} skewed images)"
    )
    return 0


def add_quantize_parser(subparsers: argparse._SubParsersAction[P]) -> P:
    """Register ``quantize`` on the main CLI's subparsers; return its parser."""
    p = subparsers.add_parser("quantize", help="static INT8 quantization (QDQ) with a measured report")
    p.add_argument("model", metavar="MODEL", help="a light model name or an .onnx path")
    p.add_argument("--calibration", required=True, metavar="DATA", help="an .npz, or a directory of them")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the int8 model")
    p.add_argument("--format", choices=("qdq",), default="qdq", help="QuantizeLinear/DequantizeLinear pairs")
    p.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    p.add_argument("--eval", metavar="DATA", help="samples to measure on (default: the calibration data)")
    p.add_argument("--labels", metavar="LABELS", help="an .npz with 'labels', one per --eval sample row")
    p.add_argument(
        "--calibration-out",
        metavar="CAL.json",
        help="where to write the ranges (default: OUT.calibration.json)",
    )
    p.add_argument(
        "--timing-samples",
        type=_positive,
        default=TIMING_SAMPLES,
        help=f"samples timed (default {TIMING_SAMPLES})",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)
    return p


def add_digits_parser(subparsers: argparse._SubParsersAction[P]) -> P:
    """Register ``digits`` on the main CLI's subparsers; return its parser."""
    p = subparsers.add_parser("digits", help="train the digits MLP and write its model, data and labels")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for digits.onnx and the .npz files")
    p.add_argument("--seed", type=int, default=0, help="training and split seed (default 0)")
    p.add_argument(
        "--federated",
        type=_positive,
        metavar="N",
        help="instead: a base model and label-skewed data for N nodes (node0.npz …, holdout.npz)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_digits)
    return p
