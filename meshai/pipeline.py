"""A deployed plan seen from its entry: deploy stages, submit requests, collect results in order.

The entry is the caller's process (``meshai run``, ``meshai sim``, ``Mesh.deploy``) or, for a
long-lived deployment, a node that hosts it.  The entry sends each request's graph inputs to the
stages that read them; stages forward activations straight to each other; the stages that produce
graph outputs send ``Result`` back to the entry.

Nothing is lost: the entry keeps the inputs of every request in flight until its result arrives.  A
pipeline runs one *generation* (a plan deployed under its own stage-deployment id) at a time for new
requests; ``replan(plan)`` deploys a new generation beside the old one, sends new requests there, lets
the old one drain and then releases it.  With a ``Supervisor`` (``Mesh.deploy`` gives one), a node of the
current plan that dies makes the entry replan over the live nodes, deploy the new generation and replay
the requests that were in flight on the old one; results are delivered exactly once per request (a
result from a superseded generation — a stage that was slow rather than dead — is dropped and counted)
and in submission order.  If no plan is possible any more, requests fail with a ``PlanError`` saying
why.  Without a supervisor a node's death fails the requests it touched with a ``PeerError`` naming it.
A request never waits forever (``request_timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from meshai.errors import ConfigError, DeploymentError, InferenceError, MeshaiError, PeerError, PlanError
from meshai.peers import PeerPool
from meshai.plan import Plan
from meshai.protocol import Deploy, Deployed, Error, Infer, Message, Result, Undeploy, Upload, Uploaded
from meshai.split import split
from meshai.transport import Channel

if TYPE_CHECKING:
    from meshai.drift import EntryDrift
    from meshai.metrics import Metrics

Tensors = dict[str, np.ndarray]
#: Drift gauges are refreshed every this many results.
DRIFT_EXPORT_EVERY = 25


def stage_deployment_id(name: str) -> str:
    """The id stages of one deployment of ``name`` are registered under (new for every deploy)."""
    return f"{name}.{secrets.token_hex(4)}"


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of durations given in seconds (zeros when there are none)."""
    if not values_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    ms = np.asarray(values_s) * 1e3
    return {k: round(float(np.percentile(ms, q)), 3) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))}


@dataclass
class PipelineStats:
    """What the entry measured: per-request latency, bytes sent, outcomes, replays."""

    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    bytes_sent: int = 0
    first_sent: float | None = None
    last_result: float | None = None
    replayed: int = 0  # requests sent again on a new generation after a node was lost
    stale: int = 0  # results and errors from superseded generations (or repeats), dropped
    replans: int = 0  # generations switched to after the first (recoveries and live replans)
    duplicated: int = 0  # results delivered twice for one request: must stay 0
    mixed_versions: int = 0  # results whose stages ran different model versions: must stay 0

    def latency_ms(self) -> dict[str, float]:
        """End-to-end latency percentiles of the requests that succeeded."""
        return percentiles_ms(self.latencies_s)

    def throughput_rps(self) -> float:
        """Results delivered per second, from the first request sent to the last result."""
        if self.first_sent is None or self.last_result is None or self.last_result <= self.first_sent:
            return 0.0
        return round(self.ok / (self.last_result - self.first_sent), 3)


@dataclass
class Generation:
    """One deployed plan of a pipeline: the stage-deployment id its stages run under, and where the
    graph inputs go."""

    number: int
    plan: Plan
    deployment: str
    input_routes: dict[str, list[str]]  # node -> graph inputs it reads
    nodes: tuple[str, ...]
    reuse: str = ""  # the generation whose loaded stages this one may take over where unchanged
    pace_ms: dict[int, float] | None = None  # per stage: the time a paced node emulates (default predicted)
    deployed_at: float | None = None
    first_result_at: float | None = None
    version: str = ""  # the model version every stage of this generation runs
    activate: bool = True  # whether its nodes make its package the active one (a canary's do not)
    stretch: float = 1.0  # every stage takes this many times its time (a simulated slow version)
    stage_keys: frozenset[str] = frozenset()  # the stage ids as the stages stamp them on results

    @classmethod
    def of(cls, number: int, plan: Plan, deployment: str) -> Generation:
        """The generation that runs ``plan`` under ``deployment``."""
        routes: dict[str, list[str]] = {}
        for s in plan.stages:
            mine = [t for t in s.inputs if t in plan.inputs]
            if mine:
                routes[s.node] = mine
        gen = cls(number, plan, deployment, routes, tuple(s.node for s in plan.stages))
        gen.stage_keys = frozenset(str(s.id) for s in plan.stages)
        return gen


@dataclass(frozen=True, slots=True)
class VersionWindow:
    """One model version's outcomes since some time: requests finished (ok or failed), failures, the
    latencies of those that succeeded, and — for requests that came with a label — how many were
    labelled and how many the model got right (argmax of the first output)."""

    version: str
    requests: int
    errors: int
    latencies_s: tuple[float, ...]
    labelled: int
    correct: int
    predicted: tuple[int, ...] = ()  # the predicted class (argmax of the first output) of each success

    def p95_ms(self) -> float | None:
        """p95 latency in milliseconds (None without a successful request)."""
        return percentiles_ms(self.latencies_s)["p95"] if self.latencies_s else None


