"""A deployed plan seen from its entry: deploy stages, submit requests, collect results in order.

The entry is the caller's process (``meshai run``, ``meshai sim``, ``Mesh.deploy``) or, for a
long-lived deployment, a node that hosts it.  The entry sends each request's graph inputs to the
stages that read them; stages forward activations straight to each other; the stages that produce
graph outputs send ``Result`` back to the entry.  A request that touches a node which dies fails with
a ``PeerError`` naming it; a request never waits forever (``request_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.errors import DeploymentError, InferenceError, MeshaiError, PeerError
from meshai.peers import PeerPool
from meshai.plan import Plan
from meshai.protocol import Deploy, Deployed, Error, Infer, Message, Result, Undeploy, Upload, Uploaded
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
    """What the entry measured: per-request latency, bytes sent, outcomes."""

    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    bytes_sent: int = 0
    first_sent: float | None = None
    last_result: float | None = None

    def latency_ms(self) -> dict[str, float]:
        """End-to-end latency percentiles of the requests that succeeded."""
        return percentiles_ms(self.latencies_s)

    def throughput_rps(self) -> float:
        """Results delivered per second, from the first request sent to the last result."""
        if self.first_sent is None or self.last_result is None or self.last_result <= self.first_sent:
            return 0.0
        return round(self.ok / (self.last_result - self.first_sent), 3)


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
    ) -> None:
        self.name = name
        self.plan = plan
        self.pool = pool
        self.stage_deployment = stage_id or stage_deployment_id(name)
        self.window = window
        self.request_timeout = request_timeout
        self.owner = owner
        self.stats = PipelineStats()
        self.metrics = metrics
        self.version = version
        self._saved_per_request = 0
        self.drift: EntryDrift | None = None  # set by enable_drift()
        self._inputs_kept: dict[int, dict[str, np.ndarray]] = {}
        self._since_drift_export = 0
        if metrics is not None:
            metrics.declare_model(name, version)
            if tensor_bytes is not None:
                from meshai.metrics import bandwidth_saved_bytes

                with contextlib.suppress(MeshaiError):
                    self._saved_per_request = bandwidth_saved_bytes(plan, tensor_bytes)
        self._sem = asyncio.Semaphore(window)
        self._next = 1
        self._futures: dict[int, asyncio.Future[Tensors]] = {}
        self._partial: dict[int, Tensors] = {}
        self._started: dict[int, float] = {}
        self._deployed: dict[int, asyncio.Future[Deployed]] = {}
        self._uploaded: dict[str, asyncio.Future[Uploaded]] = {}
        self._closed = False
        self.input_routes: dict[str, list[str]] = {}  # node -> graph inputs it reads
        for s in plan.stages:
            mine = [t for t in s.inputs if t in plan.inputs]
            if mine:
                self.input_routes[s.node] = mine
        self.nodes = tuple(s.node for s in plan.stages)

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
    ) -> list[Deploy]:
        """One Deploy message per stage (what ``deploy`` sends): the stage's model bytes, or — with
        ``package`` — a reference to a signed package the node holds plus the stage's cut tensors.
        ``wire_int8`` names, per stage id, the boundary tensors it sends or receives as int8."""
        if package:
            stage_models = [b""] * len(self.plan.stages)
        if stage_models is None or len(stage_models) != len(self.plan.stages):
            n = 0 if stage_models is None else len(stage_models)
            raise DeploymentError(f"{n} stage models for {len(self.plan.stages)} stages")
        node_of = {s.id: s.node for s in self.plan.stages}
        addresses = {n: self.pool.address_of(n) or "" for n in self.nodes}
        out = []
        for s, model in zip(self.plan.stages, stage_models, strict=True):
            routes = {t: tuple(node_of[d] for d in dests) for t, dests in s.routes.items()}
            opts = dict(options or {})
            opts.update(
                {
                    "addresses": addresses,
                    "predicted_ms": s.predicted_ms,
                    "precision": s.precision,
                    "wire_int8": list((wire_int8 or {}).get(s.id, ())),
                    "to_entry": [t for t in s.outputs if t in self.plan.outputs],
                    "name": self.name,
                }
            )
            out.append(
                Deploy(
                    deployment=self.stage_deployment,
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

    async def upload(self, package: bytes, ref: str, timeout: float = 120.0) -> None:
        """Hand the signed package ``ref`` (``name@version``) to every node of the plan; each verifies and
        stores it.  DeploymentError names the node that refused it and why."""
        loop = asyncio.get_running_loop()
        nodes = list(dict.fromkeys(self.nodes))
        self._uploaded = {n: loop.create_future() for n in nodes}
        await asyncio.gather(*(self.pool.send(n, Upload(ref, package)) for n in nodes))
        try:
            async with asyncio.timeout(timeout):
                acks = await asyncio.gather(*self._uploaded.values())
        except TimeoutError:
            missing = [n for n, f in self._uploaded.items() if not f.done()]
            raise DeploymentError(
                f"no answer to upload from {', '.join(missing)} within {timeout:g} s"
            ) from None
        for node, ack in zip(nodes, acks, strict=True):
            if not ack.ok:
                raise DeploymentError(f"node {node!r} refused package {ref}: {ack.message}")

    async def deploy(
        self,
        stage_models: Sequence[bytes] | None,
        options: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        package: str = "",
        wire_int8: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        """Send every stage to its node and wait until all are loaded; DeploymentError names a refusal.

        With ``package`` (a ref already uploaded), each node cuts its own stage out of the package."""
        msgs = self.deploy_messages(stage_models, options, package, wire_int8)
        loop = asyncio.get_running_loop()
        for m in msgs:
            self._deployed[m.stage_id] = loop.create_future()
        await asyncio.gather(
            *(self.pool.send(s.node, m) for s, m in zip(self.plan.stages, msgs, strict=True))
        )
        try:
            async with asyncio.timeout(timeout):
                acks = await asyncio.gather(*self._deployed.values())
        except TimeoutError:
            missing = [self.plan.stages[k].node for k, f in self._deployed.items() if not f.done()]
            raise DeploymentError(
                f"no answer to deploy from {', '.join(missing)} within {timeout:g} s"
            ) from None
        bad = [a for a in acks if not a.ok]
        if bad:
            await self.undeploy()
            b = bad[0]
            raise DeploymentError(
                f"node {self.plan.stages[b.stage_id].node!r} refused stage {b.stage_id}: {b.message}"
            )

    async def undeploy(self) -> None:
        """Release every stage (best effort)."""
        for node in self.nodes:
            with contextlib.suppress(PeerError):
                await self.pool.send(node, Undeploy(self.stage_deployment))

    # ----- requests

    async def submit(self, inputs: Mapping[str, np.ndarray]) -> asyncio.Future[Tensors]:
        """Send one request (waits while ``window`` are in flight); returns the future of its outputs."""
        missing = [t for t in self.plan.inputs if t not in inputs]
        if missing:
            raise InferenceError(
                f"request is missing input {missing[0]!r} (inputs: {', '.join(self.plan.inputs)})"
            )
        if self._closed:
            raise InferenceError(f"pipeline {self.name!r} is closed")
        await self._sem.acquire()
        rid = self._next
        self._next += 1
        fut: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._sem.release())
        self._futures[rid] = fut
        self._partial[rid] = {}
        if self.drift is not None:
            self._inputs_kept[rid] = {t: np.asarray(inputs[t]) for t in self.plan.inputs}
        now = time.perf_counter()
        self._started[rid] = now
        if self.stats.first_sent is None:
            self.stats.first_sent = now
        try:
            for node, names in self.input_routes.items():
                msg = Infer(rid, self.stage_deployment, {t: np.asarray(inputs[t]) for t in names})
                await self.pool.send(node, msg)
                self.stats.bytes_sent += sum(np.asarray(inputs[t]).nbytes for t in names)
        except PeerError as exc:
            self._fail(rid, PeerError(f"request {rid}: {exc}"))
        return fut

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run one request and return its outputs."""
        fut = await self.submit(inputs)
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
        queue: asyncio.Queue[asyncio.Future[Tensors] | None] = asyncio.Queue()

        async def feed() -> None:
            try:
                if isinstance(batches, AsyncIterable):
                    async for b in batches:
                        await queue.put(await self.submit(b))
                else:
                    for b in batches:
                        await queue.put(await self.submit(b))
            finally:
                await queue.put(None)

        feeder = asyncio.get_running_loop().create_task(feed(), name=f"meshai-feed {self.name}")
        try:
            while True:
                fut = await queue.get()
                if fut is None:
                    break
                try:
                    yield await self._await(fut)
                except (InferenceError, PeerError) as exc:
                    yield exc
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    # ----- messages from stage nodes

    async def on_message(self, peer: str, msg: Message, ch: Channel | None = None) -> None:
        """Handle Result, Error and Deployed messages for this pipeline."""
        if isinstance(msg, Result):
            part = self._partial.get(msg.request_id)
            if part is None:
                return  # late or duplicate
            part.update(msg.tensors)
            if all(t in part for t in self.plan.outputs):
                fut = self._futures.pop(msg.request_id, None)
                self._partial.pop(msg.request_id, None)
                started = self._started.pop(msg.request_id, None)
                if fut is not None and not fut.done():
                    now = time.perf_counter()
                    if started is not None:
                        self.stats.latencies_s.append(now - started)
                        if self.metrics is not None:
                            self.metrics.observe_inference(self.name, self.version, now - started, ok=True)
                            if self._saved_per_request:
                                self.metrics.add_bandwidth_saved(self.name, self._saved_per_request)
                    self.stats.last_result = now
                    self.stats.ok += 1
                    outs = {t: part[t] for t in self.plan.outputs}
                    kept = self._inputs_kept.pop(msg.request_id, None)
                    if self.drift is not None and kept is not None:
                        with contextlib.suppress(MeshaiError):
                            self.drift.observe(kept, outs)
                        self._since_drift_export += 1
                        if self._since_drift_export >= DRIFT_EXPORT_EVERY:
                            self._since_drift_export = 0
                            self._export_drift()
                    fut.set_result(outs)
        elif isinstance(msg, Error):
            if msg.request_id is not None and msg.request_id in self._futures:
                self._fail(
                    msg.request_id,
                    InferenceError(f"request {msg.request_id} failed on {peer!r}: {msg.message}"),
                )
        elif isinstance(msg, Uploaded):
            fut3 = self._uploaded.get(peer)
            if fut3 is not None and not fut3.done():
                fut3.set_result(msg)
        elif isinstance(msg, Deployed):
            fut2 = self._deployed.get(msg.stage_id)
            if fut2 is not None and not fut2.done():
                fut2.set_result(msg)

    async def on_lost(self, peer: str, reason: str) -> None:
        """A node of this plan is gone: every request in flight fails, naming it."""
        if peer not in self.nodes:
            return
        stage = next(s.id for s in self.plan.stages if s.node == peer)
        for rid in list(self._futures):
            self._fail(
                rid, PeerError(f"request {rid} failed: node {peer!r} (stage {stage}) is gone: {reason}")
            )
        for k, f in self._deployed.items():
            if not f.done() and self.plan.stages[k].node == peer:
                f.set_result(Deployed(self.stage_deployment, k, False, f"node {peer!r} is gone: {reason}"))

    def _fail(self, rid: int, exc: BaseException) -> None:
        self._inputs_kept.pop(rid, None)
        fut = self._futures.pop(rid, None)
        self._partial.pop(rid, None)
        self._started.pop(rid, None)
        if fut is not None and not fut.done():
            self.stats.errors += 1
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
        for rid in list(self._futures):
            self._fail(rid, InferenceError(f"pipeline {self.name!r} closed before request {rid} finished"))
        if self.owner:
            await self.undeploy()
