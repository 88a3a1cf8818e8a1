"""The public API: ``Mesh`` (peers, plan, deploy) and the ``Pipeline`` a deployment gives you.

```python
async with Mesh() as mesh:
    await mesh.wait_for_peers(3)
    plan, _model = mesh.plan("squeezenet", objective="throughput", stages=3)
    async with mesh.deploy(plan) as pipeline:
        out = await pipeline.infer({"data_0": x})
        async for out in pipeline.stream(batches):
            ...
```

Composition layer: this module wires discovery, the transport, the planner and the pipeline together.
Leaving a block stops every task and closes every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.capabilities import NodeCapability, capability_from_dict
from meshai.discovery import Advert, Discovery, make_discovery
from meshai.errors import ConfigError, DeploymentError, InferenceError, MeshaiError, PeerError, SecurityError
from meshai.peers import PeerPool
from meshai.pipeline import Generation, Pipeline, stage_deployment_id, upload_to
from meshai.plan import Constraints, Plan
from meshai.planning import (
    LoadedModel,
    Quantization,
    built_stages,
    load_for_planning,
    make_plan,
    plan_measured,
)
from meshai.protocol import PROTOCOL_VERSION, Error, Hello, Infer, Message, Result, Uploaded
from meshai.supervise import MeshSupervisor
from meshai.transport import Channel

if TYPE_CHECKING:
    import onnx

    from meshai.security import Trust
    from scheduler.adapt import SloConfig

__all__ = ["Mesh", "Peer", "Pipeline", "RemoteDeployment"]


@dataclass(frozen=True, slots=True)
class Peer:
    """A node this mesh can use: its advert (how it was found) and its full capabilities (from its hello)."""

    name: str
    address: str
    capability: NodeCapability
    entry_only: bool = False  # hosts deployments' entries, never a stage (``meshai node --entry-only``)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "address": self.address, "capabilities": self.capability.to_dict()}


class Mesh:
    """A caller's view of the swarm: discovery, channels to nodes, planning and deployment."""

    def __init__(
        self,
        *,
        interfaces: Sequence[str] = ("127.0.0.1",),
        discovery: str = "mdns",
        peers: Sequence[str] = (),
        mesh: str = "",
        name: str | None = None,
        identity: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        revocations: str | os.PathLike[str] | None = None,
    ) -> None:
        """``identity`` is a directory from ``meshai ca issue`` (default: ``$MESHAI_IDENTITY``); every
        connection is then mutual TLS 1.3 and only nodes with certificates from the same mesh CA are used.
        ``insecure`` (or ``$MESHAI_INSECURE=1``) talks plain TCP to anyone: for debugging only.
        ``revocations`` is a newer ``revoked.json`` (e.g. the CA's) to hand to every node met."""
        if identity and insecure:
            raise ConfigError("give either an identity or insecure=True (--identity or --insecure), not both")
        if not insecure:  # an explicit insecure=True ignores $MESHAI_IDENTITY
            identity = identity or os.environ.get("MESHAI_IDENTITY") or None
            insecure = not identity and os.environ.get("MESHAI_INSECURE") == "1"
        self.trust: Trust | None = None
        if identity:
            from meshai.security import Trust

            self.trust = Trust.from_dir(identity)
            if revocations:
                self.trust.load_newer(revocations)
        elif not insecure:
            raise ConfigError(
                "a mesh identity is needed (--identity DIR from 'meshai ca issue', or $MESHAI_IDENTITY); "
                "--insecure talks to anyone without TLS"
            )
        # with an identity, the mesh speaks as that identity (its certificate names it); ``name`` is ignored
        # (plus a session suffix, so that processes sharing one client identity never collide)
        self.name = (
            f"{self.trust.identity.name}~{secrets.token_hex(3)}"
            if self.trust
            else (name or f"client-{secrets.token_hex(3)}")
        )
        self._discovery: Discovery = make_discovery(discovery, interfaces, peers, mesh)
        self.pool = PeerPool(self._hello, self._on_message, None, self._on_lost, trust=self.trust)
        self._routes: dict[str, Pipeline] = {}  # stage-deployment id -> the pipeline it belongs to
        self._pipelines: list[Pipeline] = []  # every pipeline this mesh runs
        self._remote_waiters: dict[tuple[str, int], asyncio.Future[Message]] = {}
        self._upload_waiters: dict[tuple[str, str], asyncio.Future[Uploaded]] = {}
        self._peers: dict[str, Peer] = {}
        self.untrusted: dict[str, dict[str, str]] = {}
        from meshai.metrics import Metrics

        self.metrics = Metrics(node="entry")
        self._lost: set[str] = (
            set()
        )  # the entry's figures: end-to-end latency, requests, drift  # advertised but not proven members: id -> reason
        self._models: dict[str, LoadedModel] = {}  # by name: what plan() loaded, for deploy(plan)
        # by model name: the constraints (and int8 measurements) plan() used, for replanning
        self._planned: dict[str, tuple[Constraints, Quantization | None]] = {}
        self._next_rid = 1

    def _hello(self) -> Hello:
        caps: dict[str, Any] = {"revocations": self.trust.version} if self.trust is not None else {}
        return Hello(self.name, PROTOCOL_VERSION, "client", caps, "")

    async def __aenter__(self) -> Mesh:
        await self._discovery.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every pipeline, channel and the discovery."""
        for p in list(self._pipelines):
            with contextlib.suppress(MeshaiError):
                await self._close_pipeline(p)
        self._pipelines.clear()
        await self.pool.close()
        with contextlib.suppress(Exception):
            await self._discovery.__aexit__(None, None, None)

    # ----- peers

    async def _connect_advert(self, advert: Advert) -> Peer | None:
        address = f"{advert.host}:{advert.port}"
        try:
            if advert.node_id == address:  # a static-list placeholder: the hello names the node
                ch = await self.pool.connect_address(address)
            else:
                ch = await self.pool.get(advert.node_id, address)
        except (SecurityError, PeerError) as exc:
            if self.trust is not None:  # discovery is a hint: only a proven member is a peer
                self.untrusted[advert.node_id] = {
                    "name": advert.node_id,
                    "address": address,
                    "reason": str(exc),
                }
            raise
        hello = ch.their_hello
        if hello.role != "node":
            return None
        self.untrusted.pop(advert.node_id, None)
        peer = _peer(hello, hello.listen or address)
        self._peers[peer.name] = peer
        return peer

    async def wait_for_peers(self, n: int = 1, timeout: float = 10.0) -> dict[str, Peer]:
        """Wait until ``n`` nodes are found and connected; PeerError says how many were."""
        deadline = time.monotonic() + timeout
        await self._discovery.wait_for(n, timeout)
        while True:
            adverts = self._discovery.peers()
            results = await asyncio.gather(
                *(self._connect_advert(a) for a in adverts.values() if a.node_id not in self._peers),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, MeshaiError):
                    raise r
            live = self.peers()
            self._update_peer_gauge()
            if len(live) >= n:
                return live
            if time.monotonic() > deadline:
                raise PeerError(
                    f"found {len(live)} of {n} nodes within {timeout:g} s ({', '.join(sorted(live))})"
                )
            await asyncio.sleep(0.05)

    def peers(self) -> dict[str, Peer]:
        """Connected nodes by name."""
        live = self.pool.live()
        return {k: p for k, p in sorted(self._peers.items()) if k in live}

    def stage_nodes(self) -> list[str]:
        """Connected nodes that run stages (every node but those started ``--entry-only``), by name."""
        return [n for n, p in self.peers().items() if not p.entry_only]

    def capabilities(self, names: Sequence[str] | None = None) -> list[NodeCapability]:
        """Capabilities of the connected nodes (in name order, or in the order given); by default the
        nodes that run stages."""
        peers = self.peers()
        order = list(names) if names is not None else self.stage_nodes()
        missing = [n for n in order if n not in peers]
        if missing:
            raise PeerError(f"node {missing[0]!r} is not connected (connected: {', '.join(sorted(peers))})")
        return [peers[n].capability for n in order]

    async def status(self, node: str) -> dict[str, Any]:
        """A node's own status report."""
        reply = await self.pool.control(node, "status")
        return dict(reply.body)

    # ----- plan and deploy

    def plan(
        self,
        model: str | LoadedModel,
        *,
        objective: str = "latency",
        stages: int | None = None,
        pins: Mapping[str, str] | None = None,
        nodes: Sequence[str] | None = None,
        batch: int = 1,
        quantization: Quantization | None = None,
        max_accuracy_drop: float | None = None,
        artifacts: Mapping[str, Mapping[frozenset[str], bool]] | None = None,
        artifacts_only: bool = False,
    ) -> tuple[Plan, LoadedModel]:
        """Plan ``model`` over the connected nodes (pure planner; nothing is deployed).

        With ``quantization`` (``meshai.planning.prepare_quantization``) stages may run int8 where the
        measured accuracy cost stays within ``max_accuracy_drop`` points."""
        loaded = model if isinstance(model, LoadedModel) else load_for_planning(model, batch=batch)
        self._models[loaded.name] = loaded
        caps = self.capabilities(nodes)
        if not caps:
            raise PeerError("no nodes connected: call wait_for_peers() first")
        constraints = Constraints(
            objective=objective,
            stages=stages,
            pins=dict(pins or {}),
            max_accuracy_drop=max_accuracy_drop,
            artifacts=artifacts,
            artifacts_only=artifacts_only,
        )
        self._planned[loaded.name] = (constraints, quantization)
        if quantization is not None:
            return plan_measured(loaded, caps, constraints, quantization), loaded
        return make_plan(loaded, caps, constraints), loaded

    def remember_artifacts(self, model: str, artifacts: Mapping[str, Mapping[frozenset[str], bool]]) -> None:
        """Plans made for ``model`` from now on (a recovery's) know which cuts each runtime can run."""
        constraints, quant = self._planned.get(model, (Constraints(), None))
        self._planned[model] = (
            dataclasses.replace(constraints, artifacts=artifacts, artifacts_only=True),
            quant,
        )

    def _tensor_bytes(self, plan: Plan, model: LoadedModel | None) -> dict[str, int] | None:
        """Sizes of the tensors a plan moves (at the planning batch), for bandwidth accounting."""
        try:
            loaded = self._model_for(plan, model)
        except DeploymentError:
            return None
        names = {t for s in plan.stages for t in (*s.inputs, *s.outputs)}
        return {t: loaded.graph.nbytes(t) for t in names}

    def _model_for(self, plan: Plan, model: LoadedModel | None) -> LoadedModel:
        if model is not None:
            return model
        found = self._models.get(plan.model)
        if found is None:
            raise DeploymentError(
                f"no model loaded for the plan of {plan.model!r}: pass the model to deploy()"
            )
        return found

    async def _deploy_generation(
        self,
        pipe: Pipeline,
        gen: Generation,
        model: LoadedModel | None,
        package: tuple[bytes, str] | None,
        has_package: set[str] | None = None,
    ) -> None:
        """Deploy one generation of a pipeline: from a signed package each node cuts its own stage out
        of (uploaded first to the nodes not in ``has_package``, which is then updated), or as stage
        models extracted here."""
        plan = gen.plan
        for node in gen.nodes:
            peer = self._peers.get(node)
            if peer is None:
                raise PeerError(f"plan names node {node!r}, which this mesh has not connected")
            self.pool.remember(node, peer.address)
        built: list[onnx.ModelProto] | None = None
        wire: dict[int, list[str]] = {}
        if package is None or any(s.precision == "int8" for s in plan.stages):
            # int8 stages: which tensors cross as int8 is known once both ends are built
            built, wire = await asyncio.to_thread(built_stages, self._model_for(plan, model), plan)
        if package is not None:
            data, ref = package
            have = has_package if has_package is not None else set()
            todo = [n for n in dict.fromkeys(gen.nodes) if n not in have]
            if todo:
                await pipe.upload(data, ref, nodes=todo)
                have.update(todo)
            await pipe.deploy(None, package=ref, wire_int8=wire, gen=gen)
        else:
            assert built is not None
            await pipe.deploy([m.SerializeToString() for m in built], wire_int8=wire, gen=gen)

    async def deploy_pipeline(
        self,
        plan: Plan,
        model: LoadedModel | None = None,
        *,
        window: int = 16,
        name: str | None = None,
        request_timeout: float = 120.0,
        package: tuple[bytes, str] | None = None,
        recover: bool = True,
        slo: SloConfig | None = None,
    ) -> Pipeline:
        """Deploy ``plan``'s stages and return the running Pipeline (close it with ``await p.close()``).

        ``package`` is ``(signed package bytes, "name@version")``: nodes verify it and cut their stages
        out of it themselves (nodes started with ``--trusted-key`` accept nothing else).

        With ``recover`` (the default) the pipeline survives lost nodes: it replans over the live nodes,
        deploys the new plan and replays the requests in flight (see ``meshai.pipeline``); lost nodes
        that come back, and new ones, are offered to the planner.  ``slo`` adds the closed loop that
        replans when p95 latency stays above it.  ``recover=False`` fails the requests a lost node
        touched instead."""
        loaded = self._model_for(plan, model)
        supervisor: MeshSupervisor | None = None
        if recover:
            constraints, quant = self._planned.get(loaded.name, (Constraints(objective=plan.objective), None))
            constraints = dataclasses.replace(constraints, objective=plan.objective, pins=dict(plan.pins))
            supervisor = MeshSupervisor(self, loaded, constraints, package, quant, slo=slo)
        elif slo is not None:
            raise ConfigError("an SLO needs recover=True (it replans)")
        pipe = Pipeline(
            name or plan.model or "model",
            plan,
            self.pool,
            window=window,
            request_timeout=request_timeout,
            metrics=self.metrics,
            version=package[1].rpartition("@")[2] if package else "",
            tensor_bytes=self._tensor_bytes(plan, model),
            registry=self._routes,
            supervisor=supervisor,
        )
        try:
            if supervisor is not None and package is not None:
                # every node that runs stages holds the package up front, so that any can take over
                standby = self.stage_nodes()
                await pipe.upload(package[0], package[1], nodes=standby)
                supervisor.has_package.update(standby)
            await self._deploy_generation(
                pipe, pipe.gen, loaded, package, supervisor.has_package if supervisor else None
            )
        except BaseException:
            await pipe.close()
            raise
        self._pipelines.append(pipe)
        if supervisor is not None:
            supervisor.start(pipe)
        return pipe

    async def _close_pipeline(self, pipe: Pipeline) -> None:
        if pipe in self._pipelines:
            self._pipelines.remove(pipe)
        sup = pipe.supervisor
        if isinstance(sup, MeshSupervisor):
            await sup.stop()
        await pipe.close()

    @contextlib.asynccontextmanager
    async def deploy(
        self,
        plan: Plan,
        model: LoadedModel | None = None,
        *,
        window: int = 16,
        request_timeout: float = 120.0,
        package: tuple[bytes, str] | None = None,
        recover: bool = True,
        slo: SloConfig | None = None,
    ) -> AsyncIterator[Pipeline]:
        """``async with mesh.deploy(plan) as pipeline``: stages released on exit (see ``deploy_pipeline``)."""
        pipe = await self.deploy_pipeline(
            plan,
            model,
            window=window,
            request_timeout=request_timeout,
            package=package,
            recover=recover,
            slo=slo,
        )
        try:
            yield pipe
        finally:
            await self._close_pipeline(pipe)

    # ----- long-lived deployments

    async def deploy_named(
        self,
        name: str,
        plan: Plan,
        model: LoadedModel | None = None,
        entry: str | None = None,
        package: tuple[bytes, str] | None = None,
    ) -> dict[str, Any]:
        """Deploy and leave serving: the stages stay, their entry lives on a node (``entry`` or stage 0's)."""
        if not name or len(name) > 63:
            raise ConfigError(f"deployment name must be 1-63 characters, got {name!r}")
        existing = await self.deployments()
        if any(d["name"] == name for d in existing):
            raise DeploymentError(f"a deployment named {name!r} already exists")
        entry = entry or plan.stages[0].node
        if entry not in self.peers():
            raise PeerError(f"entry node {entry!r} is not connected")
        sid = stage_deployment_id(name)
        pipe = Pipeline(name, plan, self.pool, stage_id=sid, owner=False, registry=self._routes)
        try:
            body: dict[str, Any] = {"name": name, "plan": plan.to_dict(), "stage_deployment": sid}
            standby = list(pipe.nodes)
            if package is not None:
                # every node that runs stages holds the package, so that the entry can replan over any
                standby = self.stage_nodes()
                # and so does the entry: it reads the model from it when it replans
                await pipe.upload(package[0], package[1], nodes=sorted({*standby, entry}))
                loaded = self._models.get(plan.model)
                constraints = (
                    self._planned.get(plan.model, (Constraints(), None))[0] if loaded else Constraints()
                )
                body["recover"] = {
                    "package": package[1],
                    "stages": constraints.stages,
                    "pins": dict(plan.pins),
                    "standby": standby,
                }
            await self._deploy_generation(pipe, pipe.gen, model, package, set(standby) if package else None)
            body["addresses"] = {n: self._peers[n].address for n in dict.fromkeys([*pipe.nodes, *standby])}
            reply = await self.pool.control(entry, "host", body)
            if not reply.ok:
                await pipe.undeploy()
                raise DeploymentError(f"entry {entry!r} refused to host {name!r}: {reply.body.get('error')}")
            for node in pipe.nodes:
                await self.pool.control(node, "adopt_stages", {"stage_deployment": sid, "entry": entry})
        finally:
            self._routes.pop(sid, None)
        return {"name": name, "entry": entry, "plan": plan.to_dict()}

    async def upload(self, package: tuple[bytes, str], nodes: Sequence[str], timeout: float = 120.0) -> None:
        """Hand a signed package (bytes, ``name@version``) to ``nodes``; each verifies and stores it.
        DeploymentError names a node that refused it and why (or did not answer)."""
        data, ref = package
        loop = asyncio.get_running_loop()
        waits = {n: loop.create_future() for n in dict.fromkeys(nodes)}
        for n, fut in waits.items():
            self._upload_waiters[(n, ref)] = fut
        try:
            await upload_to(self.pool, waits, data, ref, timeout)
        finally:
            for n in waits:
                self._upload_waiters.pop((n, ref), None)

    async def deployments(self) -> list[dict[str, Any]]:
        """Long-lived deployments hosted by any connected node."""
        out: list[dict[str, Any]] = []
        for node in sorted(self.peers()):
            try:
                reply = await self.pool.control(node, "deployments", timeout=5.0)
            except PeerError:
                continue
            out.extend(reply.body.get("deployments", []))
        return out

    async def find(self, name: str) -> dict[str, Any]:
        """The long-lived deployment ``name`` as its entry lists it (entry, version, package, plan, …);
        DeploymentError naming the deployments there are when no connected node hosts it."""
        deps = await self.deployments()
        for d in deps:
            if d.get("name") == name:
                return dict(d)
        known = ", ".join(sorted(str(d.get("name")) for d in deps)) or "none"
        raise DeploymentError(f"no deployment named {name!r} on the mesh (deployments: {known})")

    async def attach(self, name: str) -> RemoteDeployment:
        """A handle on a long-lived deployment by name (its entry is found among the connected nodes)."""
        d = await self.find(name)
        return RemoteDeployment(self, name, str(d["entry"]), Plan.from_dict(d["plan"]))

    async def undeploy(self, name: str) -> None:
        """Release a long-lived deployment (its entry undeploys every stage)."""
        d = await self.find(name)
        reply = await self.pool.control(str(d["entry"]), "undeploy", {"name": name})
        if not reply.ok:
            raise DeploymentError(str(reply.body.get("error")))

    # ----- message routing

    async def _on_message(self, peer: str, msg: Message, ch: Channel) -> None:
        dep = getattr(msg, "deployment", None)
        if isinstance(msg, Result | Error) and msg.request_id is not None:
            fut = self._remote_waiters.pop((peer, msg.request_id), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
                return
        if dep is not None and dep in self._routes:
            await self._routes[dep].on_message(peer, msg, ch)
        elif isinstance(msg, Uploaded):
            waiter = self._upload_waiters.get((peer, msg.package))
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
                return
            for p in {id(p): p for p in self._routes.values()}.values():
                await p.on_message(peer, msg, ch)

    def _update_peer_gauge(self) -> None:
        live = self.peers()
        self._lost -= set(live)
        self.metrics.set_peers(trusted=len(live), untrusted=len(self.untrusted), lost=len(self._lost))

    async def _on_lost(self, peer: str, reason: str) -> None:
        if peer in self._peers:
            self._lost.add(peer)
        self._update_peer_gauge()
        self._discovery.forget(peer)
        for p in {id(p): p for p in self._routes.values()}.values():
            await p.on_lost(peer, reason)
        for (node, _rid), fut in list(self._remote_waiters.items()):
            if node == peer and not fut.done():
                fut.set_exception(PeerError(f"entry node {peer!r} is gone: {reason}"))

    def unreachable(self) -> list[str]:
        """Nodes lost and not reached since, plus nodes advertised but never connected."""
        known = set(self._peers)
        fresh = [a for a, _ in self._discovery.peers().items() if a not in known]
        return sorted(self._lost - set(self.peers())) + sorted(fresh)

    async def reach(self, name: str) -> bool:
        """Try to (re)connect to node ``name``: a lost one at its last address, a new one from its advert.
        True when it is connected."""
        if name in self.peers():
            return True
        peer = self._peers.get(name)
        if peer is not None:
            ch = await self.pool.get(name, peer.address)
            hello = ch.their_hello
            self._peers[name] = _peer(hello, hello.listen or peer.address)
        else:
            advert = self._discovery.peers().get(name)
            if advert is None or await self._connect_advert(advert) is None:
                return False
        self._update_peer_gauge()
        return name in self.peers()

    def _remote_rid(self) -> int:
        self._next_rid += 1
        return self._next_rid


def _peer(hello: Hello, address: str) -> Peer:
    """A Peer from a node's hello (``entry_only`` when it said it takes no stages)."""
    caps = hello.capabilities
    return Peer(hello.node_id, address, capability_from_dict(caps), bool(caps.get("entry_only", False)))


class RemoteDeployment:
    """A long-lived deployment used through its entry node (``Mesh.attach``)."""

    def __init__(self, mesh: Mesh, name: str, entry: str, plan: Plan) -> None:
        self.mesh = mesh
        self.name = name
        self.entry = entry
        self.plan = plan

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        timeout: float = 120.0,
        *,
        key: str = "",
        label: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request through the deployment's entry.  ``key`` names the robot it comes from (an
        A/B split by robot draws on it; default: this client's identity); ``label``, when known, is the
        class it should get (the entry scores accuracy per version)."""
        meta: dict[str, Any] = {}
        if key:
            meta["key"] = key
        if label is not None:
            meta["label"] = int(label)
        rid = self.mesh._remote_rid()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.mesh._remote_waiters[(self.entry, rid)] = fut
        try:
            await self.mesh.pool.send(
                self.entry, Infer(rid, self.name, {k: np.asarray(v) for k, v in inputs.items()}, meta=meta)
            )
            async with asyncio.timeout(timeout):
                msg = await fut
        except TimeoutError:
            raise InferenceError(f"deployment {self.name!r}: no result within {timeout:g} s") from None
        finally:
            self.mesh._remote_waiters.pop((self.entry, rid), None)
        if isinstance(msg, Error):
            raise InferenceError(f"deployment {self.name!r}: {msg.message}")
        assert isinstance(msg, Result)
        return dict(msg.tensors)