#: One finished request: when, its latency in s (None: it failed), right or wrong (None: no label), the
#: predicted class (argmax of the first output; -1 when failed).
_Outcome = tuple[float, float | None, bool | None, int]
#: Outcomes kept per version (time finished, latency in s or None for a failure, right/wrong/unlabelled).
OUTCOMES_KEPT = 100_000
#: Requests whose stage versions are kept for inspection (``version_trace``).
TRACE_KEPT = 20_000
SPLIT_BY = ("request", "robot")


@dataclass
class Recovery:
    """One node loss handled by the entry: when it was seen, when the new plan served, what was replayed
    (times are ``time.perf_counter()`` values)."""

    lost: tuple[str, ...]
    reason: str
    detected_at: float
    replayed: int = 0
    deployed_at: float | None = None
    generation: int | None = None
    error: str = ""

    def to_dict(self, first_result_at: float | None = None) -> dict[str, Any]:
        """JSON-ready form; durations in seconds from detection."""
        return {
            "lost": list(self.lost),
            "reason": self.reason,
            "replayed": self.replayed,
            "generation": self.generation,
            "redeploy_s": None if self.deployed_at is None else round(self.deployed_at - self.detected_at, 4),
            "first_result_s": None
            if first_result_at is None
            else round(first_result_at - self.detected_at, 4),
            "error": self.error,
        }


class Supervisor(Protocol):
    """What a pipeline needs to recover from a lost node: a new plan without it, and a way to deploy."""

    async def plan_without(self, plan: Plan, lost: frozenset[str]) -> Plan:
        """A plan over the live nodes (PlanError if there is none)."""

    async def deploy(self, pipe: Pipeline, gen: Generation) -> None:
        """Deploy ``gen``'s stages (``pipe.deploy(..., gen=gen)``); MeshaiError on failure."""


async def upload_to(
    pool: PeerPool, acks: Mapping[str, asyncio.Future[Uploaded]], package: bytes, ref: str, timeout: float
) -> None:
    """Send the signed package ``ref`` to every node of ``acks`` and wait for each one's ``Uploaded``
    (the caller routes them into ``acks``).  DeploymentError names a node that refused it and why, or
    those that did not answer within ``timeout``."""
    await asyncio.gather(*(pool.send(n, Upload(ref, package)) for n in acks))
    try:
        async with asyncio.timeout(timeout):
            got = await asyncio.gather(*acks.values())
    except TimeoutError:
        missing = [n for n, f in acks.items() if not f.done()]
        raise DeploymentError(f"no answer to upload from {', '.join(missing)} within {timeout:g} s") from None
    for node, ack in zip(acks, got, strict=True):
        if not ack.ok:
            raise DeploymentError(f"node {node!r} refused package {ref}: {ack.message}")


