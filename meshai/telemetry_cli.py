"""``meshai telemetry --broker H:P [--site S] [--wait SECONDS] [--json]``: the fleet's latest state.

``add_telemetry_parser(subparsers)`` registers the command; it sets ``func`` (taking the parsed
``argparse.Namespace``, returning the exit status) and raises ``MeshaiError`` on failure, which the
main CLI prints as one line.  aiomqtt is imported only when the command runs.
``python -m meshai.telemetry_cli telemetry …`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import Any, TypeVar

from meshai.errors import ConfigError, PeerError
from meshai.tables import format_table

__all__ = ["add_telemetry_parser", "cmd_telemetry", "parse_broker"]

P = TypeVar("P", bound=argparse.ArgumentParser)


def parse_broker(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) → (host, port); ConfigError naming the bad value."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"--broker must be HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"--broker port must be in 1..65535, got {port_text!r}")
    return host, port


def _wait(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wait must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 3600):
        raise argparse.ArgumentTypeError(f"wait must be between 0 and 3600 seconds, got {text!r}")
    return value


def _cell(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cmd_telemetry(args: argparse.Namespace) -> int:
    """``meshai telemetry``: collect for ``--wait`` seconds, print a table (or ``--json``)."""
    from meshai.telemetry import FleetView, check_name

    host, port = parse_broker(args.broker)
    site = args.site if args.site == "+" else check_name("site", args.site)

    async def collect() -> tuple[dict[str, Any], int, str | None]:
        async with FleetView(host, port, site) as view:
            await asyncio.sleep(args.wait)
            return {k: v.to_dict() for k, v in view.nodes().items()}, view.rejected, view.error

    nodes, rejected, error = asyncio.run(collect())
    if error is not None:
        raise PeerError(error)
    rows = list(nodes.values())
    if args.json:
        out = {
            "broker": f"{host}:{port}",
            "site": site,
            "wait_s": args.wait,
            "nodes": rows,
            "rejected": rejected,
        }
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=True) + "\n")
        return 0
    if not rows:
        print(f"no nodes reported on {host}:{port} (site {site!r}) within {args.wait:g} s")
        return 0
    table = [
        (
            r["site"],
            r["node"],
            r["status"],
            _cell(r["latency_p50_ms"], ".1f"),
            _cell(r["latency_p95_ms"], ".1f"),
            _cell(r["requests"], "d"),
            _cell(r["error_rate"], ".2%"),
            _cell(r["drift_max"], ".3f"),
        )
        for r in rows
    ]
    headers = ("site", "node", "status", "p50 ms", "p95 ms", "requests", "error rate", "drift max")
    print(format_table(headers, table, right=(3, 4, 5, 6, 7)))
    if rejected:
        print(f"({rejected} message(s) refused: not aggregate telemetry)")
    return 0


def add_telemetry_parser(subparsers: argparse._SubParsersAction[P]) -> P:
    """Register ``telemetry`` on the main CLI's subparsers; return its parser."""
    p = subparsers.add_parser("telemetry", help="the fleet's latest telemetry from an MQTT broker")
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="the MQTT broker to read from")
    p.add_argument("--site", default="+", help="one site, or '+' for every site (default)")
    p.add_argument(
        "--wait", type=_wait, default=2.0, metavar="SECONDS", help="how long to collect (default 2)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_telemetry)
    return p
