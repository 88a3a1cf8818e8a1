"""The node agent: serves the protocol, owns deployed stages, forwards outputs to the next stage.

``async with NodeAgent(config) as agent`` listens, advertises itself over mDNS, and serves until the
block ends; leaving it says goodbye to every peer, unregisters from mDNS and stops every task.

A stage runs a request as soon as all its inputs have arrived, one request at a time per stage (an
onnxruntime session in a worker thread), and sends each output straight to the node of the stage
that reads it — not back through the caller.  Outputs of the whole model go to the deployment's entry.
A node started with a profile it does not physically have (npu, tpu, mcu here) runs on onnxruntime's
CPU provider, enforces that profile's op, precision and memory limits, says ``emulated: true`` in its
capabilities, and with ``pace`` takes the time its profile predicts for each stage.

A node may also host the entry of a long-lived deployment (``meshai deploy``): it keeps the Pipeline,
takes requests from any client, and relays results back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.capabilities import NodeCapability
from meshai.discovery import Advert, Discovery, make_discovery
from meshai.errors import ConfigError, DeploymentError, MeshaiError, PeerError, SecurityError
from meshai.metrics import Metrics
from meshai.peers import PeerPool
from meshai.pipeline import Pipeline
from meshai.plan import Plan
from meshai.protocol import (
    PROTOCOL_VERSION,
    Control,
    ControlReply,
    Deploy,
    Deployed,
    Error,
    Hello,
    Infer,
    Message,
    Result,
    Undeploy,
    Upload,
    Uploaded,
)
from meshai.transport import Channel, ChannelOptions, Server

if TYPE_CHECKING:
    from meshai.security import Trust
    from nodes.executors.base import StageRunner
    from nodes.store import ModelStore

# onnx, onnxruntime and the scheduler are imported on the first deploy, so that a node starts
# (and shows up in discovery) in a fraction of a second.

log = logging.getLogger(__name__)

#: Per-request stage timings a node keeps for timelines (``events`` control).
EVENTS_KEPT = 2000
#: A request whose inputs have not all arrived after this long is dropped (its upstream died).
PENDING_TTL_S = 120.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """How a node runs: identity, profile, where it listens and advertises."""

    name: str
    capability: NodeCapability
    host: str = "127.0.0.1"
    port: int = 0
    interfaces: tuple[str, ...] = ("127.0.0.1",)
    discovery: str = "mdns"  # "mdns", "static" or "none"
    peers: tuple[str, ...] = ()
    mesh: str = ""
    pace: bool = False
    threads: int = 1
    providers: tuple[str, ...] | None = None
    identity: str | None = None  # identity directory (mesh CA member); None: plain TCP, no membership
    trusted_key: str | None = None  # fleet package-signing public key: only signed packages load
    store: str | None = None  # where verified packages are kept (still encrypted); default: a temp dir
    metrics_port: int | None = None  # serve /metrics, /healthz, /readyz on host:port (0: any free port)
    mqtt: str | None = None  # host:port of the telemetry broker (aggregates only, never tensors)
    site: str = "default"
    telemetry_interval: float = 5.0
    entry_only: bool = False  # host deployments' entries, never run a stage (a site's scheduler service)
    data: str | None = None  # labelled samples (npz x, y) to fine-tune the head on; they never leave the node
    audit_log: str | None = None  # one JSON line per message sent (kinds, shapes, sizes; never values)


@dataclass
class _Stage:
    """One deployed stage on this node."""

    deployment: str
    stage_id: int
    name: str
    session: StageRunner
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    precision: str
    routes: dict[str, tuple[str, ...]]
    to_entry: tuple[str, ...]
    entry: str
    pace_s: float
    executor: ThreadPoolExecutor
    version: str = ""  # the package version this stage runs, stamped on every request it forwards
    stretch: float = 1.0  # the stage takes this many times its time (a simulated slower version)
    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    pending: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    ready: dict[int, float] = field(default_factory=dict)  # when all inputs were in (queue time)
    stamps: dict[int, dict[str, str]] = field(default_factory=dict)  # versions of the stages upstream
    worker: asyncio.Task[None] | None = None
    served: int = 0
    busy_s: float = 0.0


def _package_of(pipe: Pipeline) -> str:
    """The package ref a hosted deployment serves now ("" for one deployed from raw stage models)."""
    ref = str(getattr(pipe.supervisor, "package", ""))
    return f"{ref.rpartition('@')[0]}@{pipe.version}" if ref and pipe.version else ref


def _stretch(value: Any) -> float:
    """The ``stretch`` Deploy option, clamped to [1, 1000] (anything else counts as 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 1.0
    return float(min(1000.0, max(1.0, value)))


def _stage_version(msg: Deploy) -> str:
    """The model version a Deploy loads: its package's, or the ``version`` option for raw models."""
    return msg.package.rpartition("@")[2] if msg.package else str(msg.options.get("version", ""))


class _NodePool(PeerPool):
    """The node's channels; a message the node sends to itself is handled in-process.

    The entry of a long-lived deployment lives on a node that usually runs a stage of it too (stage
    0's node by default): the entry sends that stage its inputs, and the stage reports its outputs
    to the entry, without a channel.
    """

    def __init__(self, agent: NodeAgent) -> None:
        super().__init__(
            agent._hello,
            agent._on_message,
            agent._on_control,
            agent._on_lost,
            trust=agent.trust,
            options=agent._channel_options,
        )
        self._agent = agent

    async def send(self, peer_id: str, msg: Message) -> None:
        """Send to a peer, or hand the message to this node's own dispatch when it is addressed here."""
        if peer_id == self._agent.name:
            await self._agent._deliver_local(msg)
            return
        await super().send(peer_id, msg)


class NodeAgent:
    """A meshai node: ``async with NodeAgent(cfg) as node: await node.serve_forever()``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.name = config.name
        self._stages: dict[str, _Stage] = {}
        self._entries: dict[str, Pipeline] = {}  # long-lived deployments hosted here, by public name
        self._entry_by_stage: dict[str, Pipeline] = {}
        self.rollouts: dict[str, Any] = {}  # deployment -> its RolloutRunner (nodes/versions.py)
        self.abtests: dict[str, Any] = {}  # deployment -> its ABTest
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Server | None = None
        self._discovery: Discovery | None = None
        self.trust: Trust | None = None
        if config.identity:
            from meshai.security import Trust

            self.trust = Trust.from_dir(config.identity)
            if self.trust.identity.name != config.name:
                raise SecurityError(
                    f"identity in {config.identity!r} is for {self.trust.identity.name!r}, not node {config.name!r}"
                )
            if self.trust.identity.role != "node":
                raise SecurityError(
                    f"identity in {config.identity!r} is a {self.trust.identity.role} identity"
                )
        self._store: ModelStore | None = None
        self._store_tmp: str | None = None
        # ref -> (normalized model, GraphIR, calibration JSON or None)
        self._package_graphs: dict[str, tuple[Any, Any, bytes | None]] = {}
        self._package_files: dict[str, dict[str, bytes]] = {}
        self._channel_options: ChannelOptions = {}
        self._audit: Any = None
        if config.audit_log:  # every message this node puts on the wire, recorded by the transport
            from nodes.audit import AuditLog

            self._audit = self._channel_options["audit"] = AuditLog(config.audit_log)
        self.pool: PeerPool = _NodePool(self)
        self._stop = asyncio.Event()
        self.started_at = time.time()
        self.bytes_out = 0  # tensor bytes this node sent to other nodes and entries
        self.metrics = Metrics(node=config.name)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self._lost: set[str] = set()  # nodes we talked to whose channel died (meshai_peers{state="lost"})
        self._known_nodes: set[str] = set()
        self._metrics_server: Any = None
        self._telemetry: Any = None
        self.recorder: Any = None  # TelemetryRecorder when --mqtt is on
        self.slowdown = 1.0  # a paced node emulates an accelerator this many times slower (``slow`` control)

    # ----- lifecycle

    @property
    def address(self) -> str:
        """``host:port`` this node serves on."""
        if self._server is None:
            raise PeerError(f"node {self.name!r} is not listening")
        return f"{self.config.host}:{self._server.port}"

    def _hello(self) -> Hello:
        listen = self.address if self._server is not None else ""
        caps = self.config.capability.to_dict()
        if self.config.entry_only:
            caps["entry_only"] = True
        if self.trust is not None:
            caps["revocations"] = self.trust.version
        return Hello(self.name, PROTOCOL_VERSION, "node", caps, listen)

    def _verify_incoming(self, ch: Channel, hello: Hello) -> None:
        if self.trust is not None:
            self.trust.verify(ch, hello.node_id, hello.role)

    async def __aenter__(self) -> NodeAgent:
        self._server = Server(
            self.config.host,
            self.config.port,
            self._hello,
            self.pool.serve,
            ssl=self.trust.server_ctx if self.trust is not None else None,
            verify=self._verify_incoming,
            **self._channel_options,
        )
        await self._server.__aenter__()
        try:
            if self.config.discovery != "none":
                self._discovery = make_discovery(
                    self.config.discovery, self.config.interfaces, self.config.peers, self.config.mesh
                )
                await self._discovery.__aenter__()
                await self._discovery.register(
                    Advert(
                        self.name,
                        self.config.host,
                        self._server.port,
                        PROTOCOL_VERSION,
                        self.config.capability.summary(),
                        self.trust.identity.fingerprint if self.trust is not None else "",
                    )
                )
            if self.config.mqtt:
                from meshai.telemetry import Telemetry, TelemetryRecorder

                host, _, port = self.config.mqtt.rpartition(":")
                if not host or not port.isdigit():
                    raise ConfigError(f"bad --mqtt {self.config.mqtt!r}: expected host:port")
                self.recorder = TelemetryRecorder(self.name, self.config.site)
                self._telemetry = Telemetry(
                    host,
                    int(port),
                    self.config.site,
                    self.name,
                    self.config.telemetry_interval,
                    snapshot=self.recorder.snapshot,
                )
                await self._telemetry.__aenter__()
            if self.config.metrics_port is not None:
                self._metrics_server = self.metrics.serve(
                    self.config.host, self.config.metrics_port, ready=lambda: self._server is not None
                )
        except BaseException:
            await self._server.close()
            raise
        return self

    @property
    def metrics_address(self) -> str:
        """``host:port`` of the /metrics endpoint, or "" when it is off."""
        if self._metrics_server is None:
            return ""
        return f"{self.config.host}:{self._metrics_server[0].server_port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Serve until ``stop()`` is called."""
        await self._stop.wait()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return (signal handlers call this)."""
        self._stop.set()

    async def close(self) -> None:
        """Release everything: rollouts, entries, stages, channels, mDNS, the listener."""
        for runner in list(self.rollouts.values()):
            await runner.stop()
        self.rollouts.clear()
        for entry in list(self._entries.values()):
            with contextlib.suppress(MeshaiError):
                await entry.close()
        self._entries.clear()
        for st in list(self._stages.values()):
            self._release(st)
        self._stages.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.__aexit__(None, None, None)
        await self.pool.close()
        if self._server is not None:
            await self._server.close()
        if self._telemetry is not None:
            with contextlib.suppress(Exception):
                await self._telemetry.__aexit__(None, None, None)
            self._telemetry = None
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()
            server.server_close()
            self._metrics_server = None
        if self._store_tmp is not None:
            import shutil

            shutil.rmtree(self._store_tmp, ignore_errors=True)
        if self._audit is not None:
            self._audit.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- dispatch

    async def _reply(self, ch: Channel | None, msg: Message) -> None:
        """Answer on ``ch``, or in-process when the message came from this node itself (``ch`` None)."""
        if ch is None:
            await self._deliver_local(msg)
        else:
            await ch.send(msg)

    async def _deliver_local(self, msg: Message) -> None:
        """Handle a message this node sends to itself: a deployment entry it hosts feeds its own stage,
        and that stage reports back to the entry (there is no channel from a node to itself)."""
        await self._on_message(self.name, msg, None)

    async def _on_message(self, peer: str, msg: Message, ch: Channel | None) -> None:
        if isinstance(msg, Deploy):
            await self._reply(ch, await self._deploy(peer, msg))
        elif isinstance(msg, Undeploy):
            st = self._stages.pop(msg.deployment, None)
            if st is not None:
                self._release(st)
        elif isinstance(msg, Infer):
            await self._on_infer(peer, msg, ch)
        elif isinstance(msg, Upload):
            await self._reply(ch, await self._upload(msg))
        elif isinstance(msg, Result | Error | Deployed):
            pipe = self._entry_by_stage.get(msg.deployment)
            if pipe is not None:
                await pipe.on_message(peer, msg)
        # Hello/Heartbeat/Goodbye are handled by the transport

    def _update_peer_gauge(self) -> None:
        live = {p for p, ch in self.pool.live().items() if ch.their_hello.role == "node"}
        self._known_nodes |= live
        self._lost -= live
        self.metrics.set_peers(trusted=len(live), untrusted=0, lost=len(self._lost))

    async def _on_lost(self, peer: str, reason: str) -> None:
        self._update_peer_gauge()
        if peer in self._known_nodes:
            self._lost.add(peer)
        self._update_peer_gauge()
        log.info("node %s: lost %s (%s)", self.name, peer, reason)
        for pipe in list(self._entries.values()):
            await pipe.on_lost(peer, reason)
        if self._discovery is not None:
            self._discovery.forget(peer)

    # ----- stages

    def _require_store(self) -> ModelStore:
        if self._store is not None:
            return self._store
        if not self.config.trusted_key:
            raise SecurityError(
                f"node {self.name!r} has no trusted package key (start it with --trusted-key)"
            )
        import tempfile
        from pathlib import Path

        from nodes.store import ModelStore

        root = self.config.store
        if not root:
            root = self._store_tmp = tempfile.mkdtemp(prefix=f"meshai-store-{self.name}-")
        recipient = None
        if self.trust is not None:
            recipient = (self.trust.identity.name, self.trust.identity.x25519_private)
        try:
            key = Path(self.config.trusted_key).read_bytes()
        except OSError as exc:
            raise SecurityError(
                f"cannot read trusted package key {self.config.trusted_key!r}: {exc.strerror}"
            ) from None
        self._store = ModelStore(Path(root), key, recipient)
        return self._store

    def _stage_model(self, msg: Deploy) -> Any:
        """The stage's ONNX model: the bytes sent (hash-checked), or cut from a verified package."""
        from meshai.models import model_from_bytes

        what = f"stage {msg.stage_id} of {msg.deployment}"
        if msg.model:
            if self.config.trusted_key:
                raise SecurityError(
                    f"node {self.name!r} loads only signed packages; {what} came as raw model bytes"
                )
            digest = hashlib.sha256(msg.model).hexdigest()
            if digest != msg.sha256:
                raise DeploymentError(
                    f"model hash mismatch: got {digest[:12]}…, announced {msg.sha256[:12]}…"
                )
            return model_from_bytes(msg.model, what)
        from meshai.packages import parse_package_ref
        from scheduler.extract import extract_cut
        from scheduler.quantize import CALIBRATION_FILE

        store = self._require_store()
        name, version = parse_package_ref(msg.package)
        store.check_activate(name, version)  # a downgrade is refused before any work
        whole, graph, cal = self.package_graph(msg.package)
        ins = msg.cut_inputs or msg.inputs
        outs = msg.cut_outputs or msg.outputs
        stage = extract_cut(whole, graph, ins, outs, f"stage{msg.stage_id}_{self.name}")
        if msg.options.get("precision") != "int8":
            return stage
        if cal is None:
            raise DeploymentError(
                f"{what} runs int8 but package {msg.package} carries no {CALIBRATION_FILE} to quantize it from"
            )
        from scheduler.quantize import Calibration, quantize, wire_int8

        cal_ = Calibration.from_bytes(cal, f"{CALIBRATION_FILE} of {msg.package}")
        wire = [str(t) for t in msg.options.get("wire_int8", ())]
        return wire_int8(quantize(stage, cal_), wire)

    def package_graph(self, ref: str) -> tuple[Any, Any, bytes | None]:
        """The whole model of a stored package (verified, decrypted in memory), its GraphIR and its
        calibration file; the last one opened is cached."""
        from meshai.models import model_from_bytes
        from meshai.packages import parse_package_ref
        from scheduler.graph import build_graph, normalize_model
        from scheduler.quantize import CALIBRATION_FILE

        cached = self._package_graphs.get(ref)
        if cached is None:
            name, version = parse_package_ref(ref)
            opened = self._require_store().open(name, version)
            whole = normalize_model(model_from_bytes(opened.model(), f"package {ref}"))
            cached = (whole, build_graph(whole, name), opened.files.get(CALIBRATION_FILE))
            self._package_graphs = {ref: cached}  # keep one whole model in memory at most
            self._package_files = {ref: dict(opened.files)}
        return cached

    def _check_profile(self, msg: Deploy, model: Any) -> str:
        """Check a stage against this node's profile (ops, precision, memory); returns the precision."""
        from scheduler.cost import PRECISION_SCALE
        from scheduler.graph import build_graph, normalize_model

        prof = self.config.capability.profile
        precision = str(msg.options.get("precision", "fp32"))
        if precision not in prof.flops:
            raise DeploymentError(
                f"node {self.name!r} ({prof.kind}) does not run {precision} (runs {', '.join(prof.precisions)})"
            )
        graph = build_graph(normalize_model(model), f"stage{msg.stage_id}")
        for op in graph.ops:
            if not prof.supports(op.op_type):
                raise DeploymentError(
                    f"node {self.name!r} ({prof.kind}) does not support op {op.name!r} ({op.op_type})"
                )
        need = int(graph.param_bytes * PRECISION_SCALE.get(precision, 1.0)) + max(
            (op.act_bytes for op in graph.ops), default=0
        )
        if need > prof.memory_bytes:
            raise DeploymentError(
                f"stage {msg.stage_id} needs {need} bytes, node {self.name!r} ({prof.kind}) has {prof.memory_bytes}"
            )
        return precision

    def _prepare(self, msg: Deploy) -> Any:
        model = self._stage_model(msg)
        self._check_profile(msg, model)
        return model

    async def _upload(self, msg: Upload) -> Uploaded:
        try:
            store = self._require_store()
            await asyncio.to_thread(store.add, msg.data, expect=msg.package)
        except MeshaiError as exc:
            return Uploaded(msg.package, False, str(exc))
        return Uploaded(msg.package, True, "")

    def _reusable(self, msg: Deploy) -> _Stage | None:
        """The loaded stage a Deploy may take over: same deployment named in ``reuse``, same tensors in
        and out, same precision (a replanned pipeline keeps what did not change)."""
        st = self._stages.get(str(msg.options.get("reuse", "")))
        if st is None or st.inputs != tuple(msg.inputs) or st.outputs != tuple(msg.outputs):
            return None
        if st.version != _stage_version(msg):  # another model version: its weights differ
            return None
        return st if st.precision == str(msg.options.get("precision", "fp32")) else None

    def _runner(self, msg: Deploy, model: Any) -> StageRunner:
        """The stage loaded on the first of this node's runtimes that can run it: onnxruntime on the ONNX
        stage itself, ORT Mobile or LiteRT on the stage's artifact in the package (found by its cut)."""
        from nodes.executor import StageSession
        from nodes.executors import artifact_path, cut_key

        name = f"stage {msg.stage_id} of {msg.deployment} on {self.name}"
        runtimes = self.config.capability.runtimes
        if "onnxruntime" in runtimes:
            return StageSession(model, self.config.providers, self.config.threads, name)
        only = f"node {self.name!r} runs only {', '.join(runtimes)}"
        if not msg.package:
            raise DeploymentError(
                f"{only}: stage {msg.stage_id} came as a raw model, not as a package's artifact"
            )
        key = cut_key(msg.cut_inputs or msg.inputs, msg.cut_outputs or msg.outputs)
        files = self.package_files(msg.package)
        precision = str(msg.options.get("precision", "fp32"))
        for runtime in runtimes:
            data = files.get(artifact_path(key, runtime, precision))
            if data is None:
                continue
            if runtime == "ort-mobile":
                return StageSession(data, self.config.providers, self.config.threads, name, ort_format=True)
            from nodes.executors.litert import LiteRtSession

            runner = LiteRtSession(data, model, self.config.threads, name)
            runner.runtime = runtime  # litert or litert-fp16: what the node reports it runs
            return runner
        raise DeploymentError(
            f"{only}, and package {msg.package} carries no artifact of stage {msg.stage_id} (cut {key}) for it"
        )

    def package_files(self, ref: str) -> dict[str, bytes]:
        """Every file of a stored package (verified, decrypted in memory; the last one opened is cached)."""
        self.package_graph(ref)
        return self._package_files.get(ref, {})

    async def _deploy(self, peer: str, msg: Deploy) -> Deployed:
        if self.config.entry_only:
            return Deployed(
                msg.deployment, msg.stage_id, False, f"node {self.name!r} hosts entries only (--entry-only)"
            )
        try:
            reuse = self._reusable(msg)
            if reuse is not None:
                session = reuse.session
            else:
                model = await asyncio.to_thread(self._prepare, msg)
                session = await asyncio.to_thread(self._runner, msg, model)
                # one run on zeros before the first request (onnxruntime allocates on its first run),
                # so that a stage — a canary's, say — is not judged on its cold start
                with contextlib.suppress(MeshaiError):
                    await asyncio.to_thread(session.warmup)
            if msg.package and self._store is not None and msg.options.get("activate", True):
                # a canary (activate=False) runs beside the active version without becoming it
                from meshai.packages import parse_package_ref

                await asyncio.to_thread(self._store.activate, *parse_package_ref(msg.package))
        except MeshaiError as exc:  # the stage that was serving keeps serving, untouched
            return Deployed(msg.deployment, msg.stage_id, False, str(exc))
        addresses = msg.options.get("addresses", {})
        if isinstance(addresses, Mapping):
            for node, addr in addresses.items():
                if isinstance(node, str) and isinstance(addr, str) and addr and node != self.name:
                    self.pool.remember(node, addr)
        pace_ms = msg.options.get("pace_ms", msg.options.get("predicted_ms", 0.0))
        pace_s = float(pace_ms) / 1e3 if self.config.pace else 0.0
        old = self._stages.pop(msg.deployment, None)
        if old is not None:
            self._release(old)
        st = _Stage(
            deployment=msg.deployment,
            stage_id=msg.stage_id,
            name=str(msg.options.get("name", msg.deployment)),
            session=session,
            inputs=tuple(msg.inputs),
            outputs=tuple(msg.outputs),
            precision=str(msg.options.get("precision", "fp32")),
            routes={k: tuple(v) for k, v in msg.routes.items()},
            to_entry=tuple(str(t) for t in msg.options.get("to_entry", ())),
            entry=peer,
            pace_s=pace_s,
            executor=ThreadPoolExecutor(1, thread_name_prefix=f"stage-{msg.stage_id}"),
            version=_stage_version(msg),
            stretch=_stretch(msg.options.get("stretch", 1.0)),
        )
        st.worker = self._spawn(self._work(st), f"meshai-stage {msg.deployment}/{msg.stage_id}")
        self._stages[msg.deployment] = st
        return Deployed(msg.deployment, msg.stage_id, True, "")

    def _release(self, st: _Stage) -> None:
        if st.worker is not None:
            st.worker.cancel()
        st.executor.shutdown(wait=False, cancel_futures=True)

    async def _on_infer(self, peer: str, msg: Infer, ch: Channel | None) -> None:
        st = self._stages.get(msg.deployment)
        if st is None:
            entry = self._entries.get(msg.deployment)
            if entry is not None:
                self._spawn(
                    self._serve_entry(peer, entry, msg, ch), f"meshai-entry {msg.deployment}/{msg.request_id}"
                )
                return
            await self._reply(
                ch,
                Error(
                    msg.request_id,
                    "unknown_deployment",
                    f"node {self.name!r} has no deployment {msg.deployment!r}",
                    msg.deployment,
                ),
            )
            return
        unknown = [t for t in msg.tensors if t not in st.inputs]
        if unknown:
            await self._reply(
                ch,
                Error(
                    msg.request_id,
                    "bad_input",
                    f"stage {st.stage_id} on {self.name!r} does not take tensor {unknown[0]!r}",
                    msg.deployment,
                ),
            )
            return
        part = st.pending.setdefault(msg.request_id, {})
        st.arrived.setdefault(msg.request_id, time.monotonic())
        part.update(msg.tensors)
        upstream = msg.meta.get("versions")
        if isinstance(upstream, Mapping):
            st.stamps.setdefault(msg.request_id, {}).update({str(k): str(v) for k, v in upstream.items()})
        self.metrics.add_transfer("received", sum(a.nbytes for a in msg.tensors.values()))
        if all(t in part for t in st.inputs):
            st.ready[msg.request_id] = time.perf_counter()
            st.queue.put_nowait(msg.request_id)
        self._expire(st)

    def _expire(self, st: _Stage) -> None:
        now = time.monotonic()
        for rid, t0 in list(st.arrived.items()):
            if (
                now - t0 > PENDING_TTL_S
                and rid in st.pending
                and not all(t in st.pending[rid] for t in st.inputs)
            ):
                st.pending.pop(rid, None)
                st.arrived.pop(rid, None)
                st.stamps.pop(rid, None)

    async def _work(self, st: _Stage) -> None:
        loop = asyncio.get_running_loop()
        acc = self.config.capability.profile.kind
        watts = self.config.capability.profile.active_w
        stage = str(st.stage_id)
        while True:
            rid = await st.queue.get()
            feeds = st.pending.pop(rid, None)
            st.arrived.pop(rid, None)
            stamps = st.stamps.pop(rid, {})
            ready_at = st.ready.pop(rid, None)
            if feeds is None:
                continue
            t0 = time.perf_counter()
            wall0 = time.time()
            try:
                outs = await loop.run_in_executor(st.executor, st.session.run, feeds)
            except MeshaiError as exc:
                if self.recorder is not None:
                    self.recorder.record(0.0, ok=False)
                await self._report(st, Error(rid, "inference", str(exc), st.deployment))
                continue
            spent = time.perf_counter() - t0
            pace = st.pace_s * self.slowdown
            if st.stretch != 1.0:
                pace = max(pace, spent) * st.stretch
            if pace > spent:
                await asyncio.sleep(pace - spent)
            t1 = time.perf_counter()
            busy = t1 - t0
            st.busy_s += busy
            st.served += 1
            stamps[str(st.stage_id)] = st.version
            await self._forward(st, rid, outs, {"versions": stamps})
            t2 = time.perf_counter()
            m = self.metrics
            if ready_at is not None:
                m.observe_stage(st.name, stage, "queue", max(0.0, t0 - ready_at), accelerator=acc)
            m.observe_stage(st.name, stage, "compute", busy, accelerator=acc)
            m.observe_stage(st.name, stage, "transfer", t2 - t1, accelerator=acc)
            m.add_energy(acc, busy, watts)
            if self.recorder is not None:
                got = sum(a.nbytes for a in feeds.values())
                put = sum(a.nbytes for a in outs.values())
                self.recorder.record((t2 - (ready_at or t0)) * 1e3, bytes_sent=put, bytes_received=got)
            m.set_queue_depth(st.name, stage, st.queue.qsize())
            self.events.append(
                {
                    "deployment": st.name,
                    "stage": st.stage_id,
                    "node": self.name,
                    "request": rid,
                    "start": wall0,
                    "compute_end": wall0 + busy,
                    "end": wall0 + (t2 - t0),
                }
            )

    async def _forward(self, st: _Stage, rid: int, outs: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Send ``outs`` on to the stages that read them and the graph outputs to the entry; ``meta``
        carries the versions of every stage the request went through so far, this one included."""
        by_node: dict[str, dict[str, np.ndarray]] = {}
        for t, nodes in st.routes.items():
            for n in nodes:
                by_node.setdefault(n, {})[t] = outs[t]
        for node, tensors in by_node.items():
            try:
                await self.pool.send(node, Infer(rid, st.deployment, tensors, meta=meta))
                sent = sum(a.nbytes for a in tensors.values())
                self.bytes_out += sent
                self.metrics.add_transfer("sent", sent)
            except PeerError as exc:
                await self._report(
                    st,
                    Error(
                        rid,
                        "unreachable",
                        f"stage {st.stage_id} on {self.name!r} cannot reach {node!r}: {exc}",
                        st.deployment,
                    ),
                )
                return
        if st.to_entry:
            result = {t: outs[t] for t in st.to_entry}
            sent = sum(a.nbytes for a in result.values())
            self.bytes_out += sent
            self.metrics.add_transfer("sent", sent)
            await self._report(st, Result(rid, st.deployment, result, meta=meta))

    async def _report(self, st: _Stage, msg: Message) -> None:
        try:
            await self.pool.send(st.entry, msg)
        except PeerError as exc:
            log.info("node %s: cannot report to entry %s: %s", self.name, st.entry, exc)

    # ----- long-lived deployments hosted here

    async def _serve_entry(self, peer: str, entry: Pipeline, msg: Infer, ch: Channel | None) -> None:
        # an A/B split by robot draws on the sender (or the key it names); a label scores accuracy
        key = msg.meta.get("key")
        label = msg.meta.get("label")
        try:
            outs = await entry.infer(
                msg.tensors,
                key=key if isinstance(key, str) and key else peer,
                label=label if isinstance(label, int) and not isinstance(label, bool) else None,
            )
            await self._reply(ch, Result(msg.request_id, msg.deployment, outs))
        except MeshaiError as exc:
            with contextlib.suppress(PeerError):
                await self._reply(ch, Error(msg.request_id, "inference", str(exc), msg.deployment))

    async def _on_control(self, peer: str, msg: Control) -> ControlReply:
        op, body = msg.op, msg.body
        if op == "status":
            return ControlReply(op, True, self.status())
        if op == "deployments":
            return ControlReply(
                op,
                True,
                {
                    "deployments": [
                        {
                            "name": n,
                            "entry": self.name,
                            "stage_deployment": p.stage_deployment,
                            "version": p.version,
                            "package": _package_of(p),
                            "plan": p.plan.to_dict(),
                            "in_flight": p.in_flight,
                            "served": p.stats.ok,
                            "errors": p.stats.errors,
                        }
                        for n, p in sorted(self._entries.items())
                    ]
                },
            )
        if op == "host":
            name = str(body.get("name", ""))
            if not name:
                return ControlReply(op, False, {"error": "host needs a deployment name"})
            if name in self._entries:
                return ControlReply(
                    op, False, {"error": f"deployment {name!r} already exists on {self.name!r}"}
                )
            plan = Plan.from_dict(body["plan"])
            addresses = body.get("addresses", {})
            for node, addr in dict(addresses).items():
                if node != self.name:
                    self.pool.remember(str(node), str(addr))
            supervisor = None
            recover = body.get("recover")
            if isinstance(recover, Mapping) and self.config.trusted_key:
                from nodes.entry import NodeEntrySupervisor

                supervisor = NodeEntrySupervisor.from_body(self, plan, recover)
            package_ref = str(recover.get("package", "")) if isinstance(recover, Mapping) else ""
            pipe = Pipeline(
                name,
                plan,
                self.pool,
                stage_id=str(body["stage_deployment"]),
                owner=True,
                # end-to-end latency and request counts are measured here, at the entry
                metrics=self.metrics,
                version=package_ref.rpartition("@")[2],
                registry=self._entry_by_stage,
                supervisor=supervisor,
            )
            self._entries[name] = pipe
            # The stages report results to this entry. An entry that runs no stage of the plan (an
            # --entry-only scheduler, or any --entry NODE outside the plan) is unknown to the stage
            # nodes: open a channel to each, so that they hold one back (and learn our address).
            for node in dict.fromkeys(s.node for s in plan.stages):
                if node != self.name:
                    with contextlib.suppress(MeshaiError, OSError, TimeoutError):
                        await self.pool.get(node)
            return ControlReply(op, True, {"name": name, "entry": self.name})
        if op == "revocations":
            return await self._revocations(peer, body)
        if op in ("activate", "store_rollback"):
            return await self._store_op(op, body)
        if op in ("rollout", "ab"):
            from nodes.versions import version_control

            return await version_control(self, op, body)
        if op == "federate":  # fine-tune the head on this node's --data; only weights leave it
            from nodes.federate import on_federate

            return await on_federate(self, body)
        if op == "slow":
            # fault injection for simulations: a paced node's accelerator becomes FACTOR times slower
            factor = body.get("factor")
            if not self.config.pace:
                return ControlReply(
                    op, False, {"error": f"node {self.name!r} is not paced (start it with --pace)"}
                )
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0.01 <= factor <= 1000:
                return ControlReply(
                    op, False, {"error": f"slow needs a factor in [0.01, 1000], got {factor!r}"}
                )
            self.slowdown = float(factor)
            return ControlReply(op, True, {"factor": self.slowdown})
        if op == "metrics":
            self._update_peer_gauge()
            return ControlReply(op, True, {"text": self.metrics.exposition()})
        if op == "events":
            dep = body.get("deployment")
            return ControlReply(
                op, True, {"events": [e for e in self.events if dep is None or e["deployment"] == dep]}
            )
        if op == "adopt_stages":
            # the stages were deployed by a client on this entry's behalf: results must come here
            dep = str(body.get("stage_deployment", ""))
            st = self._stages.get(dep)
            if st is not None:
                st.entry = str(body.get("entry", st.entry))
            return ControlReply(op, st is not None, {})
        if op == "undeploy":
            name = str(body.get("name", ""))
            gone = self._entries.pop(name, None)
            if gone is None:
                return ControlReply(op, False, {"error": f"no deployment {name!r} on {self.name!r}"})
            runner = self.rollouts.pop(name, None)
            if runner is not None:
                await runner.stop()
            self.abtests.pop(name, None)
            await gone.close()
            return ControlReply(op, True, {"name": name})
        return ControlReply(op, False, {"error": f"unknown control op {op!r}"})

    async def _store_op(self, op: str, body: Mapping[str, Any]) -> ControlReply:
        """``activate`` a stored package (never below the highest version activated here), or
        ``store_rollback`` to the version a fleet-signed rollback instruction names."""
        from meshai.packages import RollbackInstruction, parse_package_ref

        try:
            store = self._require_store()
            if op == "activate":
                name, version = parse_package_ref(str(body.get("package", "")))
                m = await asyncio.to_thread(store.activate, name, version)
            else:
                m = await asyncio.to_thread(
                    store.rollback, RollbackInstruction.from_dict(body.get("instruction"))
                )
        except MeshaiError as exc:
            return ControlReply(op, False, {"error": f"node {self.name!r}: {exc}"})
        return ControlReply(op, True, {"active": m.ref})

    async def _revocations(self, peer: str, body: Mapping[str, Any]) -> ControlReply:
        """A peer offers its revocation list: adopt it if it verifies and is newer, cut off whoever it
        revokes, and pass it on to every other peer (flooding stops where a list is not newer)."""
        if self.trust is None:
            return ControlReply(
                "revocations", False, {"error": f"node {self.name!r} runs without an identity"}
            )
        data = body.get("crl")
        if not isinstance(data, bytes):
            return ControlReply("revocations", False, {"error": "revocations needs 'crl' bytes"})
        changed = self.trust.adopt(data)  # SecurityError (bad signature) becomes an error reply
        if changed:
            revoked = set(self.trust.revoked_members())
            for name in revoked:
                self.trust.members.pop(name, None)
                await self.pool.drop(name, "certificate revoked")
            if self._server is not None:
                for ch in self._server.channels:
                    with contextlib.suppress(PeerError):
                        if ch.peer_id in revoked:
                            await ch.close("certificate revoked")
            for pid, ch in self.pool.live().items():
                if pid != peer:
                    self.pool.offer_revocations(ch)
            log.info(
                "node %s: revocation list v%d; cut off %s", self.name, self.trust.version, sorted(revoked)
            )
        return ControlReply("revocations", True, {"version": self.trust.version, "changed": changed})

    def status(self) -> dict[str, Any]:
        """What this node is and runs (the ``status`` control and ``meshai peers``)."""
        return {
            "name": self.name,
            "address": self.address,
            "capabilities": self.config.capability.to_dict(),
            "stages": [
                {
                    "deployment": s.deployment,
                    "name": s.name,
                    "stage": s.stage_id,
                    "runtime": getattr(s.session, "runtime", "onnxruntime"),
                    "served": s.served,
                    "busy_s": round(s.busy_s, 6),
                    "pending": len(s.pending),
                }
                for s in self._stages.values()
            ],
            "entries": sorted(self._entries),
            "peers": sorted(self.pool.live()),  # peers with an open channel (a dead one drops out)
            "bytes_sent": self.bytes_out,
            "metrics": self.metrics_address,
            "uptime_s": round(time.time() - self.started_at, 3),
        }
