"""Benchmarks (``meshai bench …``): each prints ratios against a baseline measured in the same run.

Part of the composition layer.  Every function returns the JSON-ready dict that ``--json`` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import secrets
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from meshai.capabilities import resolve_profiles, swarm
from meshai.errors import ConfigError, MeshaiError, PeerError, check_min
from meshai.plan import Constraints
from meshai.progress import Progress

if TYPE_CHECKING:
    from meshai.transport import ChannelOptions

#: The heterogeneous 8-device swarm ``bench plan`` plans densenet121 over.
BENCH_PLAN_PROFILES = ("cpu", "gpu", "npu", "tpu", "mcu", "cpu", "gpu", "npu")


def bench_plan(cases: int = 300, repeats: int = 5, model: str = "densenet121") -> dict[str, Any]:
    """Planning time of ``model`` on 8 heterogeneous devices, and quality against brute force.

    ``plan_ms`` is the median, over ``repeats`` runs and both objectives, of the time from a loaded
    GraphIR to a Plan.  ``worst_ratio``/``mean_ratio`` compare the planner with the brute-force optimum
    over ``cases`` random DAGs (≤ 8 ops, ≤ 3 devices), scored by the same cost model.
    """
    from meshai.planning import load_for_planning
    from scheduler.partition import plan
    from scheduler.quality import compare, random_case

    loaded = load_for_planning(model)
    nodes = swarm(resolve_profiles(list(BENCH_PLAN_PROFILES)))
    times: dict[str, list[float]] = {"latency": [], "throughput": []}
    stages: dict[str, int] = {}
    for objective in times:
        for _ in range(repeats):
            t0 = time.perf_counter()
            p = plan(loaded.graph, nodes, Constraints(objective=objective))
            times[objective].append((time.perf_counter() - t0) * 1e3)
            stages[objective] = len(p.stages)
    all_ms = times["latency"] + times["throughput"]
    ratios = []
    within = 0
    worst_seed = -1
    with Progress("brute force", cases) as bar:
        for seed in range(cases):
            r = compare(random_case(seed))
            ratios.append(r.ratio)
            if r.ratio <= 1.02:
                within += 1
            if r.ratio >= max(ratios):
                worst_seed = seed
            bar.advance()
    return {
        "model": model,
        "ops": len(loaded.graph.ops),
        "devices": list(BENCH_PLAN_PROFILES),
        "plan_ms": round(statistics.median(all_ms), 3),
        "plan_ms_by_objective": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "stages_by_objective": stages,
        "cases": cases,
        "worst_ratio": max(ratios) if ratios else 1.0,
        "mean_ratio": statistics.fmean(ratios) if ratios else 1.0,
        "within_2pct": within,
        "worst_seed": worst_seed,
    }


# --------------------------------------------------------------------------------------- transport

_MiB = 1024 * 1024
TRANSPORT_SIZES = (4 * _MiB, 64 * 1024)
"""Tensor sizes (bytes) ``bench transport`` sends by default: a large activation and a small one."""

_HOST = "127.0.0.1"
_RUN_HEAD = struct.Struct(">QQ")  # raw runs: (message count, bytes per message); acks: (count, total bytes)
_TRANSPORT_KINDS = ("meshai", "raw", "asyncio")
_RECEIVER_START_S = 30.0
_PATIENT: ChannelOptions = {"dead_after": 3600.0, "read_timeout": 3600.0}


def bench_transport(
    sizes: Sequence[int] = TRANSPORT_SIZES, mib: float = 64.0, repeats: int = 5, tls: bool = False
) -> dict[str, Any]:
    """Loopback throughput of ``meshai.transport`` against the fastest plain-Python socket, per tensor size.

    For each size, about ``mib`` MiB of float32 tensors of ``size`` bytes go one way to a receiver in a
    child process (so sender and receiver each get a core, as two nodes would), and the clock runs from
    the sender's first byte until the receiver's acknowledgement that it holds every byte:

    - ``meshai``: ``Channel.send(Infer(...))`` through ``meshai.transport.connect`` to a ``Server`` whose
      handler takes every message; the receiver's ``BufferedProtocol`` path decodes frames straight
      into arrays the decoder preallocates.
    - ``raw`` (the baseline): blocking ``socket.sendall(memoryview(array))`` → ``socket.recv_into`` a
      fresh ``np.empty`` array per message, no framing, no event loop, ``TCP_NODELAY`` on both ends.
      Of the plain-Python options it is the fastest (asyncio streams add a copy per read, and an
      asyncio ``BufferedProtocol`` adds the event loop), so ``ratio`` = meshai / raw is conservative.
    - ``asyncio`` (a reference, not the baseline): ``StreamWriter.write(memoryview)`` + ``drain`` →
      an asyncio ``BufferedProtocol`` receiving into a fresh array per message: the ceiling for any
      transport built on asyncio, so ``meshai_mb_s / asyncio_mb_s`` is the cost of meshai itself.

    With ``tls`` all three run server-authenticated TLS (a throwaway self-signed certificate, the same
    ``ssl`` contexts for every kind; the raw baseline is an ``ssl`` socket).  Each kind has one
    connection, made before any clock starts and kept for all its runs.  Each kind runs ``repeats``
    times, interleaved with the others, after one shorter warm-up run; the figure is the best run
    (MB/s = 10^6 bytes per second).  Returns ``{"rows": [{"size_bytes", "tls", "messages",
    "meshai_mb_s", "raw_mb_s", "ratio", "asyncio_mb_s", "ratio_to_asyncio"}], …}``; ConfigError on a
    size that is not a positive multiple of 4, MeshaiError if the receiver does not start.
    """
    sizes = tuple(sizes)
    if not sizes:
        raise ConfigError("bench transport needs at least one tensor size")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size % 4:
            raise ConfigError(f"tensor size must be a positive multiple of 4 bytes (float32), got {size!r}")
    if not (isinstance(mib, int | float) and math.isfinite(mib) and mib > 0):
        raise ConfigError(f"mib must be a positive number, got {mib!r}")
    check_min("repeats", repeats, 1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshai-bench-") as tmp:
        certdir = Path(tmp) if tls else None
        client_ctx = None
        if certdir is not None:
            from meshai.security import self_signed_tls

            client_ctx = self_signed_tls(certdir, _HOST)[1]
        with (
            _Receiver(certdir) as ports,
            asyncio.Runner() as runner,
            contextlib.ExitStack() as stack,
            Progress("transport", len(sizes) * (repeats + 1) * len(_TRANSPORT_KINDS)) as bar,
        ):
            senders: dict[str, _Sender] = {
                "meshai": stack.enter_context(_MeshaiSender(runner, ports["meshai"], client_ctx)),
                "raw": stack.enter_context(_RawSender(ports["raw"], client_ctx)),
                "asyncio": stack.enter_context(_AsyncioSender(runner, ports["asyncio"], client_ctx)),
            }
            for size in sizes:
                arr = np.random.default_rng(0).standard_normal(size // 4, dtype=np.float32)
                count = max(1, round(mib * _MiB / size))
                best = dict.fromkeys(_TRANSPORT_KINDS, math.inf)
                for rep in range(repeats + 1):
                    n = count if rep else max(1, count // 4)  # rep 0: warm-up, not counted
                    for kind in _TRANSPORT_KINDS:
                        elapsed = senders[kind].run(arr, n)
                        if rep:
                            best[kind] = min(best[kind], elapsed)
                        bar.advance()
                mb_s = {k: count * size / t / 1e6 for k, t in best.items()}
                rows.append(
                    {
                        "size_bytes": size,
                        "tls": tls,
                        "messages": count,
                        "meshai_mb_s": round(mb_s["meshai"], 1),
                        "raw_mb_s": round(mb_s["raw"], 1),
                        "ratio": round(mb_s["meshai"] / mb_s["raw"], 3),
                        "asyncio_mb_s": round(mb_s["asyncio"], 1),
                        "ratio_to_asyncio": round(mb_s["meshai"] / mb_s["asyncio"], 3),
                    }
                )
    return {
        "rows": rows,
        "baseline": "blocking socket.sendall(memoryview) -> socket.recv_into(np.empty) per message",
        "bytes_per_run": {str(r["size_bytes"]): r["messages"] * r["size_bytes"] for r in rows},
        "repeats": repeats,
        "figure": "best of repeats, MB/s = 1e6 bytes/s, first byte sent to receiver's acknowledgement",
        "receiver": "child process",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def _bench_hello(node_id: str, role: str) -> Any:
    from meshai.protocol import PROTOCOL_VERSION, Hello

    return Hello(node_id, PROTOCOL_VERSION, role, {}, f"{_HOST}:1" if role == "node" else "")


class _Sender:
    """One connection to the receiver, kept open for every run of one kind; ``run`` is timed."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, arr: np.ndarray, count: int) -> float:
        """Seconds from sending the first of ``count`` copies of ``arr`` to the receiver's acknowledgement."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection."""


