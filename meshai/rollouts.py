"""Running a staged rollout, or an A/B test, on a live pipeline (composition layer).

``scheduler.rollout`` decides; this module measures and carries the decisions out on a ``Pipeline``:

* the new version is planned and deployed as a whole generation beside the serving one (a
  ``VersionDeployer`` knows how: ``Mesh`` for pipelines it owns, the node agent for long-lived
  deployments it hosts), and the pipeline sends the stage's share of new requests to it — each request
  runs wholly on one generation, so on one version, and every stage stamps the version it ran on the
  request (``Pipeline.stats.mixed_versions`` counts any request whose stamps disagree: it must stay 0);
* every ``tick_s`` the runner reads both versions' outcomes over the current stage's window
  (``Pipeline.version_window``) and asks ``scheduler.rollout.decide``;
* ``advance`` changes the share; ``complete`` promotes the new version (the old one stays loaded as
  ``previous``, and the nodes' stores activate the new version: from then on it is the highest, and
  going back needs the operator's signed rollback instruction); ``rollback`` sends every new request to
  the old version again while the canary finishes what it holds — no request is dropped.  The old
  version was never deactivated in the stores, so an automatic rollback needs no signature.

Drift gate: the new version's predicted-class distribution against the old version's over the same
window (total variation, as ``meshai.drift`` measures categorical drift).  Requests are split at random,
so both versions see the same inputs; a difference is the model's.  It is judged only once each side
holds at least ``DRIFT_SAMPLES_PER_CLASS`` samples per class seen (the estimate's noise falls with
that), else it does not block.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshai.errors import DeploymentError, MeshaiError
from meshai.pipeline import percentiles_ms
from scheduler import rollout as policy
from scheduler.rollout import Decision, RolloutConfig, RolloutState, VersionMetrics

if TYPE_CHECKING:
    from meshai.mesh import Mesh
    from meshai.peers import PeerPool
    from meshai.pipeline import Generation, Pipeline, VersionWindow
    from meshai.planning import LoadedModel

__all__ = [
    "ABTest",
    "MeshVersions",
    "RolloutRunner",
    "VersionDeployer",
    "activate_everywhere",
    "prediction_drift",
    "serve_beside",
]

#: Samples per observed class each version needs before the drift gate is judged.
DRIFT_SAMPLES_PER_CLASS = 10


class VersionDeployer(Protocol):
    """How a pipeline's host brings up another version of its model."""

    async def deploy_version(self, pipe: Pipeline, version: str) -> Generation:
        """Plan ``version`` over the pipeline's nodes and deploy it as a new generation (not serving
        yet); DeploymentError/PlanError say why not."""

    async def confirm(self, pipe: Pipeline, version: str) -> None:
        """``version`` now serves everything: it becomes the version the host replans with after a lost
        node, and the nodes' stores activate it."""


def prediction_drift(old: VersionWindow, new: VersionWindow) -> float | None:
    """Total variation between the two versions' predicted-class distributions, or None while either
    holds fewer than ``DRIFT_SAMPLES_PER_CLASS`` samples per class seen."""
    classes = set(old.predicted) | set(new.predicted)
    need = DRIFT_SAMPLES_PER_CLASS * max(1, len(classes))
    if len(old.predicted) < need or len(new.predicted) < need:
        return None
    a, b = collections.Counter(old.predicted), collections.Counter(new.predicted)
    na, nb = len(old.predicted), len(new.predicted)
    return round(0.5 * sum(abs(a[k] / na - b[k] / nb) for k in classes), 6)


async def serve_beside(
    pipe: Pipeline, deployer: VersionDeployer, version: str, share: float, by: str, salt: str
) -> Generation:
    """Deploy ``version`` as a whole generation and serve ``share`` of new requests with it, drawn by
    ``by`` with ``salt`` (the generation is released again if it cannot serve)."""
    gen = await deployer.deploy_version(pipe, version)
    try:
        pipe.start_variant(gen, share, by, salt=salt)
    except MeshaiError:
        await pipe.discard(gen)
        raise
    return gen


