"""``meshai federate DEPLOYMENT --rounds R --package CURRENT.pkg --key FLEET_KEY --out NEW.pkg …``.

FedAvg rounds of the deployment's head over the connected nodes that hold data (``meshai node --data``),
the next package version signed with the fleet key, and with ``--rollout 10%,50%,100%`` a staged
rollout of it (``meshai.federate`` does the work).  Progress goes to stderr one line per round
(``MESHAI_PROGRESS=0`` silences it); ``--json`` prints the report.  Imports stay inside the command,
so registering it costs ``meshai node`` nothing at start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TypeVar

from meshai.argtypes import positive_int

__all__ = ["add_federate_parser", "cmd_federate"]

P = TypeVar("P", bound=argparse.ArgumentParser)


def _pct(v: float) -> str:
    return f"{v * 100:.1f} %"


def report_table(rep: dict[str, Any]) -> str:
    """Per-node and global accuracy before and after, then the new package."""
    from meshai.tables import format_table

    rows: list[list[object]] = [
        [n, v["train_samples"], v["test_samples"], _pct(v["before"]), _pct(v["after"])]
        for n, v in rep["nodes"].items()
    ]
    g = rep["global"]
    rows.append(
        [
            "global",
            sum(v["train_samples"] for v in rep["nodes"].values()),
            g["test_samples"],
            _pct(g["before"]),
            _pct(g["after"]),
        ]
    )
    pkg = rep["package"]
    lines = [
        f"{rep['deployment']}: {len(rep['rounds'])} FedAvg rounds of head {rep['head']['node']} "
        f"({rep['seconds_per_round']:.2f} s per round)",
        format_table(["node", "train", "test", "before", "after"], rows, right=(1, 2, 3, 4)),
        f"new package {pkg['ref']} signed, written to {pkg['path']} (sha256 {pkg['sha256'][:16]}…)",
    ]
    if rep["rollout"] is not None:
        lines.append(f"staged rollout started: {rep['rollout']}")
    return "\n".join(lines)


def cmd_federate(args: argparse.Namespace) -> int:
    """Run the rounds, write the signed package, optionally start a rollout; print the report."""
    from meshai.cli import _emit_json, _gather_peers, _mesh, _run
    from meshai.federate import FederateConfig, federate, open_current

    config = FederateConfig(
        rounds=args.rounds,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        head=args.head,
    )
    rollout = None
    if args.rollout:
        from scheduler.rollout import RolloutConfig, parse_duration, parse_stages

        rollout = RolloutConfig(stages=parse_stages(args.rollout), bake_s=parse_duration(args.bake))
    current = open_current(args.package, args.key, args.encrypt_for, args.head)

    def progress(line: str) -> None:
        sys.stderr.write(f"meshai federate: {line}\n")
        sys.stderr.flush()

    quiet = os.environ.get("MESHAI_PROGRESS") == "0"

    async def go() -> dict[str, Any]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            return await federate(
                mesh,
                args.deployment,
                current,
                config,
                out=args.out,
                signing_key=args.key,
                version=args.version,
                rollout=rollout,
                progress=None if quiet else progress,
            )

    rep = _run(go())
    if args.json:
        _emit_json(rep)
    else:
        print(report_table(rep))
    return 0


def add_federate_parser(subparsers: argparse._SubParsersAction[P]) -> P:
    """Register ``federate`` on the main CLI's subparsers; return its parser."""
    from meshai.cli import _add_mesh_flags

    p = subparsers.add_parser(
        "federate",
        help="fine-tune a deployment's head on the nodes' own data (FedAvg) into a new signed version",
    )
    p.add_argument("deployment", metavar="DEPLOYMENT", help="a long-lived deployment (meshai deploy --name)")
    p.add_argument("--rounds", type=positive_int, default=5, help="FedAvg rounds (default 5)")
    p.add_argument("--head", metavar="NODE", help="the head layer's ONNX node (default: found automatically)")
    p.add_argument("--epochs", type=positive_int, default=2, help="local epochs per round (default 2)")
    p.add_argument("--lr", type=float, default=0.1, help="local learning rate (default 0.1)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="local minibatch (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nodes' shuffling (default 0)")
    p.add_argument(
        "--package", required=True, metavar="CURRENT.pkg", help="the signed package the deployment runs"
    )
    p.add_argument(
        "--key", required=True, metavar="FLEET_KEY", help="fleet signing key (signs the new version)"
    )
    p.add_argument("--out", required=True, metavar="NEW.pkg", help="where to write the new package")
    p.add_argument("--version", help="the new version (default: the current one's patch level + 1)")
    p.add_argument(
        "--encrypt-for",
        metavar="ID1,ID2|DIR",
        help="identity folders to seal the new version for (needed when the current one is encrypted; "
        "one of them opens it)",
    )
    p.add_argument(
        "--rollout", metavar="STAGES", help="start a staged rollout of the new version, e.g. 10%%,50%%,100%%"
    )
    p.add_argument("--bake", default="60s", help="with --rollout: bake time per stage (default 60s)")
    _add_mesh_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_federate)
    return p