class _MeshaiSender(_Sender):
    """``Channel.send(Infer(...))`` through ``meshai.transport.connect``."""

    def __init__(self, runner: asyncio.Runner, port: int, ctx: ssl.SSLContext | None) -> None:
        from meshai.transport import connect

        self.runner = runner
        hello = _bench_hello("bench-tx", "client")
        server_hostname = "localhost" if ctx else None
        # The loop only runs during our runs: no liveness verdicts across the other kinds' runs.
        self.ch = runner.run(
            connect(_HOST, port, hello, ssl=ctx, server_hostname=server_hostname, **_PATIENT)
        )

    def run(self, arr: np.ndarray, count: int) -> float:
        return self.runner.run(self._run(arr, count))

    async def _run(self, arr: np.ndarray, count: int) -> float:
        from meshai.protocol import Control, ControlReply, Infer

        ch = self.ch
        start = time.perf_counter()
        for i in range(count):
            await ch.send(Infer(i, "bench", {"x": arr}))
        await ch.send(Control("done"))
        reply = await ch.recv()
        elapsed = time.perf_counter() - start
        if not isinstance(reply, ControlReply) or reply.body.get("bytes") != count * arr.nbytes:
            raise PeerError(f"transport receiver acknowledged {reply!r}, expected {count * arr.nbytes} bytes")
        return elapsed

    def close(self) -> None:
        self.runner.run(self.ch.close())


class _AsyncioSender(_Sender):
    """``StreamWriter.write(memoryview)`` + ``drain``, with meshai's write high-water mark."""

    def __init__(self, runner: asyncio.Runner, port: int, ctx: ssl.SSLContext | None) -> None:
        from meshai.transport import WRITE_HIGH_WATER

        self.runner = runner
        self.reader, self.writer = runner.run(
            asyncio.open_connection(_HOST, port, ssl=ctx, server_hostname="localhost" if ctx else None)
        )
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def run(self, arr: np.ndarray, count: int) -> float:
        return self.runner.run(self._run(arr, count))

    async def _run(self, arr: np.ndarray, count: int) -> float:
        view = arr.data.cast("B")
        writer = self.writer
        start = time.perf_counter()
        writer.write(_RUN_HEAD.pack(count, len(view)))
        for _ in range(count):
            writer.write(view)
            await writer.drain()
        _, total = _RUN_HEAD.unpack(await self.reader.readexactly(_RUN_HEAD.size))
        elapsed = time.perf_counter() - start
        if total != count * len(view):
            raise PeerError(f"asyncio receiver acknowledged {total} bytes, expected {count * len(view)}")
        return elapsed

    def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            self.runner.run(self.writer.wait_closed())


