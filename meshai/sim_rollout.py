"""``meshai sim --rollout-to MODEL2``: a staged rollout started mid-stream, scaled to the run.

The new model is packaged and signed as the next version of the sim's package; after ``rollout_at``
results the rollout starts with gates and bake time scaled so that it ends (completed or rolled back)
within a few hundred requests: each stage bakes for the time ``BAKE_REQUESTS`` requests took so far and
gates are judged on ``MIN_SAMPLES`` requests per version.  The JSON's ``rollout`` says how it ended and
why, every step, and what each request ran on (every stage stamps its version on the request).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from meshai.rollouts import MeshVersions, RolloutRunner
from scheduler.rollout import RolloutConfig, parse_fraction, parse_stages

if TYPE_CHECKING:
    from meshai.mesh import Mesh
    from meshai.pipeline import Pipeline
    from meshai.planning import LoadedModel

#: Each stage bakes for as long as this many requests took before the rollout started.
BAKE_REQUESTS = 40
#: Requests per version before a gate may pass.
MIN_SAMPLES = 40
#: ``last_requests_by_version`` counts the versions of this many last requests.
TAIL = 50
#: The rate of the last this many results sets the bake time.
RATE_OVER = 30


class SimRollout:
    """Starts the rollout after ``at`` results and reports it (see the module doc)."""

    def __init__(
        self,
        mesh: Mesh,
        pipe: Pipeline,
        old: tuple[LoadedModel, tuple[bytes, str]],
        new: tuple[LoadedModel, tuple[bytes, str]],
        *,
        at: int,
        stages: str,
        max_p95_regression: str,
        slowdown: float,
    ) -> None:
        self.pipe = pipe
        self.at = at
        self.old_version = old[1][1].rpartition("@")[2]
        self.new_version = new[1][1].rpartition("@")[2]
        self.stages = parse_stages(stages)
        self.max_p95_regression = parse_fraction(max_p95_regression, name="--max-p95-regression")
        self.slowdown = slowdown
        self.versions = MeshVersions(
            mesh, {self.old_version: old, self.new_version: new}, slowdown={self.new_version: slowdown}
        )
        self.runner: RolloutRunner | None = None
        self.error = ""
        self._task: asyncio.Task[None] | None = None

    async def due(self, done: int) -> None:
        """Called after every result: start the rollout once ``done`` reaches ``at``."""
        if done != self.at or self._task is not None:
            return
        # the pace of the last results (the first ones include the stages' start-up)
        times = sorted(t[0] for t in self.pipe.outcomes.get(self.old_version, ()))[-RATE_OVER:]
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 100.0
        bake = round(max(0.2, BAKE_REQUESTS / rate), 3)
        config = RolloutConfig(
            stages=self.stages,
            bake_s=bake,
            max_p95_regression=self.max_p95_regression,
            min_samples=MIN_SAMPLES,
        )
        self.runner = RolloutRunner(
            self.pipe, self.versions, self.new_version, config, tick_s=min(0.25, bake / 4)
        )
        self._task = asyncio.get_running_loop().create_task(self._start(), name="meshai-sim-rollout")

    async def _start(self) -> None:
        assert self.runner is not None
        try:
            await self.runner.start()
        except Exception as exc:  # reported in the JSON, the stream goes on on the old version
            self.error = str(exc)

    async def close(self) -> None:
        """Stop watching (call before the pipeline closes)."""
        if self._task is not None:
            await self._task
        if self.runner is not None:
            await self.runner.stop()

    def report(self, lost: int, versions_of: dict[int, str]) -> dict[str, Any]:
        """The JSON's ``rollout``: final, reason, steps, mixed_version_requests, lost, and per version
        the requests it served (and of the last ``TAIL``); ``stamped_requests`` counts requests every
        stage of whose plan reported the version it ran."""
        trace = list(self.pipe.version_trace)
        served: dict[str, int] = {}
        for v in versions_of.values():
            served[v] = served.get(v, 0) + 1
        tail: dict[str, int] = {}
        for i in sorted(versions_of)[-TAIL:]:
            tail[versions_of[i]] = tail.get(versions_of[i], 0) + 1
        r = self.runner
        status = r.status() if r is not None else {}
        return {
            "from": self.old_version,
            "to": self.new_version,
            "canary_slowdown": self.slowdown,
            "started_after": self.at,
            "final": status.get("final") if not self.error else "failed",
            "status": status.get("status", "not started"),
            "reason": self.error or status.get("reason", "the run ended before the rollout started"),
            "steps": status.get("steps", []),
            "config": status.get("config"),
            "mixed_version_requests": self.pipe.stats.mixed_versions,
            "stamped_requests": sum(1 for t in trace if t[3]),
            "served_by_version": served,
            "last_requests_by_version": tail,
            "lost": lost,
        }
