"""Keeping a deployed pipeline healthy: replan after a lost node, re-admit nodes, hold a latency SLO.

A ``MeshSupervisor`` is what ``Mesh.deploy`` hands its ``Pipeline`` (composition layer).  It gives the
pipeline a plan over the live nodes when one is lost (``plan_without``) and deploys it (``deploy``); in
the background it probes lost nodes and newly advertised ones, offers each that answers to the planner,
and — with an SLO — feeds the per-stage times the nodes measure back into the cost model as speed
factors.  What to do is always decided by the pure policies in ``scheduler.adapt``; every decision is
kept as data (``decisions``) for reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from meshai.errors import MeshaiError, PlanError
from meshai.plan import Constraints, Plan

if TYPE_CHECKING:
    from meshai.mesh import Mesh
    from meshai.pipeline import Generation, Pipeline
    from meshai.planning import LoadedModel, Quantization
    from scheduler.adapt import SloConfig

#: How often the supervisor looks at lost nodes, new adverts and the SLO.
WATCH_INTERVAL_S = 0.5
#: How long one attempt to reach a lost node may take (a frozen node accepts TCP but never says hello).
PROBE_TIMEOUT_S = 2.0
#: The least time between two attempts on the same node.
PROBE_EVERY_S = 1.0
#: Stages predicted faster than this are not used to measure their node's speed.
MIN_MEASURED_STAGE_MS = 1.0


class MeshSupervisor:
    """Replans, re-admits and holds the SLO for one pipeline of ``mesh`` (see the module doc)."""

    def __init__(
        self,
        mesh: Mesh,
        model: LoadedModel,
        constraints: Constraints,
        package: tuple[bytes, str] | None = None,
        quantization: Quantization | None = None,
        *,
        slo: SloConfig | None = None,
        adopt_min_gain: float = 0.15,
    ) -> None:
        self.mesh = mesh
        self.model = model
        self.constraints = constraints
        self.package = package
        self.quantization = quantization
        self.slo = slo
        self.adopt_min_gain = adopt_min_gain
        self.has_package: set[str] = set()  # nodes the package was uploaded to
        self.speeds: dict[str, float] = {}  # measured speed factors (the SLO loop's corrections)
        self.decisions: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._next_try: dict[str, float] = {}
        self._stage_seen: dict[tuple[str, int], tuple[int, float]] = {}  # (deployment, stage) -> served, busy
        self._stage_ms: dict[int, float] = {}
        # plans made ahead for the loss of each node of the current plan: (live nodes, speeds) -> plan
        self._standby: dict[tuple[frozenset[str], tuple[tuple[str, float], ...]], asyncio.Future[Plan]] = {}
        self._latencies_seen = 0
        self._controller: Any = None
        if slo is not None:
            from scheduler.adapt import SloController

            self._controller = SloController(slo)

    # ----- planning

    def _constraints(self, n_nodes: int, speeds: dict[str, float] | None = None) -> Constraints:
        from scheduler.adapt import relax_stages

        base = dataclasses.replace(self.constraints, speed=dict(speeds or {}))
        base = relax_stages(base, n_nodes)
        return self.quantization.constraints(base) if self.quantization is not None else base

    def _plan(self, names: list[str], speeds: dict[str, float] | None = None) -> tuple[Plan, Constraints]:
        plan = self._plan_for(names, self.mesh.capabilities(names), dict(speeds or {}))
        return plan, self._constraints(len(names), speeds)

    def _plan_for(self, names: list[str], caps: list[Any], speeds: dict[str, float]) -> Plan:
        """The pure planner over ``caps`` (safe in a worker thread)."""
        from meshai.planning import make_plan, plan_measured
        from scheduler.adapt import relax_stages

        if self.quantization is not None:
            base = dataclasses.replace(self.constraints, speed=speeds)
            return plan_measured(self.model, caps, relax_stages(base, len(names)), self.quantization)
        return make_plan(self.model, caps, self._constraints(len(names), speeds))

    async def plan_without(self, plan: Plan, lost: frozenset[str]) -> Plan:
        """A plan over the connected nodes other than ``lost`` (PlanError if none is possible): the
        standby plan made for exactly these nodes when the current plan was deployed, or a new one
        (planned in a worker thread: the event loop keeps serving heartbeats meanwhile)."""
        live = [n for n in self.mesh.stage_nodes() if n not in lost]
        if not live:
            raise PlanError(f"no node is left to run {self.model.name!r}")
        key = (frozenset(live), tuple(sorted(self.speeds.items())))
        task = self._standby.get(key)
        if task is not None:
            new = await task  # PlanError is the answer for these nodes, too
            how = "standby plan"
        else:
            caps = self.mesh.capabilities(live)
            new = await asyncio.to_thread(self._plan_for, live, caps, dict(self.speeds))
            how = "planned now"
        self._record("lost", sorted(lost), True, f"replanned over {', '.join(live)} ({how})", plan=new)
        return new

    def _prepare_standby(self, plan: Plan) -> None:
        """Plan ahead, in worker threads, for the loss of each node of ``plan``."""
        self._standby.clear()
        peers = self.mesh.stage_nodes()
        for node in dict.fromkeys(s.node for s in plan.stages):
            live = [n for n in peers if n != node]
            if not live:
                continue
            key = (frozenset(live), tuple(sorted(self.speeds.items())))
            caps = self.mesh.capabilities(live)
            task = asyncio.ensure_future(asyncio.to_thread(self._plan_for, live, caps, dict(self.speeds)))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            self._standby[key] = task

    def nominal_ms(self, plan: Plan) -> dict[int, float]:
        """Each stage's compute time under the nodes' nominal profiles (what a paced node emulates)."""
        from scheduler.adapt import evaluate_plan

        names = list(dict.fromkeys(s.node for s in plan.stages))
        caps = self.mesh.capabilities(sorted(set(names) | set(self.mesh.stage_nodes())))
        ev = evaluate_plan(self.model.graph, caps, self._constraints(len(caps)), plan)
        graph = self.model.graph
        by_ops = {
            frozenset(graph.ops[p].name for p in st.ops): ev.stage_s[i] for i, st in enumerate(ev.stages)
        }
        return {s.id: round(by_ops.get(frozenset(s.ops), s.predicted_ms / 1e3) * 1e3, 6) for s in plan.stages}

    def _compare(self, current: Plan, speeds: dict[str, float]) -> tuple[Plan, Any, Any]:
        """A fresh plan over the connected nodes, and both it and ``current`` costed the same way (a
        current plan that can no longer run counts as infeasible)."""
        from scheduler.adapt import evaluate_plan, infeasible

        live = self.mesh.stage_nodes()
        cand, cons = self._plan(live, speeds)
        caps = self.mesh.capabilities(live)
        try:
            now = evaluate_plan(self.model.graph, caps, cons, current)
        except PlanError as exc:
            now = infeasible(str(exc))
        return cand, now, evaluate_plan(self.model.graph, caps, cons, cand)

    async def deploy(self, pipe: Pipeline, gen: Generation) -> None:
        """Deploy one generation of ``pipe`` (uploading the package to nodes that lack it)."""
        if self.speeds:
            gen.pace_ms = self.nominal_ms(gen.plan)
        await self.mesh._deploy_generation(pipe, gen, self.model, self.package, self.has_package)
        self._prepare_standby(gen.plan)

    def use_version(
        self, pipe: Pipeline, model: LoadedModel, package: tuple[bytes, str] | None, has_package: set[str]
    ) -> None:
        """Another version of the model now serves ``pipe`` (a rollout completed or was reverted): replan
        and redeploy with it from now on (its quantization, if any, is not carried over)."""
        self.model, self.package, self.has_package = model, package, has_package
        self.quantization = None
        self._prepare_standby(pipe.plan)

    # ----- watching

    def start(self, pipe: Pipeline) -> None:
        """Watch lost nodes, new adverts and the SLO in the background until ``stop``."""
        self._prepare_standby(pipe.plan)
        self._task = asyncio.get_running_loop().create_task(
            self._watch(pipe), name=f"meshai-watch {pipe.name}"
        )

    async def stop(self) -> None:
        """Stop watching (standby plans still being made are abandoned)."""
        for t in self._standby.values():
            t.cancel()
        self._standby.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self, pipe: Pipeline) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                await self._rejoin(pipe)
                if self._controller is not None:
                    await self._hold_slo(pipe)
            except MeshaiError as exc:  # a decision that could not be carried out is recorded, not fatal
                self._record("error", [], False, str(exc))

    def _record(self, event: str, nodes: list[str], adopt: bool, reason: str, **extra: Any) -> None:
        entry: dict[str, Any] = {
            "event": event,
            "nodes": nodes,
            "adopt": adopt,
            "reason": reason,
            "at": time.perf_counter(),
        }
        plan = extra.pop("plan", None)
        if isinstance(plan, Plan):
            entry["stages"] = [s.node for s in plan.stages]
        entry.update(extra)
        self.decisions.append(entry)

    async def _rejoin(self, pipe: Pipeline) -> None:
        """Reach lost nodes and new adverts; offer each that answers to the planner."""
        now = time.monotonic()
        names = self.mesh.unreachable()
        due = [n for n in names if self._next_try.get(n, 0.0) <= now]
        if not due:
            return
        for n in due:
            self._next_try[n] = now + PROBE_EVERY_S

        async def probe(name: str) -> str | None:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    return name if await self.mesh.reach(name) else None
            except (MeshaiError, TimeoutError, OSError):
                return None

        back = [n for n in await asyncio.gather(*(probe(n) for n in due)) if n is not None]
        for name in back:
            pipe.on_back(name)
        if back:
            await self._offer(pipe, back)

    async def _offer(self, pipe: Pipeline, nodes: list[str]) -> None:
        """Nodes came back or joined: adopt them if a plan with them is predicted to be better enough."""
        from scheduler.adapt import decide

        try:
            cand, current, candidate = self._compare(pipe.plan, self.speeds)
        except PlanError as exc:
            self._record("joined", nodes, False, str(exc))
            return
        d = decide(current, candidate, self.constraints.objective, min_gain=self.adopt_min_gain)
        self._record("joined", nodes, d.adopt, d.reason, gain=d.gain, plan=cand if d.adopt else None)
        if d.adopt:
            await pipe.replan(cand)

    async def _measure_stages(self, pipe: Pipeline, caps_names: list[str]) -> None:
        """Per-stage mean time per request since the last look, from the nodes' own counters."""
        dep = pipe.stage_deployment
        for node in dict.fromkeys(caps_names):
            with contextlib.suppress(MeshaiError):
                st = await self.mesh.status(node)
                for s in st.get("stages", []):
                    if s.get("deployment") != dep:
                        continue
                    key = (dep, int(s["stage"]))
                    served, busy = int(s["served"]), float(s["busy_s"])
                    prev = self._stage_seen.get(key)
                    self._stage_seen[key] = (served, busy)
                    if prev is not None and served > prev[0]:
                        self._stage_ms[key[1]] = (busy - prev[1]) / (served - prev[0]) * 1e3

    async def _hold_slo(self, pipe: Pipeline) -> None:
        """Feed the controller; when p95 has stayed over the SLO, replan with measured speeds."""
        from scheduler.adapt import decide, measured_speeds

        ctl = self._controller
        new = pipe.stats.latencies_s[self._latencies_seen :]
        self._latencies_seen += len(new)
        for v in new:
            ctl.observe(v * 1e3)
        await self._measure_stages(pipe, list(pipe.nodes))
        now = time.monotonic()
        check = ctl.check(now)
        if not check.due:
            return
        # a stage predicted to take well under a millisecond measures mostly fixed per-request costs
        # (session call, framing), not its node's speed: such stages do not correct the model
        big = {s.id for s in pipe.plan.stages if s.predicted_ms >= MIN_MEASURED_STAGE_MS}
        measured = {k: v for k, v in self._stage_ms.items() if k in big}
        speeds = measured_speeds(pipe.plan, measured, self.speeds)
        try:
            cand, current, candidate = self._compare(pipe.plan, speeds)
        except PlanError as exc:
            ctl.declined(now, str(exc))
            self._record("slo", [], False, str(exc), p95_ms=check.p95_ms)
            return
        assert self.slo is not None
        d = decide(current, candidate, self.constraints.objective, min_gain=self.slo.min_gain)
        slow = {n: round(f, 3) for n, f in speeds.items() if abs(f - 1.0) > 0.05}
        self._record(
            "slo",
            [],
            d.adopt,
            d.reason,
            p95_ms=check.p95_ms,
            speeds=slow,
            gain=d.gain,
            plan=cand if d.adopt else None,
        )
        if not d.adopt:
            ctl.declined(now, d.reason)
            return
        self.speeds = speeds
        await pipe.replan(cand)
        self._stage_ms.clear()
        ctl.applied(time.monotonic())

    def report(self) -> list[dict[str, Any]]:
        """The decisions taken, JSON-ready (``at`` as perf_counter seconds)."""
        return [dict(d) for d in self.decisions]