class _RawSender(_Sender):
    """Blocking ``socket.sendall(memoryview)``: the baseline."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        raw = socket.create_connection((_HOST, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost") if ctx is not None else raw

    def run(self, arr: np.ndarray, count: int) -> float:
        sock = self.sock
        view = arr.data.cast("B")
        ack = bytearray(_RUN_HEAD.size)
        start = time.perf_counter()
        sock.sendall(_RUN_HEAD.pack(count, len(view)))
        for _ in range(count):
            sock.sendall(view)
        if not _recv_exact(sock, memoryview(ack)):
            raise PeerError("raw receiver closed the connection before acknowledging")
        elapsed = time.perf_counter() - start
        _, total = _RUN_HEAD.unpack(ack)
        if total != count * len(view):
            raise PeerError(f"raw receiver acknowledged {total} bytes, expected {count * len(view)}")
        return elapsed

    def close(self) -> None:
        self.sock.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


class _Receiver:
    """The receiving end of ``bench_transport`` in a child process, ended (by pid) on exit."""

    def __init__(self, certdir: Path | None) -> None:
        self.certdir = certdir
        self.proc: subprocess.Popen[bytes] | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> dict[str, int]:
        import select

        cmd = [sys.executable, "-m", "meshai.bench", "transport-receiver"]
        if self.certdir is not None:
            cmd.append(str(self.certdir))
        err = self._stack.enter_context(tempfile.TemporaryFile())
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], _RECEIVER_START_S)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.__exit__()
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()
            raise MeshaiError(f"transport receiver did not start: {tail[-1] if tail else 'no output'}")
        ports: dict[str, int] = json.loads(line)
        return ports

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # the receiver exits when its stdin closes
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._stack.close()


def _transport_receiver_main(argv: Sequence[str]) -> None:
    """Child process of ``bench_transport``: print the ports as JSON, serve until stdin closes."""
    asyncio.run(_transport_receiver(Path(argv[0]) if argv else None))


async def _transport_receiver(certdir: Path | None) -> None:
    from meshai.protocol import Control, ControlReply, Infer
    from meshai.security import self_signed_tls
    from meshai.transport import Channel, Server

    server_ctx = self_signed_tls(certdir)[0] if certdir is not None else None
    loop = asyncio.get_running_loop()

    async def on_channel(ch: Channel) -> None:
        total = messages = 0
        async for msg in ch:
            if isinstance(msg, Infer):
                total += sum(a.nbytes for a in msg.tensors.values())
                messages += 1
            elif isinstance(msg, Control):
                await ch.send(ControlReply(msg.op, True, {"bytes": total, "messages": messages}))
                total = messages = 0

    listener = socket.create_server((_HOST, 0))
    threading.Thread(target=_raw_accept, args=(listener, server_ctx), daemon=True).start()
    hello = lambda: _bench_hello("bench-rx", "node")  # noqa: E731
    async with Server(_HOST, 0, hello, on_channel, ssl=server_ctx, **_PATIENT) as srv:
        sink = await loop.create_server(_Sink, _HOST, 0, ssl=server_ctx)
        async with sink:
            ports = {"meshai": srv.port, "asyncio": sink.sockets[0].getsockname()[1]}
            ports["raw"] = listener.getsockname()[1]
            print(json.dumps(ports), flush=True)
            await loop.run_in_executor(None, sys.stdin.buffer.read)
    listener.close()


def _raw_accept(listener: socket.socket, ctx: ssl.SSLContext | None) -> None:
    """Serve raw connections one after another: (count, size) heads, then ``count`` arrays, then an ack."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with contextlib.suppress(OSError), conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = ctx.wrap_socket(conn, server_side=True) if ctx is not None else conn
            head = memoryview(bytearray(_RUN_HEAD.size))
            while _recv_exact(sock, head):
                count, nbytes = _RUN_HEAD.unpack(head)
                total = 0
                for _ in range(count):
                    arr = np.empty(nbytes, np.uint8)
                    if not _recv_exact(sock, arr.data):
                        break
                    total += arr.nbytes
                sock.sendall(_RUN_HEAD.pack(count, total))


