"""``meshai batch MODEL --inputs DIR_OR_NPZ --outputs OUT.npz [--backend ray|local] …``: a bulk job.

Inputs are one ``.npz`` (ARCHITECTURE.md layout: one array per ONNX input, first axis = requests) or a
directory of them, concatenated in sorted name order.  ``--backend ray`` runs the batch on a pool of
Ray actors (an embedded local Ray on 127.0.0.1 unless ``--ray-address`` names a cluster); ``--backend
local`` runs it here with one onnxruntime session.  Outputs go to one ``.npz`` in the same layout.

``add_batch_parser(subparsers)`` registers the command; ``python -m meshai.batch_cli batch …`` runs it
alone.  Ray is imported only when ``--backend ray`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from meshai.argtypes import positive_int as _positive
from meshai.errors import ConfigError
from meshai.models import load_model, model_name
from meshai.progress import Progress
from meshai.tables import format_table
from meshai.tensors import input_specs, load_npz, request_slices, save_npz, stack_requests

__all__ = ["add_batch_parser", "cmd_batch", "read_inputs"]

P = TypeVar("P", bound=argparse.ArgumentParser)


def read_inputs(path: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """One ``.npz``, or every ``*.npz`` in a directory (sorted by name) concatenated along the
    requests axis; the keys must be exactly ``names``.  ConfigError names the bad file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npz" and f.is_file())
        if not files:
            raise ConfigError(f"input directory {str(p)!r} holds no .npz files")
        parts = [load_npz(f, names) for f in files]
        out: dict[str, np.ndarray] = {}
        for n in names:
            first = parts[0][n]
            for f, part in zip(files, parts, strict=True):
                a = part[n]
                if a.shape[1:] != first.shape[1:] or a.dtype != first.dtype:
                    raise ConfigError(
                        f"tensor file {str(f)!r}: array {n!r} is {a.dtype}{list(a.shape[1:])} per request, "
                        f"but {str(files[0])!r} has {first.dtype}{list(first.shape[1:])}"
                    )
            out[n] = np.concatenate([part[n] for part in parts])
        return out
    if not p.exists():
        raise ConfigError(f"--inputs {str(p)!r} does not exist")
    return load_npz(p, names)


def cmd_batch(args: argparse.Namespace) -> int:
    """``meshai batch``: run every request of the inputs, write the outputs, report throughput."""
    model = load_model(args.model)
    model_bytes = model.SerializeToString()
    names = [s.name for s in input_specs(model)]
    requests = request_slices(read_inputs(args.inputs, names))
    if not requests:
        raise ConfigError(f"--inputs {args.inputs!r} holds no requests")
    if args.ray_address and args.backend != "ray":
        raise ConfigError("--ray-address needs --backend ray")
    n = len(requests)
    chunks = (n + args.chunk - 1) // args.chunk
    retried = 0
    actors: int | None = None
    with Progress(f"batch/{args.backend}", total=n) as bar:
        if args.backend == "ray":
            from scheduler.ray_backend import RayBackend

            actors = args.actors
            with RayBackend(address=args.ray_address, num_cpus=args.num_cpus, actors=args.actors) as be:
                rmodel = be.load(model_bytes)
                t0 = time.perf_counter()
                outputs = rmodel.run_batch(requests, chunk=args.chunk, progress=bar.advance)
                seconds = time.perf_counter() - t0
                retried = rmodel.last_stats.retried_chunks
        else:
            from nodes.executor import StageSession

            session = StageSession(model_bytes, threads=args.threads, name=model_name(args.model))
            t0 = time.perf_counter()
            outputs = []
            for r in requests:
                outputs.append(session.run(r))
                bar.advance()
            seconds = time.perf_counter() - t0
    stacked = stack_requests(outputs)
    save_npz(args.outputs, stacked)
    report: dict[str, Any] = {
        "model": model_name(args.model),
        "requests": n,
        "backend": args.backend,
        "seconds": seconds,
        "throughput_rps": n / seconds if seconds > 0 else 0.0,
        "outputs": str(args.outputs),
        "actors": actors,
        "chunks": chunks if args.backend == "ray" else None,
        "retried_chunks": retried,
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return 0
    rows = [
        (
            report["model"],
            args.backend,
            n,
            f"{seconds:.2f}",
            f"{report['throughput_rps']:.1f}",
            "-" if actors is None else actors,
            "-" if report["chunks"] is None else report["chunks"],
            retried,
        )
    ]
    headers = ("model", "backend", "requests", "seconds", "req/s", "actors", "chunks", "retried")
    print(format_table(headers, rows, right=(2, 3, 4, 5, 6, 7)))
    print(f"outputs written to {args.outputs}")
    return 0


def add_batch_parser(subparsers: argparse._SubParsersAction[P]) -> P:
    """Register ``batch`` on the main CLI's subparsers; return its parser."""
    p = subparsers.add_parser("batch", help="run a bulk job of requests locally or on Ray")
    p.add_argument("model", metavar="MODEL", help="a light model name or an .onnx path")
    p.add_argument("--inputs", required=True, metavar="DIR_OR_NPZ", help="an .npz, or a directory of them")
    p.add_argument("--outputs", required=True, metavar="OUT.npz", help="where to write the outputs")
    p.add_argument("--backend", choices=("ray", "local"), default="ray")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS", help="a Ray cluster (default: local)")
    p.add_argument("--actors", type=_positive, default=2, help="Ray actors (default 2)")
    p.add_argument("--num-cpus", type=_positive, default=2, help="CPUs of the embedded Ray (default 2)")
    p.add_argument("--threads", type=_positive, default=1, help="onnxruntime threads (local backend)")
    p.add_argument("--chunk", type=_positive, default=16, help="requests per Ray task (default 16)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_batch)
    return p