class Pipeline:
    """Requests in, results out, in submission order, with a bounded number in flight."""

    def __init__(
        self,
        name: str,
        plan: Plan,
        pool: PeerPool,
        *,
        stage_id: str | None = None,
        window: int = 16,
        request_timeout: float = 120.0,
        owner: bool = True,
        metrics: Metrics | None = None,
        version: str = "",
        tensor_bytes: Mapping[str, int] | None = None,
        registry: dict[str, Pipeline] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.name = name
        self.pool = pool
        self.window = window
        self.request_timeout = request_timeout
        self.owner = owner
        self.stats = PipelineStats()
        self.metrics = metrics
        self.version = version
        self.supervisor = supervisor
        self.registry: dict[str, Pipeline] = registry if registry is not None else {}
        self._saved_per_request = 0
        self.drift: EntryDrift | None = None  # set by enable_drift()
        self._since_drift_export = 0
        if metrics is not None:
            metrics.declare_model(name, version)
            if tensor_bytes is not None:
                from meshai.metrics import bandwidth_saved_bytes

                with contextlib.suppress(MeshaiError):
                    self._saved_per_request = bandwidth_saved_bytes(plan, tensor_bytes)
        self.variant: Generation | None = None  # a second version served beside the current one
        self.share = 0.0  # the variant's share of new requests
        self.split_by = "request"  # what the share is drawn on: each request, or each robot (key)
        self.split_salt = name
        self.previous: Generation | None = None  # the version before the last promotion, kept loaded
        self.variant_lost = ""  # why the variant was dropped by a recovery ("" while it serves)
        self.outcomes: dict[str, collections.deque[_Outcome]] = {}
        # (request, the version its generation runs, the version each stage said it ran, whether every
        # stage of that generation's plan said so)
        self.version_trace: collections.deque[tuple[int, str, dict[str, str], bool]] = collections.deque(
            maxlen=TRACE_KEPT
        )
        self._stamps: dict[int, dict[str, str]] = {}
        self._labels: dict[int, int] = {}
        self._sem = asyncio.Semaphore(window)
        self._next = 1
        self._futures: dict[int, asyncio.Future[Tensors]] = {}
        self._partial: dict[int, Tensors] = {}
        self._started: dict[int, float] = {}
        self._kept: dict[int, dict[str, np.ndarray]] = {}  # inputs of every request in flight
        self._gen_of: dict[int, Generation] = {}  # the generation a request was (last) sent to
        self._deployed: dict[tuple[str, int], asyncio.Future[Deployed]] = {}
        self._uploaded: dict[str, asyncio.Future[Uploaded]] = {}
        self._closed = False
        self._generations = 0
        self._all_gens: dict[int, Generation] = {}
        self.gen = self._new_generation(plan, stage_id, version)
        self.generations: list[Generation] = [self.gen]  # every generation still deployed
        self.recoveries: list[Recovery] = []
        self._dead: set[str] = set()  # nodes declared lost and not seen since
        self._ready = asyncio.Event()  # cleared while a recovery deploys a new generation
        self._ready.set()
        self._broken: PlanError | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()
        self._bg: set[asyncio.Task[Any]] = set()

    # ----- generations

    @property
    def plan(self) -> Plan:
        """The plan new requests run on."""
        return self.gen.plan

    @property
    def stage_deployment(self) -> str:
        """The stage-deployment id new requests run under."""
        return self.gen.deployment

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes of the current plan, stage by stage."""
        return self.gen.nodes

    @property
    def input_routes(self) -> dict[str, list[str]]:
        """Node -> the graph inputs it reads, in the current plan."""
        return self.gen.input_routes

    def _new_generation(self, plan: Plan, deployment: str | None = None, version: str = "") -> Generation:
        self._generations += 1
        gen = Generation.of(self._generations, plan, deployment or stage_deployment_id(self.name))
        gen.version = version
        self.registry[gen.deployment] = self
        self._all_gens[gen.number] = gen
        return gen

    def _retire(self, gen: Generation) -> None:
        """Forget a generation whose stages are released."""
        if gen in self.generations:
            self.generations.remove(gen)
        if self.registry.get(gen.deployment) is self:
            del self.registry[gen.deployment]

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def enable_drift(
        self,
        reference_inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
        warmup: int = 200,
        window: int = 500,
    ) -> None:
        """Track input and prediction drift at this entry (reference: given, or the first ``warmup``;
        scores over a sliding window of the last ``window`` requests)."""
        from meshai.drift import EntryDrift

        self.drift = EntryDrift(reference_inputs, warmup=warmup, window=window)

    def _export_drift(self) -> None:
        if self.drift is None or self.metrics is None:
            return
        scores = self.drift.scores()
        for feature, by_method in scores["inputs"].items():
            for method, value in by_method.items():
                self.metrics.set_drift(self.name, method, value, feature=feature)
        for feature, by_method in scores["predictions"].items():
            if feature.endswith(".argmax"):  # prediction drift: the predicted-class distribution
                for method, value in by_method.items():
                    self.metrics.set_drift(self.name, method, value)

    # ----- deployment

    def deploy_messages(
        self,
        stage_models: Sequence[bytes] | None,
        options: Mapping[str, Any] | None = None,
        package: str = "",
        wire_int8: Mapping[int, Sequence[str]] | None = None,
        gen: Generation | None = None,
    ) -> list[Deploy]:
        """One Deploy message per stage of ``gen`` (default: the current generation): the stage's model
        bytes, or — with ``package`` — a reference to a signed package the node holds plus the stage's
        cut tensors.  ``wire_int8`` names, per stage id, the boundary tensors it sends or receives as int8.
        A stage the generation ``gen.reuse`` already runs unchanged on the same node (same tensors in and
        out, same precision) is marked for reuse: the node takes over its loaded session."""
        gen = gen or self.gen
        plan = gen.plan
        if package:
            stage_models = [b""] * len(plan.stages)
        if stage_models is None or len(stage_models) != len(plan.stages):
            n = 0 if stage_models is None else len(stage_models)
            raise DeploymentError(f"{n} stage models for {len(plan.stages)} stages")
        node_of = {s.id: s.node for s in plan.stages}
        addresses = {n: self.pool.address_of(n) or "" for n in gen.nodes}
        before = next((g for g in self.generations if g.deployment == gen.reuse), None)
        old = (
            {}
            if before is None
            else {(s.node, s.inputs, s.outputs, s.precision): s for s in before.plan.stages}
        )
        out = []
        for s, model in zip(plan.stages, stage_models, strict=True):
            routes = {t: tuple(node_of[d] for d in dests) for t, dests in s.routes.items()}
            opts = dict(options or {})
            opts.update(
                {
                    "addresses": addresses,
                    "predicted_ms": s.predicted_ms,
                    "pace_ms": (gen.pace_ms or {}).get(s.id, s.predicted_ms),
                    "precision": s.precision,
                    "wire_int8": list((wire_int8 or {}).get(s.id, ())),
                    "to_entry": [t for t in s.outputs if t in plan.outputs],
                    "name": self.name,
                    "version": gen.version,
                    "activate": gen.activate,
                }
            )
            if gen.stretch != 1.0:
                opts["stretch"] = gen.stretch
            if before is not None and (s.node, s.inputs, s.outputs, s.precision) in old:
                opts["reuse"] = before.deployment
            out.append(
                Deploy(
                    deployment=gen.deployment,
                    stage_id=s.id,
                    model=model,
                    sha256=hashlib.sha256(model).hexdigest() if model else "",
                    inputs=tuple(s.inputs),
                    outputs=tuple(s.outputs),
                    routes=routes,
                    package=package,
                    cut_inputs=tuple(s.inputs) if package else (),
                    cut_outputs=tuple(s.outputs) if package else (),
                    options=opts,
                )
            )
        return out

    async def upload(
        self, package: bytes, ref: str, timeout: float = 120.0, nodes: Sequence[str] | None = None
    ) -> None:
        """Hand the signed package ``ref`` (``name@version``) to every node of the plan (or ``nodes``);
        each verifies and stores it.  DeploymentError names the node that refused it and why."""
        loop = asyncio.get_running_loop()
        targets = dict.fromkeys(nodes if nodes is not None else self.nodes)
        self._uploaded = {n: loop.create_future() for n in targets}
        await upload_to(self.pool, self._uploaded, package, ref, timeout)

    async def deploy(
        self,
        stage_models: Sequence[bytes] | None,
        options: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        package: str = "",
        wire_int8: Mapping[int, Sequence[str]] | None = None,
        gen: Generation | None = None,
    ) -> None:
        """Send every stage of ``gen`` (default: the current generation) to its node and wait until all
        are loaded; DeploymentError names a refusal (the stages already loaded are released).

        With ``package`` (a ref already uploaded), each node cuts its own stage out of the package."""
        gen = gen or self.gen
        msgs = self.deploy_messages(stage_models, options, package, wire_int8, gen)
        loop = asyncio.get_running_loop()
        waits = {}
        for m in msgs:
            waits[m.stage_id] = self._deployed[(gen.deployment, m.stage_id)] = loop.create_future()
        try:
            gone = [n for n in gen.nodes if n in self._dead]
            if gone:
                raise DeploymentError(f"node {gone[0]!r} of the plan is gone")
            await asyncio.gather(
                *(self.pool.send(s.node, m) for s, m in zip(gen.plan.stages, msgs, strict=True))
            )
            try:
                async with asyncio.timeout(timeout):
                    acks = await asyncio.gather(*waits.values())
            except TimeoutError:
                missing = [gen.plan.stages[k].node for k, f in waits.items() if not f.done()]
                raise DeploymentError(
                    f"no answer to deploy from {', '.join(missing)} within {timeout:g} s"
                ) from None
            bad = [a for a in acks if not a.ok]
            if bad:
                b = bad[0]
                raise DeploymentError(
                    f"node {gen.plan.stages[b.stage_id].node!r} refused stage {b.stage_id}: {b.message}"
                )
        except BaseException:
            await self._undeploy(gen)
            raise
        finally:
            for k in waits:
                self._deployed.pop((gen.deployment, k), None)
        gen.deployed_at = time.perf_counter()

    async def _undeploy(self, gen: Generation) -> None:
        """Release one generation's stages on the nodes still reachable (best effort)."""
        for node in dict.fromkeys(gen.nodes):
            if node in self._dead:
                continue
            with contextlib.suppress(PeerError):
                await self.pool.send(node, Undeploy(gen.deployment))

    async def undeploy(self) -> None:
        """Release every generation's stages (best effort)."""
        for gen in list(self.generations):
            await self._undeploy(gen)

    async def replan(
        self,
        plan: Plan,
        deploy: Callable[[Pipeline, Generation], Awaitable[None]] | None = None,
        *,
        drain_timeout: float | None = None,
    ) -> Generation:
        """Move to ``plan`` while requests stream: deploy it beside the current plan (with ``deploy``, an
        ``async (pipeline, generation)`` callable, or the supervisor's), send new requests there, let the
        requests in flight on the old plan finish, then release the old stages.  Nothing is dropped.
        Returns the new generation."""
        deployer = deploy or (self.supervisor.deploy if self.supervisor is not None else None)
        if deployer is None:
            raise DeploymentError(f"pipeline {self.name!r} has no way to deploy a new plan")
        async with self._switch_lock:
            old = self.gen
            gen = self._new_generation(plan, version=old.version)
            gen.reuse = old.deployment
            try:
                await deployer(self, gen)
            except BaseException:
                self._retire(gen)
                raise
            self._switch(gen)
        self._spawn(self._drain(old, drain_timeout or self.request_timeout), f"meshai-drain {old.deployment}")
        return gen

    def _switch(self, gen: Generation) -> None:
        """New requests go to ``gen`` from now on."""
        self.gen = gen
        self.generations.append(gen)
        self.stats.replans += 1

    async def _drain(self, old: Generation, timeout: float) -> None:
        """Release ``old`` once no request is in flight on it (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while any(g is old for g in self._gen_of.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._undeploy(old)
        self._retire(old)

    # ----- versions: a variant beside the current generation (rollouts, A/B tests)

    def new_generation(self, plan: Plan, version: str) -> Generation:
        """A generation that will run ``version`` of the model on ``plan`` — not deployed yet: deploy it
        (``deploy(..., gen=…)`` or a supervisor's deployer), then ``start_variant`` it."""
        return self._new_generation(plan, version=version)

    def start_variant(self, gen: Generation, share: float, by: str = "request", salt: str = "") -> None:
        """Serve the deployed generation ``gen`` beside the current one: ``share`` of new requests go to
        it, drawn per request or per robot (the request's key).  A request always runs wholly on one
        generation, so on one version."""
        if self.variant is not None:
            raise DeploymentError(
                f"pipeline {self.name!r} already serves version {self.variant.version!r} beside "
                f"{self.gen.version!r}; end that first"
            )
        if by not in SPLIT_BY:
            raise ConfigError(f"split by must be one of {', '.join(SPLIT_BY)}, got {by!r}")
        for what, mine, theirs in (
            ("inputs", self.plan.inputs, gen.plan.inputs),
            ("outputs", self.plan.outputs, gen.plan.outputs),
        ):
            if sorted(mine) != sorted(theirs):
                raise DeploymentError(
                    f"version {gen.version!r} has {what} {', '.join(theirs)} but the deployment's "
                    f"version {self.gen.version!r} has {', '.join(mine)}: requests could not go to both"
                )
        self.variant = gen
        self.variant_lost = ""
        self.generations.append(gen)
        if self.metrics is not None:
            self.metrics.declare_model(self.name, gen.version)
        self.split_by = by
        self.split_salt = salt or self.name
        self.set_share(share)

    async def discard(self, gen: Generation) -> None:
        """Release a generation that never served (a variant that could not start) and forget it."""
        await self._undeploy(gen)
        self._retire(gen)

    def set_share(self, share: float) -> None:
        """The variant's share of new requests, in [0, 1]."""
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
            raise ConfigError(f"variant share must be in [0, 1], got {share!r}")
        self.share = float(share)

    def promote_variant(self, keep_previous: bool = True) -> Generation:
        """The variant becomes the version every new request runs on.  The version it replaces stays
        loaded (``previous``) so that going back is a switch, not a download; the one kept before that
        is released once idle."""
        gen = self.variant
        if gen is None:
            raise DeploymentError(f"pipeline {self.name!r} has no variant to promote")
        old = self.gen
        self.variant, self.share = None, 0.0
        self._set_current(gen)
        if self.previous is not None:
            self._release_when_idle(self.previous)
        self.previous = old if keep_previous else None
        if not keep_previous:
            self._release_when_idle(old)
        return gen

    def end_variant(self) -> Generation | None:
        """New requests all go to the current version again; the variant finishes what it holds (nothing
        is dropped) and is then released."""
        gen, self.variant, self.share = self.variant, None, 0.0
        if gen is not None:
            self._release_when_idle(gen)
        return gen

    def restore_previous(self) -> Generation:
        """Go back to the version kept loaded by the last promotion (a switch: no deploy, no download);
        the version serving until now finishes what it holds and is released."""
        prev = self.previous
        if prev is None:
            raise DeploymentError(f"pipeline {self.name!r} keeps no previous version to go back to")
        gone = [n for n in prev.nodes if n in self._dead]
        if gone:
            raise DeploymentError(f"the previous version's node {gone[0]!r} is gone")
        old = self.gen
        self.previous = None
        self._set_current(prev)
        self._release_when_idle(old)
        return prev

    def _set_current(self, gen: Generation) -> None:
        self.gen = gen
        self.version = gen.version
        if gen not in self.generations:
            self.generations.append(gen)
        if self.metrics is not None:
            self.metrics.declare_model(self.name, gen.version)

    def _release_when_idle(self, gen: Generation) -> None:
        self._spawn(self._drain(gen, self.request_timeout), f"meshai-drain {gen.deployment}")

    def _choose(self, rid: int, key: str) -> Generation:
        """The generation a new request runs on: the variant for its share, the current one otherwise."""
        v = self.variant
        if v is None or self.share <= 0.0 or any(n in self._dead for n in v.nodes):
            return self.gen
        draw = key if self.split_by == "robot" and key else str(rid)
        return v if split(draw, self.share, self.split_salt) else self.gen

    def _outcome(
        self, version: str, latency_s: float | None, correct: bool | None, predicted: int = -1
    ) -> None:
        log = self.outcomes.get(version)
        if log is None:
            log = self.outcomes[version] = collections.deque(maxlen=OUTCOMES_KEPT)
        log.append((time.perf_counter(), latency_s, correct, predicted))

    def version_window(self, version: str, since: float = 0.0) -> VersionWindow:
        """``version``'s outcomes finished at or after ``since`` (a ``time.perf_counter()`` value)."""
        rows = list(itertools.takewhile(lambda r: r[0] >= since, reversed(self.outcomes.get(version, ()))))
        rows.reverse()  # outcomes are appended in time order: only the window is read, newest first
        lat = tuple(r[1] for r in rows if r[1] is not None)
        marked = [r[2] for r in rows if r[2] is not None]
        return VersionWindow(
            version,
            len(rows),
            len(rows) - len(lat),
            lat,
            len(marked),
            sum(1 for c in marked if c),
            tuple(r[3] for r in rows if r[1] is not None),
        )

    # ----- requests

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, key: str = "", label: int | None = None
    ) -> asyncio.Future[Tensors]:
        """Send one request (waits while ``window`` are in flight, or while the plan is being repaired);
        returns the future of its outputs.  ``key`` names who sent it (a robot: what an A/B split by
        robot draws on); ``label``, when known, is the class it should get (accuracy per version)."""
        missing = [t for t in self.plan.inputs if t not in inputs]
        if missing:
            raise InferenceError(
                f"request is missing input {missing[0]!r} (inputs: {', '.join(self.plan.inputs)})"
            )
        if self._closed:
            raise InferenceError(f"pipeline {self.name!r} is closed")
        await self._sem.acquire()
        await self._ready.wait()
        if self._broken is not None or self._closed:
            self._sem.release()
            raise self._broken or InferenceError(f"pipeline {self.name!r} is closed")
        gone = [s for s in self.plan.stages if s.node in self._dead]
        if gone and self.supervisor is None:  # fail fast: the plan cannot serve without that node
            self._sem.release()
            raise PeerError(
                f"pipeline {self.name!r} cannot serve: node {gone[0].node!r} (stage {gone[0].id}) is gone"
            )
        rid = self._next
        self._next += 1
        fut: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._sem.release())
        self._futures[rid] = fut
        self._partial[rid] = {}
        self._kept[rid] = {t: np.asarray(inputs[t]) for t in self.plan.inputs}
        if label is not None:
            self._labels[rid] = int(label)
        now = time.perf_counter()
        self._started[rid] = now
        if self.stats.first_sent is None:
            self.stats.first_sent = now
        await self._send(rid, self._choose(rid, key))
        return fut

    async def _send(self, rid: int, gen: Generation) -> None:
        """Send request ``rid``'s kept inputs to ``gen``'s input stages."""
        self._gen_of[rid] = gen
        self._stamps[rid] = {}
        kept = self._kept[rid]
        try:
            for node, names in gen.input_routes.items():
                msg = Infer(rid, gen.deployment, {t: kept[t] for t in names})
                await self.pool.send(node, msg)
                self.stats.bytes_sent += sum(kept[t].nbytes for t in names)
        except PeerError as exc:
            if self.supervisor is None:
                self._fail(rid, PeerError(f"request {rid}: {exc}"))
            # supervised: the node's loss is (or is about to be) handled, and the request replayed

    async def infer(
        self, inputs: Mapping[str, np.ndarray], *, key: str = "", label: int | None = None
    ) -> Tensors:
        """Run one request and return its outputs (``key``, ``label``: see ``submit``)."""
        fut = await self.submit(inputs, key=key, label=label)
        return await self._await(fut)

    async def _await(self, fut: asyncio.Future[Tensors]) -> Tensors:
        try:
            async with asyncio.timeout(self.request_timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            rid = next((k for k, f in self._futures.items() if f is fut), -1)
            err = InferenceError(f"request {rid} got no result within {self.request_timeout:g} s")
            self._fail(rid, err)
            raise err from None

    async def stream(
        self, batches: Iterable[Mapping[str, np.ndarray]] | AsyncIterable[Mapping[str, np.ndarray]]
    ) -> AsyncIterator[Tensors | BaseException]:
        """Results in submission order, up to ``window`` in flight; a failed request yields its exception."""
        queue: asyncio.Queue[asyncio.Future[Tensors] | BaseException | None] = asyncio.Queue()

        async def one(b: Mapping[str, np.ndarray]) -> None:
            try:
                await queue.put(await self.submit(b))
            except (PlanError, PeerError) as exc:  # no plan any more: every request says why, none hangs
                await queue.put(exc)

        async def feed() -> None:
            try:
                if isinstance(batches, AsyncIterable):
                    async for b in batches:
                        await one(b)
                else:
                    for b in batches:
                        await one(b)
            finally:
                await queue.put(None)

        feeder = asyncio.get_running_loop().create_task(feed(), name=f"meshai-feed {self.name}")
        try:
            while True:
                fut = await queue.get()
                if fut is None:
                    break
                if isinstance(fut, BaseException):
                    yield fut
                    continue
                try:
                    yield await self._await(fut)
                except (InferenceError, PeerError, PlanError) as exc:
                    yield exc
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    # ----- messages from stage nodes

    def _current_for(self, rid: int, deployment: str) -> bool:
        """Whether a message about ``rid`` under ``deployment`` belongs to the generation the request now
        runs on (anything else is stale: a superseded generation, or a repeat)."""
        gen = self._gen_of.get(rid)
        return gen is not None and gen.deployment == deployment

    async def on_message(self, peer: str, msg: Message, ch: Channel | None = None) -> None:
        """Handle Result, Error, Deployed and Uploaded messages for this pipeline."""
        if isinstance(msg, Result):
            if not self._current_for(msg.request_id, msg.deployment):
                self.stats.stale += 1
                return
            part = self._partial[msg.request_id]
            part.update(msg.tensors)
            stamped = msg.meta.get("versions")
            if isinstance(stamped, Mapping):
                self._stamps.setdefault(msg.request_id, {}).update(
                    {str(k): str(v) for k, v in stamped.items()}
                )
            if all(t in part for t in self.plan_of(msg.request_id).outputs):
                self._complete(msg.request_id, part)
        elif isinstance(msg, Error):
            rid = msg.request_id
            if rid is None or rid not in self._futures:
                return
            if msg.deployment and not self._current_for(rid, msg.deployment):
                self.stats.stale += 1
                return
            if self.supervisor is not None and msg.code in ("unreachable", "unknown_deployment"):
                return  # a stage next to a lost node: the loss is handled and the request replayed
            self._fail(rid, InferenceError(f"request {rid} failed on {peer!r}: {msg.message}"))
        elif isinstance(msg, Uploaded):
            fut3 = self._uploaded.get(peer)
            if fut3 is not None and not fut3.done():
                fut3.set_result(msg)
        elif isinstance(msg, Deployed):
            fut2 = self._deployed.get((msg.deployment, msg.stage_id))
            if fut2 is not None and not fut2.done():
                fut2.set_result(msg)

    def plan_of(self, rid: int) -> Plan:
        """The plan request ``rid`` runs on."""
        gen = self._gen_of.get(rid)
        return gen.plan if gen is not None else self.plan

    def _complete(self, rid: int, part: Tensors) -> None:
        gen = self._gen_of.pop(rid)
        fut = self._futures.pop(rid, None)
        self._partial.pop(rid, None)
        started = self._started.pop(rid, None)
        kept = self._kept.pop(rid, None)
        stamps = self._stamps.pop(rid, {})
        label = self._labels.pop(rid, None)
        if fut is None or fut.done():
            self.stats.duplicated += 1
            return
        every_stage = stamps.keys() == gen.stage_keys
        self.version_trace.append((rid, gen.version, stamps, every_stage))
        if any(v != gen.version for v in stamps.values()):
            self.stats.mixed_versions += 1
        now = time.perf_counter()
        if gen.first_result_at is None:
            gen.first_result_at = now
        if started is not None:
            self.stats.latencies_s.append(now - started)
            if self.metrics is not None:  # latency by the version that served it (a canary's apart)
                self.metrics.observe_inference(self.name, gen.version, now - started, ok=True)
                if self._saved_per_request:
                    self.metrics.add_bandwidth_saved(self.name, self._saved_per_request)
        self.stats.last_result = now
        self.stats.ok += 1
        outs = {t: part[t] for t in gen.plan.outputs}
        first = np.asarray(outs[gen.plan.outputs[0]]) if gen.plan.outputs else np.zeros(0)
        predicted = int(np.argmax(first.reshape(-1))) if first.size else -1
        correct = None if label is None else predicted == label
        self._outcome(gen.version, None if started is None else now - started, correct, predicted)
        if self.drift is not None and kept is not None:
            with contextlib.suppress(MeshaiError):
                self.drift.observe(kept, outs)
            self._since_drift_export += 1
            if self._since_drift_export >= DRIFT_EXPORT_EVERY:
                self._since_drift_export = 0
                self._export_drift()
        fut.set_result(outs)

    # ----- lost and returning nodes

    async def on_lost(self, peer: str, reason: str) -> None:
        """A node is gone.  Supervised: replan without it and replay what was in flight on it.
        Unsupervised: every request in flight on a plan that used it fails, naming it."""
        for (dep, k), f in self._deployed.items():
            gen = next((g for g in self.generations if g.deployment == dep), None)
            node = gen.plan.stages[k].node if gen is not None else ""
            if not f.done() and node == peer:
                f.set_result(Deployed(dep, k, False, f"node {peer!r} is gone: {reason}"))
        touched = [g for g in self.generations if peer in g.nodes]
        if not touched:
            return
        self._dead.add(peer)
        if self.supervisor is None:
            for rid, gen in list(self._gen_of.items()):
                if gen in touched:
                    stage = next(s.id for s in gen.plan.stages if s.node == peer)
                    self._fail(
                        rid,
                        PeerError(f"request {rid} failed: node {peer!r} (stage {stage}) is gone: {reason}"),
                    )
            return
        if peer in self.gen.nodes:
            self._ready.clear()  # new requests wait for the repaired plan
            self.recoveries.append(Recovery((peer,), reason, time.perf_counter()))
        if self._recovering is None or self._recovering.done():
            self._recovering = asyncio.get_running_loop().create_task(
                self._recover(), name=f"meshai-recover {self.name}"
            )

    def on_back(self, peer: str) -> None:
        """A lost node is reachable again (it may be planned with again)."""
        self._dead.discard(peer)

    async def _recover(self) -> None:
        """Repair the current plan while it uses a lost node, then replay every request in flight on a
        generation that used one."""
        try:
            while self.gen.nodes and self._dead & set(self.gen.nodes) and not self._closed:
                await self._repair()
                if self._broken is not None:
                    return
            for rid, gen in list(self._gen_of.items()):
                if gen is not self.gen and self._dead & set(gen.nodes):
                    await self._replay(rid)
            for gen in [g for g in self.generations if g is not self.gen and self._dead & set(g.nodes)]:
                if gen is self.variant:  # its requests were replayed on the current version
                    lost = sorted(self._dead & set(gen.nodes))
                    self.variant_lost = f"node {lost[0]!r} of version {gen.version!r} was lost"
                    self.variant, self.share = None, 0.0
                if gen is self.previous:
                    self.previous = None
                if not any(g is gen for g in self._gen_of.values()):
                    self._spawn(self._undeploy(gen), f"meshai-release {gen.deployment}")
                    self._retire(gen)
        finally:
            if self._broken is None:
                self._ready.set()

    async def _repair(self) -> None:
        assert self.supervisor is not None
        rec = self.recoveries[-1] if self.recoveries else Recovery((), "", time.perf_counter())
        lost = frozenset(self._dead)
        async with self._switch_lock:
            old = self.gen
            gen: Generation | None = None
            try:
                plan = await self.supervisor.plan_without(old.plan, lost)
                gen = self._new_generation(plan, version=old.version)
                gen.reuse = old.deployment
                await self.supervisor.deploy(self, gen)
            except MeshaiError as exc:
                if gen is not None:
                    self._retire(gen)
                if gen is not None and self._dead & set(gen.nodes):
                    return  # another node went while deploying: plan again without it too
                why = str(exc)
                rec.error = why
                self._broken = PlanError(
                    f"pipeline {self.name!r} cannot go on without {', '.join(sorted(lost))}: {why}"
                )
                for rid in list(self._futures):
                    self._fail(rid, PlanError(f"request {rid}: {self._broken}"))
                self._ready.set()  # waiting submits see the error instead of hanging
                return
            self._switch(gen)
            rec.generation, rec.deployed_at = gen.number, gen.deployed_at
            rec.lost = tuple(sorted(lost & set(old.nodes))) or rec.lost
        for rid, g in list(self._gen_of.items()):
            if g is old:
                await self._replay(rid, rec)
        self._spawn(self._undeploy(old), f"meshai-release {old.deployment}")
        self._retire(old)

    async def _replay(self, rid: int, rec: Recovery | None = None) -> None:
        """Send a request in flight again, on the current generation."""
        if rid not in self._futures:
            return
        self._partial[rid] = {}
        self.stats.replayed += 1
        if rec is not None:
            rec.replayed += 1
        await self._send(rid, self.gen)

    def all_generations(self) -> list[Generation]:
        """Every generation this pipeline ever deployed, oldest first."""
        return [self._all_gens[k] for k in sorted(self._all_gens)]

    def recovery_report(self) -> list[dict[str, Any]]:
        """Every recovery, JSON-ready (first_result_s: until the new plan's first result)."""
        out = []
        for r in self.recoveries:
            gen = self._all_gens.get(r.generation) if r.generation is not None else None
            out.append(r.to_dict(gen.first_result_at if gen is not None else None))
        return out

    def _fail(self, rid: int, exc: BaseException) -> None:
        self._kept.pop(rid, None)
        self._stamps.pop(rid, None)
        self._labels.pop(rid, None)
        gen = self._gen_of.pop(rid, None)
        fut = self._futures.pop(rid, None)
        self._partial.pop(rid, None)
        self._started.pop(rid, None)
        if fut is not None and not fut.done():
            self.stats.errors += 1
            self._outcome(gen.version if gen is not None else self.gen.version, None, None)
            if self.metrics is not None:
                self.metrics.observe_inference(self.name, self.version, 0.0, ok=False)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved; the awaiting caller still sees it

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._futures)

    async def close(self) -> None:
        """Fail what is still in flight and, if this entry deployed the stages, release them."""
        self._closed = True
        self._ready.set()
        if self._recovering is not None and not self._recovering.done():
            self._recovering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovering
        for t in list(self._bg):
            t.cancel()
        for rid in list(self._futures):
            self._fail(rid, InferenceError(f"pipeline {self.name!r} closed before request {rid} finished"))
        if self.owner:
            await self.undeploy()
        for gen in list(self.generations):
            if self.registry.get(gen.deployment) is self:
                del self.registry[gen.deployment]