class _Sink(asyncio.BufferedProtocol):
    """The asyncio ceiling: each message straight into a fresh array, no framing, no checks."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = memoryview(bytearray(_RUN_HEAD.size))
        self.target = self.head
        self.filled = 0
        self.left = 0
        self.count = 0
        self.nbytes = 0
        self.total = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled < len(self.target):
            return
        if self.target is self.head:
            self.count, self.nbytes = _RUN_HEAD.unpack(self.head)
            self.left, self.total = self.count, 0
        else:
            self.total += len(self.target)
            self.left -= 1
        if self.left:
            self.target = np.empty(self.nbytes, np.uint8).data
        else:
            self.transport.write(_RUN_HEAD.pack(self.count, self.total))
            self.target = self.head
        self.filled = 0


# ---------------------------------------------------------------------------------------- pipeline

PIPELINE_MODELS = ("squeezenet", "resnet50")
"""Models ``bench pipeline`` runs by default."""
PIPELINE_REQUESTS = {"squeezenet": 200, "resnet50": 40}
"""Timed requests per model by default (others: ``PIPELINE_REQUESTS_OTHER``)."""
PIPELINE_REQUESTS_OTHER = 40
PIPELINE_STAGES = 3
PIPELINE_TOLERANCE = 1e-3
"""A result further than this (max abs diff) from the in-process whole model counts as a mismatch."""
_THREADED = "t0"  # the node running the whole model with one onnxruntime thread per CPU


def bench_pipeline(
    models: Sequence[str] = PIPELINE_MODELS,
    requests: int | None = None,
    window: int = 8,
    warmup: int = 5,
    rounds: int = 2,
    seed: int = 0,
    discovery_timeout: float = 30.0,
) -> dict[str, Any]:
    """Latency and throughput of a 3-stage pipeline over real node processes against the whole model.

    Starts three ``meshai node`` processes ``n0``-``n2`` (profile ``cpu``, no pacing, a mesh id of their
    own, the node default of one onnxruntime thread) and a fourth, ``t0``, with one onnxruntime thread
    per CPU, once; then for each model deploys, through the same ``Mesh``/``Pipeline`` API and with the
    same requests and ``window`` requests in flight:

    - ``whole``: the whole model as 1 stage on one node (``n0``);
    - ``whole_threaded`` (a reference): the whole model as 1 stage on ``t0``, so one process may use
      every core, as the pipeline's processes together may;
    - ``pipeline``: a ``--stages 3`` plan with objective throughput over ``n0``, ``n1``, ``n2``.

    All three stay deployed together; each gets ``warmup`` untimed requests first.  ``requests`` timed
    requests follow (default ``PIPELINE_REQUESTS`` per model), cut into ``rounds`` chunks that go
    through the three deployments in turn, in alternating order (A B C, C B A), so that load from
    other processes on the machine falls on all three alike.  Latency is per request (submit →
    result at the caller); throughput is results / the summed time from each chunk's first request
    sent to its last result.  Ratios are pipeline
    over whole (``*_ratio``) and over whole_threaded (``*_ratio_threaded``).  Afterwards every result
    of each deployment is checked against the whole model run by
    onnxruntime in this process: ``mismatches`` counts failed requests and results further than
    ``PIPELINE_TOLERANCE`` away, ``max_abs_diff`` is the worst difference over the results.

    Every deployment does this machine's real CPU work.  This machine has 2 cores: the three stage
    processes (and the caller, which sends inputs and receives results) compete for them, so a
    pipeline cannot overlap more than two stages at a time, and every hop's encode, copy and decode
    costs CPU the stages would use.  ``whole`` uses one core, the pipeline up to two: compare with
    ``whole_threaded`` before crediting pipelining for a throughput gain.  The figures say what
    pipelining over processes costs or gains here, not what it would on three separate devices.
    """
    models = tuple(models)
    if not models:
        raise ConfigError("bench pipeline needs at least one model")
    if requests is not None and requests < 1:
        raise ConfigError(f"requests must be >= 1, got {requests}")
    check_min("window", window, 1)
    check_min("warmup", warmup, 0)
    check_min("rounds", rounds, 1)
    return asyncio.run(_bench_pipeline(models, requests, window, warmup, rounds, seed, discovery_timeout))


async def _bench_pipeline(
    models: tuple[str, ...],
    requests: int | None,
    window: int,
    warmup: int,
    rounds: int,
    seed: int,
    discovery_timeout: float,
) -> dict[str, Any]:
    from meshai.mesh import Mesh
    from meshai.planning import load_for_planning
    from meshai.sim import MeshSecrets, NodeProcesses
    from meshai.tensors import random_inputs, request_slices

    # Everything CPU-heavy happens before the nodes start or off the event loop: a caller whose loop
    # stalls for longer than the channels' dead_after (2 s) is hung up on by its nodes.
    prepared = []
    for m in models:
        loaded = load_for_planning(m)  # fails on a bad name before anything starts
        count = requests or PIPELINE_REQUESTS.get(loaded.name, PIPELINE_REQUESTS_OTHER)
        reqs = request_slices(random_inputs(loaded.model, seed=seed, requests=count + warmup))
        prepared.append((loaded, reqs[:warmup], reqs[warmup:]))
    names = [f"n{i}" for i in range(PIPELINE_STAGES)]
    profiles = ["cpu"] * PIPELINE_STAGES
    threads = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    mesh_id = f"b{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="meshai-bench-"))
    sec = MeshSecrets(work)  # the default, secure path: mutual TLS between every process
    for n in [*names, _THREADED]:
        sec.issue(n)
    with (
        NodeProcesses(names, profiles, mesh_id, pace=False, identities=sec.identities) as procs,
        NodeProcesses(
            [_THREADED],
            ["cpu"],
            mesh_id,
            pace=False,
            extra=["--threads", str(threads)],
            identities=sec.identities,
        ) as tprocs,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(shutil.rmtree, work, True)

        def check_alive() -> None:
            procs.check_alive()
            tprocs.check_alive()

        async with Mesh(mesh=mesh_id, identity=sec.client) as mesh:
            try:
                await mesh.wait_for_peers(len(names) + 1, timeout=discovery_timeout)
            except PeerError:
                check_alive()
                raise
            for loaded, warm, timed in prepared:
                on = {
                    "whole": (1, names[:1]),
                    "whole_threaded": (1, [_THREADED]),
                    "pipeline": (PIPELINE_STAGES, names),
                }
                plans = {
                    label: mesh.plan(loaded, objective="throughput", stages=k, nodes=nodes)[0]
                    for label, (k, nodes) in on.items()
                }
                try:
                    runs = await _timed_runs(mesh, plans, loaded, warm, timed, window, rounds)
                except MeshaiError:
                    check_alive()
                    raise
                runs["whole_threaded"][0]["threads"] = threads
                # in a thread, so that the channels to the nodes keep their heartbeats meanwhile
                rows.append(await asyncio.to_thread(_pipeline_row, loaded, plans["pipeline"], timed, runs))
    return {
        "rows": rows,
        "nodes": [{"name": n, "profile": p, "threads": 1} for n, p in zip(names, profiles, strict=True)]
        + [{"name": _THREADED, "profile": "cpu", "threads": threads}],
        "window": window,
        "warmup": warmup,
        "rounds": rounds,
        "objective": "throughput",
        "tolerance": PIPELINE_TOLERANCE,
        "cpus": os.cpu_count(),
    }


async def _timed_runs(
    mesh: Any,
    plans: dict[str, Any],
    loaded: Any,
    warm: list[dict[str, np.ndarray]],
    timed: list[dict[str, np.ndarray]],
    window: int,
    rounds: int,
) -> dict[str, tuple[dict[str, Any], list[Any]]]:
    """Deploy every plan at once, warm each up, then time them in interleaved rounds.

    ``timed`` is cut into ``rounds`` contiguous chunks; each round streams its chunk through every
    deployment in turn, in the reverse order of the round before (A B C, C B A, …), so a drift in
    the machine's load falls on all of them alike.  Returns, per plan, its figures and its results
    in request order.
    """
    rounds = max(1, min(rounds, len(timed)))
    bounds = [len(timed) * i // rounds for i in range(rounds + 1)]
    chunks = [timed[a:b] for a, b in itertools.pairwise(bounds)]
    labels = list(plans)
    results: dict[str, list[Any]] = {k: [] for k in labels}
    latencies: dict[str, list[float]] = {k: [] for k in labels}
    walls: dict[str, float] = dict.fromkeys(labels, 0.0)
    async with contextlib.AsyncExitStack() as stack:
        pipes = {
            k: await stack.enter_async_context(mesh.deploy(plans[k], loaded, window=window)) for k in labels
        }
        for pipe in pipes.values():
            async for out in pipe.stream(warm):
                if isinstance(out, BaseException):
                    raise out
        with Progress(f"{loaded.name}", len(timed) * len(labels)) as bar:
            for i, chunk in enumerate(chunks):
                for label in labels if i % 2 == 0 else labels[::-1]:
                    pipe = pipes[label]
                    seen = len(pipe.stats.latencies_s)
                    start = time.perf_counter()
                    async for out in pipe.stream(chunk):
                        results[label].append(out)
                        bar.advance()
                    walls[label] += (pipe.stats.last_result or start) - start
                    latencies[label].extend(pipe.stats.latencies_s[seen:])
    runs: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for label in labels:
        ok = sum(not isinstance(r, BaseException) for r in results[label])
        ms = np.asarray(latencies[label] or [0.0]) * 1e3
        figures = {
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "throughput_rps": round(ok / walls[label], 3) if walls[label] > 0 else 0.0,
            "ok": ok,
            "errors": len(results[label]) - ok,
        }
        runs[label] = (figures, results[label])
    return runs


def _pipeline_row(
    loaded: Any,
    pipe_plan: Any,
    timed: list[dict[str, np.ndarray]],
    runs: dict[str, tuple[dict[str, Any], list[Any]]],
) -> dict[str, Any]:
    """Check every run's results against the whole model in this process and build one row."""
    from meshai.tensors import max_abs_diff
    from nodes.executor import StageSession

    ref = StageSession(loaded.model, name=f"whole {loaded.name}")
    wants = [ref.run(req) for req in timed]
    mismatches = 0
    worst = 0.0
    for figures, results in runs.values():
        diff = 0.0
        for want, got in zip(wants, results, strict=True):
            if isinstance(got, BaseException):  # counted in "errors" too
                mismatches += 1
                continue
            d = max_abs_diff(got, want)
            if not d <= PIPELINE_TOLERANCE:
                mismatches += 1
            diff = max(diff, d)
        figures["max_abs_diff"] = diff
        worst = max(worst, diff)
    whole, threaded, pipeline = runs["whole"][0], runs["whole_threaded"][0], runs["pipeline"][0]
    return {
        "model": loaded.name,
        "requests": len(timed),
        "whole": whole,
        "whole_threaded": threaded,
        "pipeline": pipeline,
        "p50_ratio": _ratio(pipeline["p50_ms"], whole["p50_ms"]),
        "throughput_ratio": _ratio(pipeline["throughput_rps"], whole["throughput_rps"]),
        "p50_ratio_threaded": _ratio(pipeline["p50_ms"], threaded["p50_ms"]),
        "throughput_ratio_threaded": _ratio(pipeline["throughput_rps"], threaded["throughput_rps"]),
        "stages": len(pipe_plan.stages),
        "stage_ops": [len(s.ops) for s in pipe_plan.stages],
        "mismatches": mismatches,
        "max_abs_diff": worst,
    }


