"""Carrying out ``meshai sim``'s faults on real node processes (composition layer).

``Chaos`` fires each ``meshai.faults.Fault`` once enough results have arrived: SIGKILL, SIGSTOP and a
later SIGCONT, a partition (the node's link down in its network namespace, or — on loopback — its link
emulator held down by SIGUSR1 until SIGUSR2), or a ``slow`` control to a paced node.  Leaving the
block heals every partition and continues every paused node at once.  ``report`` says what was done
and, per fault, how long the pipeline took to serve again from a new plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meshai.errors import PeerError
from meshai.faults import Fault

if TYPE_CHECKING:
    from meshai.mesh import Mesh
    from meshai.pipeline import Pipeline
    from meshai.sim import NodeProcesses


class Chaos:
    """Fires faults by result count; undoes the temporary ones on exit."""

    def __init__(
        self, faults: Sequence[Fault], procs: NodeProcesses, mesh: Mesh, network: Any = None
    ) -> None:
        self.pending = sorted(faults, key=lambda f: f.at)
        self.procs = procs
        self.mesh = mesh
        self.network = network
        self.fired: list[dict[str, Any]] = []
        self._undo: dict[str, tuple[asyncio.TimerHandle, Any]] = {}

    async def __aenter__(self) -> Chaos:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for handle, undo in list(self._undo.values()):
            handle.cancel()
            with contextlib.suppress(Exception):
                undo()
        self._undo.clear()

    async def due(self, results: int, pipe: Pipeline) -> None:
        """Fire every fault whose turn has come after ``results`` results."""
        while self.pending and self.pending[0].at <= results:
            await self._fire(self.pending.pop(0), pipe)

    async def _fire(self, f: Fault, pipe: Pipeline) -> None:
        loop = asyncio.get_running_loop()
        entry: dict[str, Any] = {
            **f.to_dict(),
            "t": time.perf_counter(),
            "generation": max(g.number for g in pipe.all_generations()),
        }
        if f.kind == "kill":
            self.procs.kill(f.node, signal.SIGKILL)
        elif f.kind == "pause":
            self.procs.kill(f.node, signal.SIGSTOP)
            self._later(f, loop, lambda: self.procs.kill(f.node, signal.SIGCONT))
        elif f.kind == "partition":
            if self.network is not None:
                self.network.partition(f.node)
                self._later(f, loop, lambda: self.network.heal(f.node))
            else:
                self.procs.kill(f.node, signal.SIGUSR1)  # the node's link emulator holds its link down
                self._later(f, loop, lambda: self.procs.kill(f.node, signal.SIGUSR2))
        elif f.kind == "slow":
            try:
                reply = await self.mesh.pool.control(f.node, "slow", {"factor": f.factor})
                entry["ok"] = reply.ok
                if not reply.ok:
                    entry["error"] = str(reply.body.get("error"))
            except PeerError as exc:
                entry["ok"], entry["error"] = False, str(exc)
        self.fired.append(entry)

    def _later(self, f: Fault, loop: asyncio.AbstractEventLoop, undo: Any) -> None:
        def run() -> None:
            self._undo.pop(f.node, None)
            with contextlib.suppress(ProcessLookupError, OSError):
                undo()

        self._undo[f.node] = (loop.call_later(f.seconds, run), undo)

    def report(self, pipe: Pipeline) -> list[dict[str, Any]]:
        """Each fault fired, with ``recovery_s``: from the fault to the first result of a plan made
        after it (a canary already serving does not count) (None when no new plan served, e.g. a ``slow`` the SLO loop did not act on)."""
        out = []
        for e in self.fired:
            after = [g for g in pipe.all_generations() if g.number > e["generation"] and g.first_result_at]
            first = min((g.first_result_at for g in after if g.first_result_at is not None), default=None)
            row = {k: v for k, v in e.items() if k not in ("t", "generation")}
            row["recovery_s"] = None if first is None else round(first - e["t"], 4)
            out.append(row)
        return out
