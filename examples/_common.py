"""The plumbing the examples share: node processes standing in for devices, the command line, the PNG
and how the figures are printed.

Not an example itself: each ``examples/NAME.py`` keeps its model, its swarm's devices, what it
measures, its table and its plot, and hands the rest to these helpers (``from _common import ...``
works because Python puts the script's own folder, ``examples/``, on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from meshai.errors import MeshaiError
from meshai.mesh import Mesh
from meshai.sim import MeshSecrets, NodeProcesses

Report = dict[str, Any]


@contextlib.asynccontextmanager
async def local_swarm(
    nodes: Mapping[str, str], model: Path, model_name: str, extra: Mapping[str, bytes] | None = None
) -> AsyncIterator[tuple[Mesh, tuple[bytes, str]]]:
    """Real ``meshai node`` processes on loopback standing in for devices: one per entry of ``nodes``
    (name → profile), each paced to its profile, with mDNS, mutual TLS and a throwaway mesh CA, node
    identities and fleet signing key.  Yields a ``Mesh`` that has found every node, and the model
    (plus ``extra`` files) as a package signed and encrypted for them, for ``mesh.deploy``."""
    mesh_id = secrets.token_hex(4)  # a private mDNS service type: other swarms stay invisible
    with tempfile.TemporaryDirectory(prefix="meshai-example-") as work:
        sec = MeshSecrets(Path(work))  # throwaway mesh CA, node identities, fleet signing key
        for name in nodes:
            sec.issue(name)
        package = sec.package(model, model_name, extra=extra)
        with NodeProcesses(
            list(nodes),
            list(nodes.values()),
            mesh_id,
            pace=True,
            extra=sec.node_args(),
            identities=sec.identities,
        ):
            async with Mesh(mesh=mesh_id, identity=sec.client) as mesh:
                await mesh.wait_for_peers(len(nodes), timeout=30)
                yield mesh, package


def add_output_flags(p: argparse.ArgumentParser, name: str, quick: str, tables: str = "tables") -> None:
    """``--quick`` (``quick`` says what the small run is), ``--json`` (instead of ``tables``) and
    ``--out`` (default ``examples-out/NAME``), after the example's own flags."""
    p.add_argument("--quick", action="store_true", help=f"a small run ({quick}), as the tests use")
    p.add_argument("--json", action="store_true", help=f"print the figures as JSON instead of {tables}")
    p.add_argument("--out", type=Path, default=Path(f"examples-out/{name}"), help="output folder")


def run_and_report(
    name: str,
    args: argparse.Namespace,
    work: Coroutine[Any, Any, Report],
    plot: Callable[[Report, Any], Any],
    table: Callable[[Report], str],
) -> int:
    """Make ``args.out``, run ``work``, draw ``plot(report, pyplot)``'s figure to ``args.out/NAME.png``
    and print the figures (JSON with ``--json``, else the table and the PNG's path).  A ``MeshaiError``
    is one line on stderr.  Returns the exit status: 0 only where the swarm's outputs matched the
    reference."""
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except BaseException:
        work.close()  # never started: no "was never awaited" warning on top of the error
        raise
    try:
        rep = asyncio.run(work)
    except MeshaiError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    png = save_plot(plot, rep, args.out / f"{name}.png")
    rep["png"] = str(png) if png else None
    print(json.dumps(rep, indent=2) if args.json else table(rep) + (f"\nPNG: {png}" if png else ""))
    return 0 if rep["outputs_match"] else 1


def save_plot(plot: Callable[[Report, Any], Any], rep: Report, path: Path) -> Path | None:
    """The figure ``plot(rep, pyplot)`` draws, laid out and written to ``path``; None, with a note on
    stderr, where matplotlib is not installed.  matplotlib is imported only here, drawing to files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: pip install 'meshai[plot]' for matplotlib", file=sys.stderr)
        return None
    fig = plot(rep, plt)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def verdict(match: bool) -> str:
    """How a table says whether the swarm's outputs matched the reference."""
    return "match" if match else "MISMATCH"