def _ratio(a: float, b: float) -> float | None:
    """``a / b`` rounded; None (JSON null) when the baseline ``b`` measured nothing."""
    return round(a / b, 3) if b > 0 else None


# ------------------------------------------------------------------------------------------- ray

RAY_BATCH_CHUNK = 16
"""Requests per task in ``bench_ray``'s batch comparison."""
RAY_BATCH_ACTORS = 2


def bench_ray(
    model: str = "squeezenet",
    requests: int = 200,
    window: int = 8,
    stages: int = 3,
    warmup: int = 5,
    rounds: int = 2,
    seed: int = 0,
    discovery_timeout: float = 30.0,
) -> dict[str, Any]:
    """meshai's pipeline against a plain Ray actor pipeline of the same stages, in one run.

    ``model`` is planned once, objective throughput, ``stages`` stages over ``stages`` real ``meshai
    node`` processes (profile ``cpu``, mutual TLS, one onnxruntime thread each), and both sides run
    exactly that plan's stage models on the same ``requests`` random requests with at most ``window``
    in flight:

    - ``meshai``: the deployed ``Pipeline`` over the node processes, streamed through ``Mesh``.
    - ``ray``: one Ray actor per stage (a ``StageSession`` of that stage's ONNX model, one thread), a
      request's object ref from actor k handed to actor k+1 (each actor returns the tensors later
      stages still need), the caller keeping ``window`` requests in flight with ``ray.wait``.  Ray
      runs locally on 127.0.0.1 with ``num_cpus=2``, no dashboard, no usage stats.

    Both get ``warmup`` untimed requests first, then the timed requests in ``rounds`` chunks, the two
    sides taking turns in alternating order.  Latency is submit → result at the caller; throughput is
    results / the summed wall time of the chunks.  ``throughput_ratio`` and ``p50_ratio`` are meshai
    over ray.  ``batch`` compares a chunked bulk job on Ray (``RAY_BATCH_ACTORS`` actors, the whole
    model put once in the object store, ``RAY_BATCH_CHUNK`` requests per task) with one onnxruntime
    session (one thread) in this process over the same requests, after the pipelines are gone.  Every
    result is checked against the whole model run in this process; ``max_abs_diff`` is the worst per
    side.  ConfigError on bad arguments or when Ray is not installed.
    """
    check_min("requests", requests, 1)
    check_min("window", window, 1)
    check_min("stages", stages, 1)
    check_min("warmup", warmup, 0)
    check_min("rounds", rounds, 1)
    from scheduler.ray_backend import RayBackend

    try:
        backend = RayBackend(num_cpus=2).start()  # embedded, checked to be on 127.0.0.1 only
    except ConfigError:
        raise ConfigError("bench ray needs Ray: pip install 'meshai[ray]'") from None
    try:
        return asyncio.run(
            _bench_ray(backend.ray, model, requests, window, stages, warmup, rounds, seed, discovery_timeout)
        )
    finally:
        backend.close()