def _metrics(w: VersionWindow, drift: float | None = None) -> VersionMetrics:
    return VersionMetrics(requests=w.requests, errors=w.errors, p95_ms=w.p95_ms(), drift=drift)


class RolloutRunner:
    """One staged rollout of ``new_version`` on ``pipe`` (see the module doc).  ``start`` deploys the
    canary and begins; ``pause`` / ``resume`` / ``rollback`` are the operator's; ``status`` reports."""

    def __init__(
        self,
        pipe: Pipeline,
        deployer: VersionDeployer,
        new_version: str,
        config: RolloutConfig,
        *,
        tick_s: float = 0.5,
        by: str = "request",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipe = pipe
        self.deployer = deployer
        self.old_version = pipe.version
        self.new_version = new_version
        self.config = config
        self.tick_s = tick_s
        self.by = by
        self.clock = clock
        self.state = RolloutState()
        self.steps: list[dict[str, Any]] = []  # every decision that changed the state, with figures
        self.last: dict[str, Any] = {}  # the latest decision (holds included)
        self.error = ""
        self._t0 = clock()
        self._window_since = time.perf_counter()  # the current stage's window, in pipeline time
        self._task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    # ----- life cycle

    async def start(self) -> None:
        """Deploy the new version beside the old one and send the first stage's share to it."""
        if self.new_version == self.old_version:
            raise DeploymentError(f"{self.pipe.name!r} already runs version {self.new_version!r}")
        # the old version's full-load p95, taken before the canary's deployment loads the nodes
        n = self.config.min_samples
        recent = [
            r[1] for r in list(self.pipe.outcomes.get(self.old_version, ()))[-2 * n :] if r[1] is not None
        ]
        pre = percentiles_ms(recent)["p95"] if len(recent) >= n else None
        await serve_beside(
            self.pipe, self.deployer, self.new_version, 0.0, self.by, f"{self.pipe.name}@{self.new_version}"
        )
        self._apply(*policy.start(self.config, self._now(), pre))
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"meshai-rollout {self.pipe.name}"
        )

    async def stop(self) -> None:
        """Stop watching (the pipeline keeps whatever share it has)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the rollout completes or rolls back; its status."""
        async with asyncio.timeout(timeout):
            await self.done.wait()
        return self.status()

    def _now(self) -> float:
        return self.clock() - self._t0

    async def _loop(self) -> None:
        while not self.state.terminal:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except MeshaiError as exc:  # a decision that could not be carried out ends the rollout
                self.error = str(exc)
                await self._carry(*policy.rollback(self.state, self._now(), f"could not carry on: {exc}"))

    async def tick(self) -> Decision:
        """Measure both versions over the current window and carry out the policy's next move."""
        if self.pipe.variant_lost and not self.state.terminal:
            return await self._carry(*policy.rollback(self.state, self._now(), self.pipe.variant_lost))
        old = self.pipe.version_window(self.old_version, self._window_since)
        new = self.pipe.version_window(self.new_version, self._window_since)
        state, d = policy.decide(
            self.config, self.state, _metrics(old), _metrics(new, prediction_drift(old, new)), self._now()
        )
        return await self._carry(state, d, old.requests, new.requests)

    # ----- the operator

    async def pause(self, why: str = "paused by the operator") -> Decision:
        """Hold where it is until ``resume`` (the policy only holds meanwhile)."""
        return await self._carry(*policy.pause(self.state, self._now(), why))

    async def resume(self) -> Decision:
        """Carry on; the current stage bakes again from now."""
        return await self._carry(*policy.resume(self.state, self._now()))

    async def rollback(self, why: str = "rolled back by the operator") -> Decision:
        """Every new request to the old version again (before the rollout completed)."""
        return await self._carry(*policy.rollback(self.state, self._now(), why))

    # ----- carrying decisions out

    async def _carry(
        self, state: RolloutState, d: Decision, old_n: int | None = None, new_n: int | None = None
    ) -> Decision:
        changed = state.history != self.state.history
        self._apply(state, d, old_n, new_n, record=changed)
        if d.action == "complete" and changed:
            self.pipe.promote_variant()
            await self.deployer.confirm(self.pipe, self.new_version)
        elif d.action == "rollback" and changed:
            self.pipe.end_variant()
        return d

    def _apply(
        self,
        state: RolloutState,
        d: Decision,
        old_n: int | None = None,
        new_n: int | None = None,
        *,
        record: bool = True,
    ) -> None:
        self.state = state
        row = {**d.to_dict(), "at": round(d.at, 3), "old_requests": old_n, "new_requests": new_n}
        self.last = row
        if not record:
            return
        self.steps.append(row)
        if d.action == "advance":
            self.pipe.set_share(d.share)
            self._window_since = time.perf_counter()
        elif d.action == "resume":
            self._window_since = time.perf_counter()
        if state.terminal:
            self.done.set()

    def status(self) -> dict[str, Any]:
        """JSON-ready: versions, status, share, reason, every step, the latest decision, and each
        version's figures since the current stage began."""
        old = self.pipe.version_window(self.old_version, self._window_since)
        new = self.pipe.version_window(self.new_version, self._window_since)
        return {
            "deployment": self.pipe.name,
            "old_version": self.old_version,
            "new_version": self.new_version,
            "status": self.state.status,
            "final": self.state.status if self.state.terminal else None,
            "share": self.pipe.share if not self.state.terminal else self.state.share(self.config),
            "reason": self.state.reason,
            "config": self.config.to_dict(),
            "steps": list(self.steps),
            "last": dict(self.last),
            "window": {"old": _metrics(old).to_dict(), "new": _metrics(new).to_dict()},
            "mixed_version_requests": self.pipe.stats.mixed_versions,
            "error": self.error,
        }


