"""Fault injection for ``meshai sim``, as data: what happens to which node after how many requests.

``--kill NODE@N`` (SIGKILL after N results), ``--pause NODE@N:S`` (SIGSTOP for S seconds),
``--partition NODE@N:S`` (cut off the network for S seconds), ``--slow NODE@N:F`` (a paced node
becomes F times slower).  NODE is a node name (``n2``) or ``stage:K``, the node that runs stage K of
the first plan.  Parsing and resolution are pure; the simulator carries faults out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshai.errors import ConfigError

KINDS = ("kill", "pause", "partition", "slow")
_SPEC = re.compile(r"^(?P<node>[A-Za-z0-9_.:-]+)@(?P<at>\d+)(?::(?P<arg>[0-9.]+)(?P<unit>s|ms)?)?$")


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: ``kind`` on ``node`` once ``at`` results have arrived; ``seconds`` (pause, partition)
    or ``factor`` (slow)."""

    kind: str
    node: str
    at: int
    seconds: float = 0.0
    factor: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {"kind": self.kind, "node": self.node, "at": self.at}
        if self.kind in ("pause", "partition"):
            out["seconds"] = self.seconds
        if self.kind == "slow":
            out["factor"] = self.factor
        return out


def parse_fault(kind: str, text: str) -> Fault:
    """``parse_fault("pause", "stage:1@300:4")``; ConfigError names what is wrong."""
    if kind not in KINDS:
        raise ConfigError(f"unknown fault {kind!r} (known: {', '.join(KINDS)})")
    flag = f"--{kind}"
    m = _SPEC.match(text.strip())
    want = {
        "kill": "NODE@N",
        "pause": "NODE@N:SECONDS",
        "partition": "NODE@N:SECONDS",
        "slow": "NODE@N:FACTOR",
    }
    if m is None:
        raise ConfigError(f"bad {flag} {text!r}: expected {want[kind]} (NODE a name or stage:K)")
    node, at, arg, unit = m["node"], int(m["at"]), m["arg"], m["unit"]
    if node.startswith("stage:") and not node[6:].isdigit():
        raise ConfigError(f"bad {flag} {text!r}: stage:K needs a stage number")
    if kind == "kill":
        if arg is not None:
            raise ConfigError(f"bad {flag} {text!r}: expected {want[kind]}")
        return Fault(kind, node, at)
    if arg is None:
        raise ConfigError(f"bad {flag} {text!r}: expected {want[kind]}")
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"bad {flag} {text!r}: {arg!r} is not a number") from None
    if kind == "slow":
        if unit is not None or not 0.01 <= value <= 1000:
            raise ConfigError(f"bad {flag} {text!r}: the factor must be a number in [0.01, 1000]")
        return Fault(kind, node, at, factor=value)
    seconds = value / 1e3 if unit == "ms" else value
    if not 0 < seconds <= 600:
        raise ConfigError(f"bad {flag} {text!r}: the duration must be in (0, 600] seconds")
    return Fault(kind, node, at, seconds=seconds)


def parse_faults(specs: Mapping[str, Iterable[str]]) -> tuple[Fault, ...]:
    """Every fault given on the command line (kind -> specs), ordered by when it fires."""
    faults = [parse_fault(kind, t) for kind, texts in specs.items() for t in texts]
    return tuple(sorted(faults, key=lambda f: (f.at, KINDS.index(f.kind), f.node)))


def resolve(faults: Sequence[Fault], stage_nodes: Sequence[str], names: Sequence[str]) -> tuple[Fault, ...]:
    """Faults with ``stage:K`` replaced by the node of stage K (``stage_nodes``, the first plan's);
    ConfigError for a stage or node that does not exist."""
    out = []
    for f in faults:
        node = f.node
        if node.startswith("stage:"):
            k = int(node[6:])
            if k >= len(stage_nodes):
                raise ConfigError(
                    f"--{f.kind} {node}: the plan has {len(stage_nodes)} stages (0..{len(stage_nodes) - 1})"
                )
            node = stage_nodes[k]
        elif node not in names:
            raise ConfigError(f"--{f.kind} names node {node!r}; the nodes are {', '.join(names)}")
        out.append(replace(f, node=node))
    return tuple(out)