class _RayStage:
    """One stage as a Ray actor's state: runs its model, returns what later stages and the caller need."""

    def __init__(self, model: bytes, inputs: list[str], keep: list[str], name: str) -> None:
        from nodes.executor import StageSession

        self.session = StageSession(model, name=name)
        self.inputs = inputs
        self.keep = keep

    def run(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.session.run({t: env[t] for t in self.inputs})
        merged = {**env, **out}
        return {t: merged[t] for t in self.keep}

    def ready(self) -> bool:
        return True


class _RayWhole:
    """The whole model as a Ray actor's state, for the batch comparison: one task runs a chunk."""

    def __init__(self, model: bytes) -> None:
        from nodes.executor import StageSession

        self.session = StageSession(model, name="whole model")

    def run(self, chunk: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [self.session.run(req) for req in chunk]


def _ray_stream(
    ray: Any, actors: list[Any], reqs: list[dict[str, np.ndarray]], window: int
) -> tuple[list[dict[str, np.ndarray]], list[float], float]:
    """Stream ``reqs`` through the actor chain, ``window`` in flight: (results in order, latencies s, wall s)."""
    results: list[dict[str, np.ndarray] | None] = [None] * len(reqs)
    latencies: list[float] = []
    pending: dict[Any, tuple[int, float]] = {}

    def collect(num: int) -> None:
        ready, _ = ray.wait(list(pending), num_returns=num)
        now = time.perf_counter()
        for ref, value in zip(ready, ray.get(ready), strict=True):
            i, t0 = pending.pop(ref)
            results[i] = value
            latencies.append(now - t0)

    start = time.perf_counter()
    for i, req in enumerate(reqs):
        if len(pending) >= window:
            collect(1)
        t0 = time.perf_counter()
        ref: Any = req
        for actor in actors:
            ref = actor.run.remote(ref)
        pending[ref] = (i, t0)
    while pending:
        collect(1)
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], latencies, wall


def _ray_pipeline_actors(ray: Any, models: list[Any], plan: Any) -> list[Any]:
    """One started, warmed-up actor per stage; each keeps what later stages or the caller need."""
    cls = ray.remote(_RayStage)
    actors = []
    for k, (m, st) in enumerate(zip(models, plan.stages, strict=True)):
        later = {t for s in plan.stages[k + 1 :] for t in s.inputs} | set(plan.outputs)
        keep = sorted(
            later & ({t for s in plan.stages[: k + 1] for t in s.outputs} | set(_model_inputs(plan)))
        )
        actors.append(cls.remote(m.SerializeToString(), list(st.inputs), keep, f"stage {k}"))
    ray.get([a.ready.remote() for a in actors])
    return actors


def _model_inputs(plan: Any) -> set[str]:
    produced = {t for s in plan.stages for t in s.outputs}
    return {t for s in plan.stages for t in s.inputs if t not in produced}


def _figures(latencies: list[float], ok: int, wall: float) -> dict[str, Any]:
    ms = np.asarray(latencies or [0.0]) * 1e3
    return {
        "throughput_rps": round(ok / wall, 3) if wall > 0 else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "ok": ok,
    }


async def _bench_ray(
    ray: Any,
    model: str,
    requests: int,
    window: int,
    stages: int,
    warmup: int,
    rounds: int,
    seed: int,
    discovery_timeout: float,
) -> dict[str, Any]:
    from meshai.mesh import Mesh
    from meshai.planning import load_for_planning, stage_models
    from meshai.sim import MeshSecrets, NodeProcesses
    from meshai.tensors import max_abs_diff, random_inputs, request_slices
    from nodes.executor import StageSession

    loaded = load_for_planning(model)
    reqs = request_slices(random_inputs(loaded.model, seed=seed, requests=requests + warmup))
    warm, timed = reqs[:warmup], reqs[warmup:]
    rounds = max(1, min(rounds, len(timed)))
    bounds = [len(timed) * i // rounds for i in range(rounds + 1)]
    chunks = [timed[a:b] for a, b in itertools.pairwise(bounds)]
    names = [f"n{i}" for i in range(stages)]
    mesh_id = f"b{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="meshai-bench-"))
    sec = MeshSecrets(work)
    for n in names:
        sec.issue(n)
    got: dict[str, list[Any]] = {"meshai": [], "ray": []}
    lats: dict[str, list[float]] = {"meshai": [], "ray": []}
    walls = {"meshai": 0.0, "ray": 0.0}
    with (
        NodeProcesses(names, ["cpu"] * stages, mesh_id, pace=False, identities=sec.identities) as procs,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(shutil.rmtree, work, True)
        async with Mesh(mesh=mesh_id, identity=sec.client) as mesh:
            try:
                await mesh.wait_for_peers(len(names), timeout=discovery_timeout)
            except PeerError:
                procs.check_alive()
                raise
            plan = mesh.plan(loaded, objective="throughput", stages=stages, nodes=names)[0]
            models = await asyncio.to_thread(stage_models, loaded, plan)
            # Ray calls block: off the event loop, so the channels to the nodes keep their heartbeats
            actors = await asyncio.to_thread(_ray_pipeline_actors, ray, models, plan)
            try:
                if warm:
                    await asyncio.to_thread(_ray_stream, ray, actors, warm, window)
                async with mesh.deploy(plan, loaded, window=window) as pipe:
                    async for out in pipe.stream(warm):
                        if isinstance(out, BaseException):
                            raise out
                    with Progress(f"{loaded.name} meshai/ray", 2 * len(timed)) as bar:
                        for i, chunk in enumerate(chunks):
                            for side in ("meshai", "ray") if i % 2 == 0 else ("ray", "meshai"):
                                if side == "ray":
                                    res, lat, wall = await asyncio.to_thread(
                                        _ray_stream, ray, actors, chunk, window
                                    )
                                    got["ray"].extend(res)
                                    lats["ray"].extend(lat)
                                    walls["ray"] += wall
                                    bar.advance(len(chunk))
                                    continue
                                seen = len(pipe.stats.latencies_s)
                                start = time.perf_counter()
                                async for out in pipe.stream(chunk):
                                    got["meshai"].append(out)
                                    bar.advance()
                                walls["meshai"] += (pipe.stats.last_result or start) - start
                                lats["meshai"].extend(pipe.stats.latencies_s[seen:])
            except MeshaiError:
                procs.check_alive()
                raise
            finally:
                for a in actors:
                    ray.kill(a)
    # the batch job: the nodes and the pipeline actors are gone
    model_ref = ray.put(loaded.model.SerializeToString())
    batch_cls = ray.remote(_RayWhole)
    workers = [batch_cls.remote(model_ref) for _ in range(RAY_BATCH_ACTORS)]
    try:
        batches = [timed[i : i + RAY_BATCH_CHUNK] for i in range(0, len(timed), RAY_BATCH_CHUNK)]
        ray.get([w.run.remote(warm[:1] or timed[:1]) for w in workers])
        start = time.perf_counter()
        refs = [workers[i % len(workers)].run.remote(b) for i, b in enumerate(batches)]
        ray_batch = [r for part in ray.get(refs) for r in part]
        ray_wall = time.perf_counter() - start
    finally:
        for w in workers:
            ray.kill(w)
    local = StageSession(loaded.model, name=f"whole {loaded.name}")
    for req in warm[:1] or timed[:1]:
        local.run(req)
    start = time.perf_counter()
    wants = [local.run(req) for req in timed]
    local_wall = time.perf_counter() - start

    def check(results: list[Any]) -> tuple[int, float]:
        ok, worst = 0, 0.0
        for want, res in zip(wants, results, strict=True):
            if isinstance(res, BaseException):
                worst = math.inf
                continue
            ok += 1
            d = max_abs_diff(res, want)
            worst = d if not d <= worst else worst  # NaN counts as worst
        return ok, worst

    sides: dict[str, dict[str, Any]] = {}
    diffs: dict[str, float] = {}
    for side in ("meshai", "ray"):
        if len(got[side]) != len(timed):
            raise MeshaiError(
                f"bench ray: {side} returned {len(got[side])} results for {len(timed)} requests"
            )
        ok, diffs[side] = check(got[side])
        sides[side] = _figures(lats[side], ok, walls[side])
    _, diffs["batch"] = check(ray_batch)
    ray_rps = len(timed) / ray_wall if ray_wall > 0 else 0.0
    local_rps = len(timed) / local_wall if local_wall > 0 else 0.0
    return {
        "model": loaded.name,
        "stages": len(plan.stages),
        "stage_ops": [len(s.ops) for s in plan.stages],
        "requests": len(timed),
        "window": window,
        "warmup": warmup,
        "rounds": rounds,
        "meshai": sides["meshai"],
        "ray": sides["ray"],
        "throughput_ratio": _ratio(sides["meshai"]["throughput_rps"], sides["ray"]["throughput_rps"]),
        "p50_ratio": _ratio(sides["meshai"]["p50_ms"], sides["ray"]["p50_ms"]),
        "max_abs_diff": {k: float(v) for k, v in diffs.items()},
        "batch": {
            "ray_rps": round(ray_rps, 3),
            "local_rps": round(local_rps, 3),
            "ratio": _ratio(ray_rps, local_rps),
            "actors": RAY_BATCH_ACTORS,
            "chunk": RAY_BATCH_CHUNK,
            "local_threads": 1,
        },
        "ray_num_cpus": 2,
        "objective": "throughput",
        "cpus": os.cpu_count(),
    }


# ------------------------------------------------------------------------------------------ tables

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": _MiB, "mib": _MiB}


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"4MiB,64KiB"`` -> ``(4194304, 65536)``: bytes, with an optional K/KiB/M/MiB suffix; ConfigError if bad."""
    out: list[int] = []
    for part in text.split(","):
        item = part.strip()
        digits = item.rstrip("aAbBiIkKmM")
        unit = item[len(digits) :].lower()
        if not digits.isdigit() or unit not in _SIZE_UNITS:
            raise ConfigError(f"tensor size must be bytes with an optional KiB/MiB suffix, got {item!r}")
        out.append(int(digits) * _SIZE_UNITS[unit])
    return tuple(out)


def transport_table(res: dict[str, Any]) -> str:
    """The readable form of a ``bench_transport`` report."""
    from meshai.tables import format_table, human_bytes

    rows = [
        [
            "TLS" if r["tls"] else "TCP",
            human_bytes(r["size_bytes"]),
            f"{r['meshai_mb_s']:.0f}",
            f"{r['raw_mb_s']:.0f}",
            f"{r['ratio']:.2f}",
            f"{r['asyncio_mb_s']:.0f}",
            f"{r['ratio_to_asyncio']:.2f}",
        ]
        for r in res["rows"]
    ]
    table = format_table(
        ["link", "tensor", "meshai MB/s", "raw MB/s", "meshai/raw", "asyncio MB/s", "meshai/asyncio"],
        rows,
        right=(1, 2, 3, 4, 5, 6),
    )
    return (
        f"{table}\nraw = {res['baseline']}; {res['figure']}; receiver in a {res['receiver']}, "
        f"{res['cpus']} CPUs, Python {res['python']}"
    )


def pipeline_table(res: dict[str, Any]) -> str:
    """The readable form of a ``bench_pipeline`` report."""
    from meshai.tables import format_table

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows: list[list[object]] = []
    for r in res["rows"]:
        ops = "/".join(str(n) for n in r["stage_ops"])
        threads = r["whole_threaded"].get("threads", "?")
        for label, shown, stages in (
            ("whole", "whole, 1 thread", "1"),
            ("whole_threaded", f"whole, {threads} threads", "1"),
            ("pipeline", "pipeline", f"{r['stages']} ({ops} ops)"),
        ):
            f = r[label]
            rows.append(
                [
                    r["model"],
                    shown,
                    stages,
                    f"{f['p50_ms']:.1f}",
                    f"{f['p95_ms']:.1f}",
                    f"{f['throughput_rps']:.1f}",
                    f"{f['ok']}/{r['requests']}",
                    f"{f['max_abs_diff']:.3g}",
                ]
            )
        for shown, suffix in (("pipeline / whole", ""), ("pipeline / threaded", "_threaded")):
            p50, rps = r[f"p50_ratio{suffix}"], r[f"throughput_ratio{suffix}"]
            rows.append([r["model"], shown, "", num(p50, ".2f"), "", num(rps, ".2f"), "", ""])
    table = format_table(
        ["model", "deployment", "stages", "p50 ms", "p95 ms", "req/s", "ok", "max abs diff"],
        rows,
        right=(3, 4, 5, 6),
    )
    nodes = ", ".join(f"{n['name']}={n['profile']} ({n['threads']} thr)" for n in res["nodes"])
    mism = sum(r["mismatches"] for r in res["rows"])
    return (
        f"{table}\nnodes {nodes}: real processes, no pacing, {res['cpus']} CPUs; {res['window']} requests in "
        f"flight, {res['warmup']} warm-up requests, {res['rounds']} rounds; {mism} results off the whole model by more than "
        f"{res['tolerance']:g}"
    )


# ------------------------------------------------------------------------------------ quantize

#: CPU features that decide whether int8 kernels beat fp32 ones (VNNI: int8 dot products).
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


def _int8_cpu_flags() -> list[str]:
    """Which of ``INT8_CPU_FLAGS`` this CPU has ([] where /proc/cpuinfo is unreadable)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in INT8_CPU_FLAGS if f in words]


def _quant_row(
    name: str,
    model: Any,
    calibration: Sequence[dict[str, np.ndarray]],
    samples: Sequence[dict[str, np.ndarray]],
    labels: np.ndarray | None,
    work: Path,
    timing_samples: int,
) -> dict[str, Any]:
    """Both weight layouts (per-tensor, per-channel) measured; the row is the more accurate one
    (ties: the smaller file), the other listed under ``variants``."""
    import onnx

    from meshai.quantize_cli import compare_int8
    from scheduler.quantize import calibrate, quantize, run_model

    fp32_path = work / f"{name}.onnx"
    onnx.save(model, str(fp32_path))
    ref = run_model(model, samples)
    cal = calibrate(model, calibration)  # activation ranges: the weight layout is chosen when quantizing
    variants: list[dict[str, Any]] = []
    for per_channel in (False, True):
        int8 = quantize(model, dataclasses.replace(cal, per_channel=per_channel))
        int8_path = work / f"{name}.{'pc' if per_channel else 'pt'}.int8.onnx"
        onnx.save(int8, str(int8_path))
        fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
        row: dict[str, Any] = {
            "model": name,
            "per_channel": per_channel,
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "size_ratio": round(fp32_bytes / int8_bytes, 3),
            "calibration_samples": len(calibration),
            "eval_samples": len(samples),
        }
        row.update(compare_int8(model, int8, samples, labels, timing_samples, ref=ref))
        variants.append(row)

    def cost(r: dict[str, Any]) -> tuple[float, int]:
        lost = r["accuracy_delta_pts"] if r["accuracy_delta_pts"] is not None else 100.0 - r["agreement_pts"]
        return float(lost), int(r["int8_bytes"])

    best = min(variants, key=cost)
    keys = ("per_channel", "size_ratio", "int8_bytes", "accuracy_delta_pts", "agreement_pts", "int8_ms")
    return {**best, "variants": [{k: v[k] for k in keys} for v in variants]}


def bench_quantize(seed: int = 0) -> dict[str, Any]:
    """Static int8 (QDQ, onnxruntime) on two models with real weights: the digits MLP (trained here,
    labelled held-out split: accuracy delta) and a random-weight CNN (random inputs, no labels:
    ``accuracy_delta_pts`` None, top-1 agreement instead).  File sizes, ms per sample (one thread)."""
    import onnxruntime

    from meshai.cnn import small_cnn
    from meshai.digits import train_digits
    from meshai.models import load_model
    from meshai.tensors import load_npz, random_inputs, request_slices

    with tempfile.TemporaryDirectory(prefix="meshai-bench-quant-") as tmp:
        work = Path(tmp)
        with Progress("quantize", total=2) as bar:
            case = train_digits(work / "digits", seed=seed)
            digits = _quant_row(
                "digits",
                load_model(case.model),
                request_slices(load_npz(case.calibration)),
                request_slices(load_npz(case.eval)),
                load_npz(case.labels, ["labels"])["labels"],
                work,
                timing_samples=200,
            )
            bar.advance()
            cnn = small_cnn(seed)
            small = _quant_row(
                "small_cnn",
                cnn,
                request_slices(random_inputs(cnn, requests=64, seed=seed)),
                request_slices(random_inputs(cnn, requests=300, seed=seed + 1)),
                None,
                work,
                timing_samples=40,
            )
            bar.advance()
    return {
        "rows": [digits, small],
        "format": "qdq",
        "digits_fp32_accuracy": case.fp32_accuracy,
        "cpus": os.cpu_count(),
        "cpu_flags": _int8_cpu_flags(),
        "onnxruntime": onnxruntime.__version__,
        "threads": 1,
    }


def quantize_table(res: dict[str, Any]) -> str:
    """The readable form of a ``bench_quantize`` report."""
    from meshai.tables import format_table, human_bytes

    rows = []
    for r in res["rows"]:
        delta = r["accuracy_delta_pts"]
        rows.append(
            [
                r["model"],
                "per-channel" if r["per_channel"] else "per-tensor",
                human_bytes(r["fp32_bytes"]),
                human_bytes(r["int8_bytes"]),
                f"{r['size_ratio']:.2f}x",
                f"{r['fp32_ms']:.4f}",
                f"{r['int8_ms']:.4f}",
                f"{r['speedup']:.2f}x",
                "-" if delta is None else f"{delta:+.2f}",
                f"{r['agreement_pts']:.1f} %",
            ]
        )
    table = format_table(
        [
            "model",
            "weights",
            "fp32",
            "int8",
            "smaller",
            "fp32 ms",
            "int8 ms",
            "speedup",
            "acc lost pts",
            "top-1 agree",
        ],
        rows,
        right=(2, 3, 4, 5, 6, 7, 8, 9),
    )
    flags = ", ".join(res["cpu_flags"]) or "unknown"
    return (
        f"{table}\nstatic int8 (QDQ) on onnxruntime {res['onnxruntime']} CPU, 1 thread, {res['cpus']} CPUs "
        f"({flags}); ms per sample of batch 1; acc lost = fp32 - int8 accuracy on held-out labels"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["transport-receiver"]:
        _transport_receiver_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m meshai.bench transport-receiver [CERTDIR]  (internal; see meshai bench)")