class ABTest:
    """Variant B beside the serving version A for a share of traffic, measured per variant until
    ``stop``; ``report`` runs the significance tests of ``scheduler.abtest`` on what was measured."""

    def __init__(
        self, pipe: Pipeline, deployer: VersionDeployer, version_b: str, share: float, by: str
    ) -> None:
        self.pipe = pipe
        self.deployer = deployer
        self.version_a = pipe.version
        self.version_b = version_b
        self.share = share
        self.by = by
        self.since = time.perf_counter()
        self.stopped = False

    async def start(self) -> None:
        """Deploy B beside A and route ``share`` of new requests to it."""
        if self.version_b == self.version_a:
            raise DeploymentError(f"{self.pipe.name!r} already runs version {self.version_b!r}")
        await serve_beside(
            self.pipe,
            self.deployer,
            self.version_b,
            self.share,
            self.by,
            f"{self.pipe.name}@ab{self.version_b}",
        )
        self.since = time.perf_counter()

    def stop(self) -> None:
        """Every new request to A again; B finishes what it holds and is released."""
        if not self.stopped:
            self.pipe.end_variant()
            self.stopped = True

    def samples(self) -> dict[str, Any]:
        """Per variant: version, requests, errors, labelled, correct and every latency (ms)."""
        out: dict[str, Any] = {}
        for label, version in (("A", self.version_a), ("B", self.version_b)):
            w = self.pipe.version_window(version, self.since)
            out[label] = {
                "version": version,
                "requests": w.requests,
                "errors": w.errors,
                "labelled": w.labelled,
                "correct": w.correct,
                "latencies_ms": [round(x * 1e3, 4) for x in w.latencies_s],
                "predicted": list(w.predicted),
            }
        return out

    def report(self) -> dict[str, Any]:
        """The samples and the tests (latency: Mann–Whitney; error rate and accuracy: two-proportion
        z-test), B's prediction drift against A (``prediction_drift``; None on too few samples), and the
        share of requests B actually got against the share asked for."""
        from scheduler.abtest import compare_latency, compare_rates

        s = self.samples()
        a, b = s["A"], s["B"]
        tests: dict[str, Any] = {}
        with contextlib.suppress(MeshaiError):
            tests["latency"] = compare_latency(a["latencies_ms"], b["latencies_ms"]).to_dict()
        if a["requests"] and b["requests"]:
            with contextlib.suppress(MeshaiError):
                tests["error_rate"] = compare_rates(
                    a["errors"], a["requests"], b["errors"], b["requests"], metric="error rate"
                ).to_dict()
        if a["labelled"] and b["labelled"]:
            with contextlib.suppress(MeshaiError):
                tests["accuracy"] = compare_rates(
                    a["correct"], a["labelled"], b["correct"], b["labelled"], metric="accuracy"
                ).to_dict()
        total = a["requests"] + b["requests"]
        drift = prediction_drift(
            self.pipe.version_window(self.version_a, self.since),
            self.pipe.version_window(self.version_b, self.since),
        )
        return {
            "drift": drift,
            "deployment": self.pipe.name,
            "split": {
                "share_b": self.share,
                "by": self.by,
                "observed_b": b["requests"] / total if total else None,
            },
            "variants": s,
            "tests": tests,
            "running": not self.stopped,
            "mixed_version_requests": self.pipe.stats.mixed_versions,
        }


