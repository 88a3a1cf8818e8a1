"""The ``meshai`` command line: thin over the library (composition layer).

Every reporting command takes ``--json``; errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from meshai.errors import ConfigError, MeshaiError

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"meshai: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# ----------------------------------------------------------------------------------------- plan


def _plan_table(plan: Any) -> str:
    from meshai.tables import format_table, human_bytes

    rows = []
    for s in plan.stages:
        ops = f"{len(s.ops)} ({s.ops[0]} … {s.ops[-1]})" if len(s.ops) > 1 else f"1 ({s.ops[0]})"
        rows.append([s.id, s.node, s.accelerator, s.precision, ops, f"{s.predicted_ms:.3f}", human_bytes(s.bytes_out)])
    table = format_table(
        ["stage", "node", "accelerator", "precision", "ops", "predicted ms", "bytes out"], rows, right=(0, 5, 6)
    )
    p = plan.predicted
    summary = (
        f"objective {plan.objective}: latency {p.latency_ms:.3f} ms, bottleneck {p.bottleneck_ms:.3f} ms "
        f"(≤ {1e3 / p.bottleneck_ms if p.bottleneck_ms else float('inf'):.1f} req/s), "
        f"transfer {human_bytes(p.transfer_bytes)}, energy {p.energy_mj:.2f} mJ per request"
    )
    return f"{table}\n{summary}"


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a model over device profiles offline."""
    from meshai.plan import Constraints
    from meshai.planning import check_plan, load_for_planning, make_plan, parse_pins, swarm_from_flags

    loaded = load_for_planning(args.model, batch=args.batch)
    nodes = swarm_from_flags(args.profiles, args.profiles_file)
    constraints = Constraints(objective=args.objective, stages=args.stages, pins=parse_pins(args.pin or []))
    plan = make_plan(loaded, nodes, constraints)
    out = plan.to_dict()
    if args.check:
        from meshai.tensors import random_inputs

        inputs = random_inputs(loaded.model, batch=args.batch, seed=args.seed)
        out["max_abs_diff"] = check_plan(loaded, plan, inputs)
    if args.json:
        _emit_json(out)
    else:
        print(f"model {loaded.name}: {len(loaded.graph.ops)} compute ops, {loaded.graph.total_flops / 1e9:.2f} GFLOP")
        print(_plan_table(plan))
        if args.check:
            print(f"check: stages run in order vs whole model, max abs diff {out['max_abs_diff']:.3g}")
    return 0


# ---------------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark and print its figures."""
    from meshai import bench

    if args.what == "plan":
        res = bench.bench_plan(cases=args.cases, repeats=args.repeats)
        if args.json:
            _emit_json(res)
        else:
            print(
                f"planning {res['model']} ({res['ops']} ops) on {len(res['devices'])} devices "
                f"({','.join(res['devices'])}): median {res['plan_ms']:.1f} ms "
                f"(latency {res['plan_ms_by_objective']['latency']:.1f} ms, "
                f"throughput {res['plan_ms_by_objective']['throughput']:.1f} ms)"
            )
            print(
                f"quality vs brute force over {res['cases']} random DAGs: worst ratio {res['worst_ratio']:.4f}, "
                f"mean {res['mean_ratio']:.6f}, within 2%: {res['within_2pct']}/{res['cases']}"
            )
        return 0
    raise ConfigError(f"unknown benchmark {args.what!r}")


# ------------------------------------------------------------------------------------- profiles


def cmd_profiles(args: argparse.Namespace) -> int:
    """List the built-in device profiles (and a user file's)."""
    from meshai.capabilities import BUILTIN_PROFILES, load_profiles
    from meshai.tables import format_table, human_bytes

    table = dict(BUILTIN_PROFILES)
    if args.profiles_file:
        table.update(load_profiles(args.profiles_file))
    if args.json:
        _emit_json({name: p.to_dict() for name, p in table.items()})
        return 0
    rows = []
    for name, p in table.items():
        speeds = ", ".join(f"{k} {v / 1e9:g}" for k, v in p.flops.items())
        ops = "all" if isinstance(p.ops, str) else f"{len(p.ops)} types"
        rows.append([name, speeds, human_bytes(p.memory_bytes), ops, f"{p.active_w:g}", p.description])
    print(format_table(["profile", "GFLOP/s", "memory", "ops", "W", "what"], rows))
    return 0


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    p = _Parser(prog="meshai", description="Run one neural network across a swarm of edge devices.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pl = sub.add_parser("plan", help="plan a model over device profiles (offline)")
    pl.add_argument("model", help="an .onnx path or a light model name (squeezenet, resnet50, …)")
    pl.add_argument("--profiles", default="cpu,gpu,npu", help="one device class per node: n0, n1, … (default cpu,gpu,npu)")
    pl.add_argument("--profiles-file", help="JSON/TOML file of extra profiles")
    pl.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    pl.add_argument("--stages", type=_positive_int, help="exactly K stages, each on a different node")
    pl.add_argument("--pin", action="append", metavar="INPUT=NODE", help="keep a raw input on its node (repeatable)")
    pl.add_argument("--batch", type=_positive_int, default=1, help="batch size for symbolic dims (default 1)")
    pl.add_argument("--check", action="store_true", help="run the stages in-process and report max_abs_diff")
    pl.add_argument("--seed", type=int, default=0, help="seed of the random inputs used by --check")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    be = sub.add_parser("bench", help="benchmarks, with ratios against a baseline measured in the same run")
    be.add_argument("what", choices=["plan"])
    be.add_argument("--cases", type=_positive_int, default=300, help="random DAGs for the quality check")
    be.add_argument("--repeats", type=_positive_int, default=5)
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    pr = sub.add_parser("profiles", help="list device profiles")
    pr.add_argument("--profiles-file")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profiles)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; MeshaiError becomes one line on stderr and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MeshaiError as exc:
        sys.stderr.write(f"meshai: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("meshai: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
