"""``meshai rollout start|status|pause|resume|rollback`` and ``meshai ab start|report|stop``.

Both act on a long-lived deployment (``meshai deploy --name``) through ``meshai.rollout_client``; the
deployment's entry runs the rollout or the test.  Every subcommand takes ``--json`` and the mesh flags.
Imports stay inside the commands, so registering them costs ``meshai node`` nothing at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TypeVar

__all__ = ["add_rollout_parsers", "cmd_ab", "cmd_rollout"]

P = TypeVar("P", bound=argparse.ArgumentParser)

#: How often ``rollout start --follow`` asks for the status.
POLL_S = 1.0


def _fmt(v: object, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v * 100:+.1f} %" if pct else f"{v:.3g}"
    return str(v)


def rollout_table(st: dict[str, Any]) -> str:
    """Status, then one row per step with the gates' figures."""
    from meshai.tables import format_table

    head = (
        f"{st['deployment']}: {st['old_version']} → {st['new_version']}, {st['status']} at "
        f"{st['share'] * 100:.0f} % — {st['reason']}"
    )
    rows = []
    for s in st.get("steps", []):
        g = s.get("gates") or {}
        rows.append(
            [
                f"{s['at']:.1f} s",
                s["action"],
                f"{s['share'] * 100:.0f} %",
                _fmt((g.get("p95") or {}).get("value"), pct=True),
                _fmt((g.get("error_rate") or {}).get("value")),
                _fmt((g.get("drift") or {}).get("value")),
                s["reason"],
            ]
        )
    table = format_table(["at", "action", "share", "p95 vs old", "errors", "drift", "why"], rows)
    return f"{head}\n{table}"


def ab_table(rep: dict[str, Any]) -> str:
    """Per variant: requests, errors, p50/p95, accuracy; then each test's verdict."""
    from meshai.pipeline import percentiles_ms
    from meshai.tables import format_table

    rows = []
    for label in ("A", "B"):
        v = rep["variants"][label]
        lat = percentiles_ms([x / 1e3 for x in v["latencies_ms"]])
        acc = f"{v['correct'] / v['labelled'] * 100:.1f} % of {v['labelled']}" if v["labelled"] else "–"
        rows.append([label, v["version"], v["requests"], v["errors"], lat["p50"], lat["p95"], acc])
    split = rep["split"]
    observed = split["observed_b"]
    lines = [
        f"{rep['deployment']}: B gets {split['share_b'] * 100:.0f} % by {split['by']}"
        + (f" (observed {observed * 100:.1f} %)" if observed is not None else ""),
        format_table(["variant", "version", "requests", "errors", "p50 ms", "p95 ms", "accuracy"], rows),
    ]
    for name, t in rep["tests"].items():
        lines.append(f"{name}: {t['reason']}")
    if rep.get("drift") is not None:
        lines.append(f"prediction drift of B against A: {rep['drift']:.3g} (total variation)")
    if rep.get("png"):
        lines.append(f"plot: {rep['png']}")
    return "\n".join(lines)


def _package(path: str) -> tuple[bytes, str]:
    from meshai.packages import read_signed

    data, manifest = read_signed(path)
    return data, manifest.ref


def cmd_rollout(args: argparse.Namespace) -> int:
    """Start, watch or steer a staged rollout."""
    from meshai.cli import _emit_json, _gather_peers, _mesh, _run
    from meshai.rollout_client import rollout_action, start_rollout

    config = None
    if args.rollout_command == "start":
        from scheduler.rollout import RolloutConfig, parse_duration, parse_fraction, parse_stages

        config = RolloutConfig(
            stages=parse_stages(args.stages),
            bake_s=parse_duration(args.bake),
            max_p95_regression=parse_fraction(args.max_p95_regression, name="--max-p95-regression"),
            max_error_rate=parse_fraction(args.max_error_rate, name="--max-error-rate"),
            max_drift=args.max_drift,
            min_samples=args.min_samples,
        )
        package = _package(args.package)

    async def go() -> dict[str, Any]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            if config is None:
                return await rollout_action(
                    mesh,
                    args.deployment,
                    args.rollout_command,
                    signing_key=getattr(args, "key", None),
                    to_version=getattr(args, "to", None),
                )
            st = await start_rollout(mesh, args.deployment, package, config, by=args.by)
            while args.follow and st.get("final") is None:
                await asyncio.sleep(POLL_S)
                st = await rollout_action(mesh, args.deployment, "status")
                sys.stderr.write(
                    f"meshai rollout: {st['status']} at {st['share'] * 100:.0f} %: {st['reason']}\n"
                )
            return st

    st = _run(go())
    if args.json:
        _emit_json(st)
    else:
        print(rollout_table(st) if "steps" in st else st)
    rolled_back = st.get("final") == "rolled_back" and args.rollout_command == "start"
    return 1 if rolled_back else 0  # start --follow: a rollout that rolled back says so in its exit status