class MeshVersions:
    """``VersionDeployer`` for a pipeline a ``Mesh`` owns: each version is a loaded model and its signed
    package (``versions``); ``slowdown`` makes a version's stages take that many times their time (the
    sim's ``--canary-slowdown``)."""

    def __init__(
        self,
        mesh: Mesh,
        versions: dict[str, tuple[LoadedModel, tuple[bytes, str] | None]],
        *,
        slowdown: dict[str, float] | None = None,
    ) -> None:
        self.mesh = mesh
        self.versions = versions
        self.slowdown = dict(slowdown or {})
        self.has_package: dict[str, set[str]] = {}

    def _version(self, version: str) -> tuple[LoadedModel, tuple[bytes, str] | None]:
        found = self.versions.get(version)
        if found is None:
            raise DeploymentError(f"no version {version!r} to deploy (known: {', '.join(self.versions)})")
        return found

    async def deploy_version(self, pipe: Pipeline, version: str) -> Generation:
        """Plan ``version`` over the connected stage nodes with the pipeline's objective, stage count and
        pins; hand its package to every stage node (so that a replan after it is promoted can use any);
        deploy it without activating it in the nodes' stores."""
        from meshai.plan import Constraints
        from meshai.planning import make_plan
        from meshai.supervise import MeshSupervisor
        from scheduler.adapt import relax_stages

        loaded, package = self._version(version)
        names = self.mesh.stage_nodes()
        sup = pipe.supervisor
        base = sup.constraints if isinstance(sup, MeshSupervisor) else Constraints()
        constraints = relax_stages(
            dataclasses.replace(base, objective=pipe.plan.objective, pins=dict(pipe.plan.pins)), len(names)
        )
        plan = await asyncio.to_thread(make_plan, loaded, self.mesh.capabilities(names), constraints)
        gen = pipe.new_generation(plan, version)
        gen.activate = False
        gen.stretch = self.slowdown.get(version, 1.0)
        has = self.has_package.setdefault(version, set())
        if package is not None:
            todo = [n for n in names if n not in has]
            if todo:
                await pipe.upload(package[0], package[1], nodes=todo)
                has.update(todo)
        try:
            await self.mesh._deploy_generation(pipe, gen, loaded, package, has)
        except BaseException:
            await pipe.discard(gen)
            raise
        return gen

    async def confirm(self, pipe: Pipeline, version: str) -> None:
        """The pipeline's supervisor replans with ``version`` from now on; every node holding its
        package activates it (a node that refuses says why in a DeploymentError)."""
        from meshai.supervise import MeshSupervisor

        loaded, package = self._version(version)
        if isinstance(pipe.supervisor, MeshSupervisor):
            pipe.supervisor.use_version(pipe, loaded, package, self.has_package.setdefault(version, set()))
        if package is not None:
            await activate_everywhere(self.mesh.pool, sorted(self.has_package.get(version, ())), package[1])


async def activate_everywhere(pool: PeerPool, nodes: list[str], ref: str) -> None:
    """Ask each of ``nodes`` to activate the stored package ``ref``; DeploymentError names a refusal."""
    for node in nodes:
        reply = await pool.control(node, "activate", {"package": ref})
        if not reply.ok:
            raise DeploymentError(f"node {node!r} did not activate {ref}: {reply.body.get('error')}")
