"""``meshai sim``: a real swarm of node processes on loopback, planned, deployed, streamed, checked.

Starts N ``meshai node`` processes (real mDNS on 127.0.0.1, a mesh id of its own so side-by-side
simulations never see each other), waits until the caller sees every node, plans the model over
them, deploys, streams R requests through the pipeline, compares every result with the whole model
run by onnxruntime in this process, and stops every process — also on Ctrl-C or error.
Composition layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshai.errors import ConfigError, MeshaiError, PeerError, check_min
from meshai.faults import Fault
from meshai.progress import Progress
from meshai.sim_runtimes import needs_artifacts

#: Drift at the sim's entry: reference from the first DRIFT_WARMUP requests (unless --reference),
#: scores over the last DRIFT_WINDOW; the default thresholds are calibrated for these sizes.
DRIFT_WARMUP = 500
DRIFT_WINDOW = 500


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Everything ``meshai sim`` takes (ARCHITECTURE.md's Interfaces)."""

    model: str
    nodes: int = 3
    profiles: tuple[str, ...] = ()
    requests: int = 100
    objective: str = "latency"
    stages: int | None = None
    pins: dict[str, str] = field(default_factory=dict)
    inputs: str | None = None
    outputs: str | None = None
    seed: int = 0
    pace: bool = False
    window: int = 8
    batch: int = 1
    profiles_file: str | None = None
    discovery_timeout: float = 30.0
    insecure: bool = False  # plain TCP, raw stage models: debugging only
    prom_file: str | None = None  # write the swarm's final Prometheus exposition here
    reference: str | None = None  # drift reference inputs (npz); default: the first requests

    report: str | None = None  # write a PNG of the run into this directory
    ca: str | None = None  # an existing mesh CA to issue the sim's identities from (default: a throwaway one)
    # overflow to Ray: requests arrive all at once (or ``rate`` per second) and those that find the
    # swarm's queue at ``offload_threshold`` or more run on Ray
    offload: str | None = None
    offload_threshold: int | None = None
    rate: float | None = None
    ray_address: str | None = None
    ray_actors: int = 2
    ray_cpus: int = 2
    # precision with placement: int8 stages where the measured accuracy cost fits the budget
    calibration: str | None = None
    eval: str | None = None
    labels: str | None = None
    max_accuracy_drop: float | None = None
    per_channel: bool = False
    # failures and emulated networks: faults fired after N results, a latency SLO the entry holds by
    # replanning, each node in a network namespace of its own, links shaped by tc or meshai's emulator
    faults: tuple[Fault, ...] = ()
    slo_ms: float | None = None
    netns: bool = False
    link: str | None = None
    recover: bool = True
    # a staged rollout of another model as the package's next version, started mid-stream
    rollout_to: str | None = None
    canary_slowdown: float = 1.0
    rollout_stages: str = "25%,50%,100%"
    rollout_at: int | None = None
    max_p95_regression: str = "25%"
    # node i runs only the i-th runtime (onnxruntime, ort-mobile, litert); stages are converted for them
    runtimes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.netns and self.offload:
            raise ConfigError(
                "--netns and --offload ray cannot be combined (Ray runs outside the namespaces)"
            )
        if any(f.kind == "slow" for f in self.faults) and not self.pace:
            raise ConfigError("--slow needs --pace (a paced node emulates its accelerator's speed)")
        if self.slo_ms is not None and not (self.slo_ms > 0 and self.slo_ms < float("inf")):
            raise ConfigError(f"--slo must be a positive p95 latency in ms, got {self.slo_ms}")
        if self.slo_ms is not None and not self.recover:
            raise ConfigError("--slo needs recovery (it replans); drop --no-recover")
        if self.offload not in (None, "ray"):
            raise ConfigError(f"--offload must be 'ray', got {self.offload!r}")
        if self.offload and self.offload_threshold is None:
            raise ConfigError("--offload ray needs --offload-threshold Q (the swarm queue depth that spills)")
        if not self.offload:
            for flag, value in (("--offload-threshold", self.offload_threshold), ("--rate", self.rate)):
                if value is not None:
                    raise ConfigError(f"{flag} applies only with --offload ray")
        if self.offload_threshold is not None and self.offload_threshold < 1:
            raise ConfigError(f"--offload-threshold must be >= 1, got {self.offload_threshold}")
        if self.rate is not None and not (self.rate > 0 and self.rate < float("inf")):
            raise ConfigError(f"--rate must be a positive number of requests per second, got {self.rate}")
        if not (0.01 <= self.canary_slowdown <= 1000):
            raise ConfigError(f"--canary-slowdown must be in [0.01, 1000], got {self.canary_slowdown}")
        if self.runtimes:
            from nodes.executors import RUNTIMES

            if len(self.runtimes) != self.nodes:
                raise ConfigError(
                    f"--runtimes names {len(self.runtimes)} runtimes but --nodes is {self.nodes}"
                )
            bad = [r for r in self.runtimes if r not in RUNTIMES]
            if bad:
                raise ConfigError(f"unknown runtime {bad[0]!r} in --runtimes (known: {', '.join(RUNTIMES)})")
            if self.insecure and any(r != "onnxruntime" for r in self.runtimes):
                raise ConfigError(
                    "--runtimes other than onnxruntime load converted stages from a signed package: drop --insecure"
                )
        if self.rollout_to is None:
            if self.canary_slowdown != 1.0 or self.rollout_at is not None:
                raise ConfigError("--canary-slowdown and --rollout-at apply only with --rollout-to MODEL2")
            return
        if self.insecure:
            raise ConfigError("--rollout-to ships the new version as a signed package: drop --insecure")
        if self.offload or self.calibration:
            raise ConfigError("--rollout-to cannot be combined with --offload or --calibration")
        if self.rollout_at is not None and not 0 <= self.rollout_at < self.requests:
            raise ConfigError(f"--rollout-at must be in [0, {self.requests}), got {self.rollout_at}")