def cmd_ab(args: argparse.Namespace) -> int:
    """Start, report on or stop an A/B test."""
    from meshai.cli import _emit_json, _gather_peers, _mesh, _run
    from meshai.rollout_client import ab_action, start_ab

    share = None
    if args.ab_command == "start":
        from scheduler.rollout import parse_fraction

        label, sep, path = args.variant.partition("=")
        if not sep or label != "B" or not path:
            from meshai.errors import ConfigError

            raise ConfigError(
                f"--variant must be B=PKG (the candidate's signed package), got {args.variant!r}"
            )
        share = parse_fraction(args.split, name="--split")
        package = _package(path)

    async def go() -> dict[str, Any]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            if share is not None:
                return await start_ab(mesh, args.deployment, package, share, args.by)
            return await ab_action(mesh, args.deployment, args.ab_command)

    rep = _run(go())
    if args.ab_command in ("report", "stop") and not args.no_png:
        from meshai.report import write_ab_png

        png = args.png or f"ab-{args.deployment}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        write_ab_png(rep, png)
        rep["png"] = png
    if args.json:
        _emit_json(rep)
    else:
        print(ab_table(rep))
    return 0


def add_rollout_parsers(subparsers: argparse._SubParsersAction[P]) -> None:
    """Register ``rollout`` and ``ab`` on the main CLI's subparsers."""
    from meshai.argtypes import positive_int
    from meshai.cli import _add_mesh_flags

    ro = subparsers.add_parser(
        "rollout", help="staged rollouts of a new model version, with automatic rollback"
    )
    rsub = ro.add_subparsers(dest="rollout_command", required=True)
    start = rsub.add_parser("start", help="roll a signed package out to a deployment in stages")
    start.add_argument("deployment", metavar="DEPLOYMENT")
    start.add_argument("--package", required=True, metavar="PKG", help="the new version, signed")
    start.add_argument("--stages", default="10%,50%,100%", help="shares of traffic (default 10%%,50%%,100%%)")
    start.add_argument("--bake", default="60s", help="how long each stage is watched (default 60s)")
    start.add_argument("--max-p95-regression", default="10%", help="p95 may be this much slower (10%%)")
    start.add_argument("--max-error-rate", default="1%", help="errors per request allowed (1%%)")
    start.add_argument("--max-drift", type=float, default=0.2, help="prediction drift allowed (0.2)")
    start.add_argument("--min-samples", type=positive_int, default=30, help="requests before a gate passes")
    start.add_argument(
        "--by", choices=["request", "robot"], default="request", help="what the share is drawn on"
    )
    start.add_argument("--follow", action="store_true", help="follow it until it completes or rolls back")
    for name, text in (
        ("status", "where a rollout stands, with every step"),
        ("pause", "hold a rollout where it is"),
        ("resume", "carry on; the stage bakes again from now"),
        ("rollback", "send everything back to the old version"),
    ):
        sp = rsub.add_parser(name, help=text)
        sp.add_argument("deployment", metavar="DEPLOYMENT")
        if name == "rollback":
            sp.add_argument(
                "--key",
                metavar="FLEET_KEY",
                help="sign a rollback instruction (needed once a rollout completed)",
            )
            sp.add_argument("--to", metavar="VERSION", help="with --key: the version to go back to")
    for sp in rsub.choices.values():
        _add_mesh_flags(sp)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=cmd_rollout)

    ab = subparsers.add_parser("ab", help="A/B tests of two model versions on live traffic")
    asub = ab.add_subparsers(dest="ab_command", required=True)
    s = asub.add_parser("start", help="route a share of a deployment's traffic to variant B")
    s.add_argument("deployment", metavar="DEPLOYMENT")
    s.add_argument("--variant", required=True, metavar="B=PKG", help="variant B's signed package")
    s.add_argument("--split", default="20%", help="B's share of traffic (default 20%%)")
    s.add_argument(
        "--by", choices=["request", "robot"], default="request", help="split per request or per robot"
    )
    for name, text in (
        ("report", "the measured difference and whether it is significant"),
        ("stop", "end the test"),
    ):
        sp = asub.add_parser(name, help=text)
        sp.add_argument("deployment", metavar="DEPLOYMENT")
        sp.add_argument(
            "--png", metavar="FILE", help="where to plot the two distributions (default ab-NAME-TIME.png)"
        )
        sp.add_argument("--no-png", action="store_true", help="no plot")
    s.set_defaults(no_png=True, png=None)
    for sp in asub.choices.values():
        _add_mesh_flags(sp)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=cmd_ab)