def _profile_names(opts: SimOptions) -> list[str]:
    if not opts.profiles:
        return ["cpu"] * opts.nodes
    if len(opts.profiles) != opts.nodes:
        raise ConfigError(f"--profiles names {len(opts.profiles)} nodes but --nodes is {opts.nodes}")
    return list(opts.profiles)


# What a node process imports before it can advertise (about 0.3 s of CPU): loaded once in the fork server
# instead of once per node, so that eight nodes on two cores are up in well under a second.
NODE_PRELOAD = (
    "__main__",
    "meshai.cli",
    "nodes.agent",
    "meshai.security",
    "meshai.transport",
    "meshai.metrics",
)
NODE_COMM = b"meshai-node"  # the process name (``ps -o comm``, /proc/PID/comm) of a forked node


def _set_process_name(name: bytes) -> None:
    """Set this process's name as ``ps`` and /proc/PID/comm show it (Linux prctl PR_SET_NAME)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _node_main(argv: list[str], log_path: str, namespace: str = "") -> None:
    """Body of one forked node process: its own session (a terminal's Ctrl-C goes to the sim, which ends
    the nodes), its network namespace (``--netns``), stdin/stdout on /dev/null, stderr into its log,
    then exactly ``meshai node ARGV``."""
    os.setsid()
    if namespace:
        from meshai.netns import enter_namespace

        enter_namespace(namespace)
    _set_process_name(NODE_COMM)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    from meshai.cli import main

    raise SystemExit(main(["node", *argv]))


def _fork_context() -> Any:
    """multiprocessing's fork server, preloaded with the node's imports (started on first use, with
    OMP_NUM_THREADS=1 unless set, so that numpy and onnxruntime in each node keep to one thread)."""
    import multiprocessing
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(NODE_PRELOAD))
    had = "OMP_NUM_THREADS" in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if not had:
            os.environ.pop("OMP_NUM_THREADS", None)
    return ctx


class NodeProcesses:
    """Node processes, each running ``meshai node`` with its own pid, session and log, ended by pid when
    the block exits (SIGTERM, then SIGKILL).

    They are forked from multiprocessing's fork server, which imports the node's modules once: starting
    a node then costs a fork rather than an interpreter start-up and 0.3 s of imports, which on a
    two-core machine is most of the time from launch to a discovered swarm.  ``ps`` names them
    ``meshai-node``."""

    def __init__(
        self,
        names: Sequence[str],
        profiles: Sequence[str],
        mesh: str,
        pace: bool,
        profiles_file: str | None = None,
        extra: Sequence[str] = (),
        identities: Path | None = None,
        network: Any = None,
        runtimes: Sequence[str] = (),
    ) -> None:
        self.identities = identities  # a directory holding one identity directory per node name
        self.runtimes = dict(zip(names, runtimes, strict=False))  # node -> its one runtime (--runtimes)
        self.network = network  # a meshai.netns.SimNetwork: each node in its own namespace
        self.names = list(names)
        self.profiles = list(profiles)
        self.mesh = mesh
        self.pace = pace
        self.profiles_file = profiles_file
        self.extra = list(extra)
        self.procs: dict[str, Any] = {}  # name -> multiprocessing.Process
        self.logdir = Path(tempfile.mkdtemp(prefix="meshai-sim-"))
        self.started_at = 0.0

    def node_args(self, name: str, profile: str) -> list[str]:
        """The ``meshai node`` arguments of one node process."""
        host = self.network.address(name) if self.network is not None else "127.0.0.1"
        args = ["--name", name, "--profile", profile, "--listen", f"{host}:0", "--interface", host]
        args += ["--mesh", self.mesh]
        if self.pace:
            args.append("--pace")
        if self.profiles_file:
            args += ["--profiles-file", self.profiles_file]
        if self.identities is not None:
            args += ["--identity", str(self.identities / name)]
        else:
            args.append("--insecure")
        if name in self.runtimes:
            args += ["--runtime", self.runtimes[name]]
        return args + self.extra

    def __enter__(self) -> NodeProcesses:
        self.started_at = time.monotonic()  # the fork server's start-up and imports count, too
        try:
            ctx = _fork_context()
            for name, prof in zip(self.names, self.profiles, strict=True):
                ns = self.network.namespace(name) if self.network is not None else ""
                proc = ctx.Process(
                    target=_node_main,
                    args=(self.node_args(name, prof), str(self.logdir / f"{name}.log"), ns),
                    name=f"meshai-node-{name}",
                )
                proc.start()
                self.procs[name] = proc
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        """Each node's pid."""
        return {name: p.pid for name, p in self.procs.items()}

    def check_alive(self) -> None:
        """Raise PeerError naming a node process that exited on its own (with its last log line)."""
        for name, p in self.procs.items():
            if p.exitcode is not None:
                tail = self.log_tail(name)
                raise PeerError(f"node process {name!r} exited with code {p.exitcode}: {tail}")

    def log_tail(self, name: str) -> str:
        """The last line a node wrote to stderr."""
        try:
            lines = (self.logdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one node process (by its pid)."""
        p = self.procs[name]
        if p.exitcode is None:
            os.kill(p.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        """End every node process we started (SIGTERM for a clean goodbye, SIGKILL after ``grace``) and
        remove their log folder."""
        for p in self.procs.values():
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
                    os.kill(p.pid, signal.SIGCONT)  # a paused node must run to end
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join()
        shutil.rmtree(self.logdir, ignore_errors=True)


def _reference(opts: SimOptions, loaded: Any) -> list[dict[str, np.ndarray]] | None:
    from meshai.tensors import load_npz, request_slices

    if not opts.reference:
        return None
    return request_slices(load_npz(opts.reference, list(loaded.graph.inputs)))


def _requests(opts: SimOptions, loaded: Any) -> list[dict[str, np.ndarray]]:
    from meshai.tensors import load_npz, random_inputs, request_slices

    if opts.inputs:
        data = load_npz(opts.inputs, list(loaded.graph.inputs))
        reqs = request_slices(data)
        if not reqs:
            raise ConfigError(f"--inputs {opts.inputs!r} holds no requests")
        return reqs
    stacked = random_inputs(loaded.model, batch=opts.batch, seed=opts.seed, requests=opts.requests)
    return request_slices(stacked)


async def run_sim(opts: SimOptions) -> dict[str, Any]:
    """Run one simulation and return the report (the JSON ``meshai sim --json`` prints)."""
    from meshai.planning import load_for_planning

    check_min("--nodes", opts.nodes, 1)
    profiles = _profile_names(opts)
    from meshai.capabilities import load_profiles, resolve_profiles

    resolve_profiles(profiles, load_profiles(opts.profiles_file) if opts.profiles_file else None)
    loaded = load_for_planning(opts.model, batch=opts.batch)  # fail on a bad model before starting anything
    quant = None
    if opts.calibration:
        from meshai.planning import prepare_quantization

        loaded, quant = prepare_quantization(
            loaded, opts.calibration, opts.eval, opts.labels, opts.per_channel
        )
    elif opts.eval or opts.labels or opts.max_accuracy_drop is not None:
        raise ConfigError("--eval, --labels and --max-accuracy-drop apply only with --calibration")
    if quant is not None and opts.eval and not opts.inputs:
        requests = quant.samples[: opts.requests]  # evaluation samples, so that labels can score them
    else:
        requests = _requests(opts, loaded)
    names = [f"n{i}" for i in range(opts.nodes)]
    mesh_id = secrets.token_hex(4)
    work = Path(tempfile.mkdtemp(prefix="meshai-sim-secrets-"))
    try:
        return await _run_sim(opts, loaded, requests, profiles, names, mesh_id, work, quant)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class MeshSecrets:
    """A throwaway mesh for simulations, benchmarks and tests: a CA (or an existing one), node and
    client identities, a fleet signing key, and signed packages encrypted for the nodes."""

    def __init__(self, work: Path, ca: str | None = None) -> None:
        from meshai.packages import keygen
        from meshai.security import ca_init

        self.work = work
        self.ca = Path(ca) if ca else work / "ca"
        self._own_ca = not ca
        if self._own_ca:
            ca_init(self.ca)
        self.identities = work / "identities"
        self.identities.mkdir(exist_ok=True)
        self.recipients: dict[str, bytes] = {}
        self.key, self.pub = keygen(work / "fleet")
        self.client = self.issue(f"client-{secrets.token_hex(3)}", role="client")

    def issue(self, name: str, role: str = "node") -> Path:
        """An identity directory for ``name`` (re-issued if this CA issued it before)."""
        from meshai.security import ca_issue

        out = self.identities / name
        if out.exists():
            shutil.rmtree(out)
        ident = ca_issue(name, self.ca, out, role=role, replace=True)
        if role == "node":
            self.recipients[name] = ident.x25519_public
        return out

    def package(
        self, model_path: Path, model_name: str, version: str = "1", extra: Mapping[str, bytes] | None = None
    ) -> tuple[bytes, str]:
        """The model (plus ``extra`` files, e.g. its calibration) as a package signed with the fleet
        key, encrypted for every node issued so far."""
        from meshai.packages import build_package, sign_package

        name = re.sub(r"[^A-Za-z0-9._-]", "-", model_name)[:60] or "model"
        out = self.work / f"{name}-{version}.pkg"
        files: list[Path] | dict[str, bytes] = [model_path]
        if extra:
            files = {model_path.name: model_path.read_bytes(), **extra}
        build_package(files, name, version, out, encrypt_for=dict(self.recipients))
        sign_package(out, self.key)
        return out.read_bytes(), f"{name}@{version}"

    def node_args(self) -> list[str]:
        """Extra ``meshai node`` arguments every node of this mesh takes."""
        return ["--trusted-key", str(self.pub)]


@contextlib.contextmanager
def _ray_model(opts: SimOptions, loaded: Any) -> Iterator[Any]:
    """With ``--offload ray``: Ray started (or joined) and the whole model loaded on its actors, shut
    down on exit; else None."""
    if not opts.offload:
        yield None
        return
    from scheduler.ray_backend import RayBackend

    where = opts.ray_address or "embedded, 127.0.0.1"
    print(f"meshai sim: starting Ray ({where}) with {opts.ray_actors} actors", file=sys.stderr, flush=True)
    with RayBackend(address=opts.ray_address, num_cpus=opts.ray_cpus, actors=opts.ray_actors) as backend:
        yield backend.load(loaded.model.SerializeToString())


async def _run_sim(
    opts: SimOptions,
    loaded: Any,
    requests: list[dict[str, np.ndarray]],
    profiles: list[str],
    names: list[str],
    mesh_id: str,
    work: Path,
    quant: Any = None,
) -> dict[str, Any]:
    from meshai.mesh import Mesh
    from meshai.models import resolve_model
    from meshai.tensors import max_abs_diff, save_npz, stack_requests
    from nodes.executor import StageSession

    identities: Path | None = None
    client: Path | None = None
    package: tuple[bytes, str] | None = None
    extra: list[str] = []
    if not opts.insecure:
        sec = MeshSecrets(work, opts.ca)
        for n in names:
            sec.issue(n)
        identities, client = sec.identities, sec.client
        extra_files = {}
        if loaded.calibration is not None:
            from scheduler.quantize import CALIBRATION_FILE

            extra_files[CALIBRATION_FILE] = loaded.calibration.to_bytes()
        package = sec.package(resolve_model(opts.model), loaded.name, extra=extra_files)
        extra = sec.node_args()
    next_version: tuple[Any, tuple[bytes, str]] | None = None
    if opts.rollout_to and package is not None:
        from meshai.planning import load_for_planning

        loaded2 = load_for_planning(opts.rollout_to, batch=opts.batch)
        next_version = (loaded2, sec.package(resolve_model(opts.rollout_to), loaded.name, version="2"))
    with contextlib.ExitStack() as stack:
        network, link, link_info = _network(opts, names, stack)
        if link is not None:
            extra = [*extra, "--link", str(link)]
        if opts.link:
            extra = [*extra, "--declare-link", opts.link]  # the planner sees the links as declared
        # Ray first: its start-up blocks for seconds, which must not happen while nodes wait on heartbeats
        ray_model = stack.enter_context(_ray_model(opts, loaded))
        procs = stack.enter_context(
            NodeProcesses(
                names,
                profiles,
                mesh_id,
                opts.pace,
                opts.profiles_file,
                extra,
                identities,
                network=network,
                runtimes=opts.runtimes,
            )
        )
        if network is not None:
            stack.enter_context(network.entered("entry"))  # this thread's sockets live in "entry"
        if link is not None:
            from meshai import linkem

            stack.enter_context(linkem.shaped(link))
        entry_host = network.address("entry") if network is not None else "127.0.0.1"
        async with Mesh(
            interfaces=(entry_host,),
            mesh=mesh_id,
            name=None if client else "sim",
            identity=client,
            insecure=opts.insecure,
        ) as mesh:
            deadline = time.monotonic() + opts.discovery_timeout
            while True:  # a node process that died says why at once, not after the timeout
                procs.check_alive()
                try:
                    await mesh.wait_for_peers(
                        opts.nodes, timeout=max(0.1, min(1.0, deadline - time.monotonic()))
                    )
                    break
                except PeerError:
                    if time.monotonic() > deadline:
                        procs.check_alive()
                        raise
            discovery_s = time.monotonic() - procs.started_at

            def make_plan(artifacts: Any = None) -> Any:
                return mesh.plan(
                    loaded,
                    objective=opts.objective,
                    stages=opts.stages,
                    pins=opts.pins,
                    nodes=names,
                    quantization=quant,
                    max_accuracy_drop=opts.max_accuracy_drop,
                    artifacts=artifacts,
                )[0]

            plan = make_plan()
            runtimes_report = None
            if opts.runtimes and needs_artifacts(opts.runtimes) and package is not None:
                # convert the stages that land on nodes without onnxruntime, measure them, hand the
                # measurements to the planner; the package then carries the artifacts
                from meshai.sim_runtimes import plan_for_runtimes

                node_rt = {n: (r,) for n, r in zip(names, opts.runtimes, strict=True)}
                plan, arts, runtimes_report = await plan_for_runtimes(
                    loaded,
                    plan,
                    node_rt,
                    requests,
                    make_plan,
                    lambda t: mesh.remember_artifacts(loaded.name, t),
                )
                package = sec.package(
                    resolve_model(opts.model), loaded.name, extra={**extra_files, **arts.package_files()}
                )
            results: list[dict[str, np.ndarray] | BaseException] = []
            from meshai.chaos import Chaos
            from meshai.faults import resolve

            faults = resolve(opts.faults, [s.node for s in plan.stages], names)
            slo = None
            if opts.slo_ms is not None:
                from scheduler.adapt import SloConfig

                slo = SloConfig(slo_ms=opts.slo_ms, window=min(64, max(8, opts.requests // 10)))
            deploy_t0 = time.perf_counter()
            async with (
                mesh.deploy(
                    plan, loaded, window=opts.window, package=package, recover=opts.recover, slo=slo
                ) as pipe,
                Chaos(faults, procs, mesh, network) as chaos,
            ):
                deploy_s = time.perf_counter() - deploy_t0
                rollout = None
                if next_version is not None and package is not None:
                    from meshai.sim_rollout import SimRollout

                    rollout = SimRollout(
                        mesh,
                        pipe,
                        (loaded, package),
                        next_version,
                        at=opts.rollout_at if opts.rollout_at is not None else max(1, opts.requests // 10),
                        stages=opts.rollout_stages,
                        max_p95_regression=opts.max_p95_regression,
                        slowdown=opts.canary_slowdown,
                    )
                # thresholds hold for a 500-request window against a reference of ~500 or more: a shorter run
                # reports drift as warming up rather than alarm on noise
                pipe.enable_drift(_reference(opts, loaded), warmup=DRIFT_WARMUP, window=DRIFT_WINDOW)
                sent0 = sum(c.bytes_sent for c in mesh.pool.live().values())
                overflow: dict[str, Any] | None = None
                with Progress("requests", len(requests)) as bar:
                    if ray_model is not None:
                        over = await _overflow(opts, pipe, ray_model, requests, bar.advance)
                        results, overflow = over.results, over.to_dict()
                        latency_ms, throughput_rps = over.latency_ms(), over.throughput_rps()
                    else:
                        await chaos.due(0, pipe)
                        async for out in pipe.stream(requests):
                            results.append(out)
                            bar.advance()
                            await chaos.due(len(results), pipe)
                            if rollout is not None:
                                await rollout.due(len(results))
                        latency_ms, throughput_rps = pipe.stats.latency_ms(), pipe.stats.throughput_rps()
                        if rollout is not None:
                            await rollout.close()
                # request i is the pipeline's request i + 1: the version its generation ran
                versions_of = {t[0] - 1: t[1] for t in pipe.version_trace}
                pipe._export_drift()
                drift = pipe.drift.scores() if pipe.drift is not None else {}
                drifted = pipe.drift.drifted() if pipe.drift is not None else []
                bytes_sent = sum(c.bytes_sent for c in mesh.pool.live().values()) - sent0
                node_bytes = await _node_bytes(mesh, names)
                if runtimes_report is not None:  # what each node says it loaded its stage on
                    runtimes_report["loaded"] = await _loaded_runtimes(mesh, names, pipe.stage_deployment)
                failed = sum(isinstance(r, BaseException) for r in results)
                resilience = _resilience(pipe, chaos, failed + len(requests) - len(results))
                rollout_report = (
                    rollout.report(resilience["lost"], versions_of) if rollout is not None else None
                )
                if opts.prom_file:
                    await _write_prom_file(mesh, names, opts.prom_file)
                if opts.report:
                    await _write_report(mesh, names, pipe, opts, loaded.name)
    # reference: the whole model in this process, after the timed run
    ref = StageSession(loaded.model, name=f"whole {loaded.name}")
    refs = {package[1].rpartition("@")[2] if package else "": ref}
    if next_version is not None:
        refs[next_version[1][1].rpartition("@")[2]] = StageSession(
            next_version[0].model, name=f"whole {next_version[1][1]}"
        )
    worst = 0.0
    errors = 0
    first_error = ""
    ok_outputs: list[dict[str, np.ndarray]] = []
    fp32: dict[int, dict[str, np.ndarray]] = {}  # request index -> the whole model's outputs
    for i, (req, res) in enumerate(zip(requests, results, strict=True)):
        if isinstance(res, BaseException):
            errors += 1
            first_error = first_error or str(res)
            continue
        fp32[i] = refs.get(versions_of.get(i, ""), ref).run(req)
        worst = max(worst, max_abs_diff(res, fp32[i]))
        ok_outputs.append(res)
    if opts.outputs and ok_outputs:
        save_npz(opts.outputs, stack_requests(ok_outputs))
    report: dict[str, Any] = {
        "plan": plan.to_dict(),
        "requests": len(requests),
        "ok": len(ok_outputs),
        "errors": errors,
        "max_abs_diff": worst,
        "latency_ms": latency_ms,
        "throughput_rps": throughput_rps,
        "discovery_s": round(discovery_s, 3),
        "deploy_s": round(deploy_s, 3),
        "bytes_sent": bytes_sent + node_bytes,
        "bytes_sent_caller": bytes_sent,
        "nodes": [{"name": n, "profile": p} for n, p in zip(names, profiles, strict=True)],
        "drift": {
            "ready": bool(drift.get("inputs")),
            "drifted": drifted,
            "max": _drift_max(drift),
            "needs_requests": (0 if opts.reference else DRIFT_WARMUP) + DRIFT_WINDOW,
        },
        "security": {
            "mutual_tls": not opts.insecure,
            "package": package[1] if package else None,
            "package_signed": package is not None,
            "package_encrypted": package is not None,
        },
        "model": loaded.name,
        "offload": overflow,
        **resilience,
        "link": link_info,
    }
    if rollout_report is not None:
        report["rollout"] = rollout_report
    if runtimes_report is not None:
        report["runtimes"] = runtimes_report
    if quant is not None:
        report["precision"] = _precision_report(loaded, plan, quant, requests, results, fp32)
    if first_error:
        report["first_error"] = first_error
    return report


def _network(
    opts: SimOptions, names: Sequence[str], stack: contextlib.ExitStack
) -> tuple[Any, Any, dict[str, Any] | None]:
    """With ``--netns``: every node (and the entry) in a network namespace of its own, joined by a
    bridge, made here and removed when ``stack`` closes.  With ``--link``: the links shaped by the
    kernel where it can (tbf for rate; netem where this kernel has it) and by meshai's emulator for the
    rest.  Returns the network (or None), the spec meshai's emulator must apply (or None), and what the
    report says about the links."""
    from meshai import linkem

    spec = linkem.parse_link(opts.link) if opts.link else None
    partition = any(f.kind == "partition" for f in opts.faults)
    if not opts.netns:
        if spec is None and partition:
            spec = linkem.parse_link("delay=0ms")  # the emulator is what holds a node's link down
        if spec is None:
            return None, None, None
        emulator = {"rate": "meshai", "delay": "meshai", "loss": "meshai", "emulated": spec.to_dict()}
        return None, spec, {"spec": opts.link, "netns": False, **emulator}
    from meshai.netns import SimNetwork, netns_unavailable

    why = netns_unavailable()
    if why:
        raise ConfigError(f"--netns is not available here: {why}")
    network = stack.enter_context(SimNetwork([*names, "entry"], spec))
    emulated = network.emulated()
    kernel: dict[str, Any] = {
        "spec": opts.link,
        "netns": True,
        **network.kernel,
        "emulated": None if emulated is None else emulated.to_dict(),
    }
    return network, emulated, kernel


def _resilience(pipe: Any, chaos: Any, lost: int) -> dict[str, Any]:
    """What the sim's JSON says about failures: ``lost`` (requests that got no result), duplicated,
    replayed, replans, recovery."""
    faults = chaos.report(pipe)
    times = [f["recovery_s"] for f in faults if f["kind"] in ("kill", "pause", "partition")]
    sup = pipe.supervisor
    return {
        "lost": lost,
        "duplicated": pipe.stats.duplicated,
        "replayed": pipe.stats.replayed,
        "stale_dropped": pipe.stats.stale,
        "replans": pipe.stats.replans,
        "recovery_s": next((t for t in times if t is not None), None),
        "faults": faults,
        "recoveries": pipe.recovery_report(),
        "decisions": sup.report() if sup is not None and hasattr(sup, "report") else [],
        "final_plan": [s.node for s in pipe.plan.stages],
    }


def _precision_report(
    loaded: Any,
    plan: Any,
    quant: Any,
    requests: list[dict[str, np.ndarray]],
    results: list[dict[str, np.ndarray] | BaseException],
    fp32: Mapping[int, dict[str, np.ndarray]],
) -> dict[str, Any]:
    """What int8 stages did to this run: the outputs against the same stage models run in order here
    (``max_abs_diff_mixed``: the swarm computes exactly what was planned), how far that computation is
    from the fp32 model's outputs ``fp32`` (per successful request; ``expected_max_abs_diff``), and
    with labels the accuracy delta."""
    from meshai.planning import built_stages, chained_outputs
    from meshai.tensors import max_abs_diff
    from scheduler.quantize import accuracy_pts

    int8_ops = [o for s in plan.stages if s.precision == "int8" for o in s.ops]
    want = chained_outputs(built_stages(loaded, plan)[0], plan, requests)
    ok = [(i, r) for i, r in enumerate(results) if not isinstance(r, BaseException)]
    out: dict[str, Any] = {
        "stages": {str(s.id): s.precision for s in plan.stages},
        "int8_ops": len(int8_ops),
        "max_abs_diff_mixed": max((max_abs_diff(r, want[i]) for i, r in ok), default=0.0),
        "expected_max_abs_diff": max((max_abs_diff(want[i], fp32[i]) for i, _ in ok), default=0.0),
        "planned_accuracy_drop_pts": plan.predicted.accuracy_drop_pts,
        "metric": quant.profile.metric,
        "fp32_accuracy": None,
        "accuracy": None,
        "accuracy_delta_pts": None,
    }
    if quant.labels is not None and len(ok) == len(results):
        rows = quant.labels.size // len(quant.samples)
        labels = quant.labels[: rows * len(requests)]
        got = [r for _, r in ok]
        out["fp32_accuracy"] = round(accuracy_pts([fp32[i] for i, _ in ok], labels), 4)
        out["accuracy"] = round(accuracy_pts(got, labels), 4)
        out["accuracy_delta_pts"] = round(out["fp32_accuracy"] - out["accuracy"], 4)
    return out


async def _overflow(
    opts: SimOptions, pipe: Any, ray_model: Any, requests: list[dict[str, np.ndarray]], advance: Any
) -> Any:
    """Requests routed between the swarm's pipeline and Ray by the offload policy."""
    from meshai.overflow import OverflowRouter
    from scheduler.offload import OffloadPolicy

    assert opts.offload_threshold is not None
    policy = OffloadPolicy(queue_threshold=opts.offload_threshold)
    router = OverflowRouter(pipe, ray_model, policy, batch_size=opts.batch)
    return await router.run(requests, rate=opts.rate, on_result=advance)


async def _write_prom_file(mesh: Any, names: Sequence[str], path: str) -> None:
    """Every node's exposition (over the control channel) plus the entry's, as one file."""
    from meshai.metrics import write_prom_file

    sources: dict[str, Any] = {}
    for n in names:
        reply = await mesh.pool.control(n, "metrics")
        text = reply.body.get("text", b"")
        if not reply.ok or not isinstance(text, bytes):
            raise PeerError(f"node {n!r} did not hand over its metrics: {reply.body.get('error')}")
        sources[n] = text
    sources["entry"] = mesh.metrics
    write_prom_file(path, sources)


async def _write_report(mesh: Any, names: Sequence[str], pipe: Any, opts: SimOptions, model: str) -> None:
    from meshai.report import write_run_report

    events: list[dict[str, Any]] = []
    for n in names:
        reply = await mesh.pool.control(n, "events", {"deployment": pipe.name})
        events.extend(reply.body.get("events", []))
    title = (
        f"{model} on {len(pipe.nodes)} stages ({', '.join(pipe.nodes)}), "
        f"{opts.objective}, {pipe.stats.ok} requests, window {opts.window}"
    )
    out = Path(opts.report or ".") / f"sim-{model}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    await asyncio.to_thread(write_run_report, out, events, list(pipe.stats.latencies_s), title=title)


def _drift_max(scores: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for group in scores.values():
        for by_method in group.values():
            for method, v in by_method.items():
                out[method] = max(out.get(method, 0.0), round(float(v), 6))
    return out


async def _loaded_runtimes(mesh: Any, names: Sequence[str], deployment: str) -> dict[str, str]:
    """Stage id → the runtime its node reports having loaded it on."""
    out: dict[str, str] = {}
    for n in names:
        with contextlib.suppress(MeshaiError):
            for st in (await mesh.status(n)).get("stages", []):
                if st.get("deployment") == deployment:
                    out[str(st["stage"])] = str(st.get("runtime"))
    return out


async def _node_bytes(mesh: Any, names: Sequence[str]) -> int:
    total = 0
    for n in names:
        with contextlib.suppress(MeshaiError):
            st = await mesh.status(n)
            total += int(st.get("bytes_sent", 0))
    return total


def sim_table(report: dict[str, Any]) -> str:
    """The readable summary of a sim report."""
    from meshai.tables import format_table, human_bytes

    lat = report["latency_ms"]
    rows = [
        ["model", report["model"]],
        ["nodes", ", ".join(f"{n['name']}={n['profile']}" for n in report["nodes"])],
        ["stages", " → ".join(f"{s['node']}({len(s['ops'])} ops)" for s in report["plan"]["stages"])],
        ["requests", f"{report['ok']} ok, {report['errors']} errors of {report['requests']}"],
        ["max abs diff vs whole model", f"{report['max_abs_diff']:.3g}"],
        ["latency p50 / p95 / p99", f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f} ms"],
        ["throughput", f"{report['throughput_rps']:.1f} req/s"],
        ["discovery", f"{report['discovery_s']:.2f} s"],
        ["bytes sent", human_bytes(report["bytes_sent"])],
    ]
    off = report.get("offload")
    if off:
        rows.append(
            [
                "offload to ray",
                f"{off['swarm']} on the swarm, {off['ray']} on Ray (queue threshold {off['threshold']}); "
                f"p50 {off['latency_ms']['swarm']['p50']:.2f} / {off['latency_ms']['ray']['p50']:.2f} ms",
            ]
        )
    for f in report.get("faults", []):
        what = {"kill": "killed", "pause": "paused", "partition": "partitioned", "slow": "slowed"}[f["kind"]]
        rec = (
            f"{f['recovery_s']:.2f} s to the new plan's first result"
            if f.get("recovery_s") is not None
            else "no new plan"
        )
        rows.append([f"fault: {what} {f['node']} at {f['at']}", rec])
    if report.get("faults") or report.get("replans"):
        rows.append(
            [
                "nothing lost",
                f"{report['lost']} lost, {report['duplicated']} duplicated, {report['replayed']} replayed, "
                f"{report['stale_dropped']} late results dropped, {report['replans']} replans; "
                f"final stages {' → '.join(report['final_plan'])}",
            ]
        )
    for d in report.get("decisions", []):
        if d["event"] in ("joined", "slo"):
            rows.append(
                [
                    f"{d['event']} {','.join(d['nodes'])}".strip(),
                    f"{'adopted' if d['adopt'] else 'kept'}: {d['reason']}",
                ]
            )
    link = report.get("link")
    if link:
        kernel = ", ".join(f"{k} by {link[k]}" for k in ("rate", "delay", "loss") if k in link)
        rows.append(
            [
                "links",
                f"{link['spec'] or '(emulator only)'}: {kernel}{' in network namespaces' if link.get('netns') else ''}",
            ]
        )
    sec = report.get("security", {})
    if sec.get("mutual_tls"):
        rows.append(["security", f"mutual TLS 1.3; model as signed, encrypted package {sec.get('package')}"])
    else:
        rows.append(["security", "INSECURE: plain TCP, unsigned stage models"])
    return format_table(["meshai sim", "result"], rows)


def run_sim_blocking(opts: SimOptions) -> dict[str, Any]:
    """``run_sim`` for synchronous callers."""
    return asyncio.run(run_sim(opts))
