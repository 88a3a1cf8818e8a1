"""Failures and the long-lived side of the runtime, with real node processes on loopback.

- ``meshai peers`` lists five nodes of five device classes with their capabilities.
- A middle node killed (SIGKILL) while requests stream, with recovery off (``recover=False``, the
  fail-fast mode): in-flight requests fail with an error naming it within the design's 3 s (plus a
  margin), nothing hangs, and its peers drop it.  (With recovery, the default, see test_resilience.py.)
- Garbage, truncated and oversized frames on raw sockets close that connection only; the node goes
  on serving correct results.
- ``meshai deploy`` / ``deployments`` / ``infer`` / ``undeploy`` from separate processes.
- Static discovery (``--discovery none`` nodes, a ``--discovery static --peers`` caller).

Every node is a ``meshai node --json`` process this module starts and ends by pid, in a mesh of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models_helper import CASES
from runtime_helpers import (
    LoopThread,
    Nodes,
    assert_outputs_equal,
    live_node_pids,
    meshai,
    unique_mesh,
)

from meshai.errors import InferenceError, PeerError
from meshai.mesh import Mesh
from meshai.planning import LoadedModel, load_for_planning
from meshai.protocol import MAGIC, PROTOCOL_VERSION, Hello, encode
from meshai.tensors import load_npz, random_inputs, request_slices, save_npz
from nodes.executor import StageSession, run_whole

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

DEAD_AFTER_S = 3.0  # the design: a dead node is dropped within 3 s
MARGIN_S = 1.5
PROFILES = {"cpu0": "cpu", "gpu0": "gpu", "npu0": "npu", "tpu0": "tpu", "mcu0": "mcu"}


def branchy(tmp: Path) -> LoadedModel:
    path = tmp / "branchy.onnx"
    if not path.exists():
        onnx.save(CASES["branchy"](), str(path))
    return load_for_planning(str(path))


# ----------------------------------------------------------------------- five nodes, five classes


@dataclasses.dataclass
class Five:
    nodes: Nodes
    lt: LoopThread
    mesh: Mesh


@pytest.fixture(scope="module")
def five() -> Iterator[Five]:
    """Five nodes (cpu, gpu, npu, tpu, mcu) and a caller Mesh on a loop thread, for the module."""
    mesh_id = unique_mesh()
    lt = LoopThread()
    mesh = Mesh(mesh=mesh_id, name="five")
    entered = False
    try:
        with Nodes(mesh_id) as nodes:
            for name, profile in PROFILES.items():
                nodes.start(name, profile=profile)
            nodes.wait_ready()
            lt.run(mesh.__aenter__())
            entered = True
            lt.run(mesh.wait_for_peers(5, timeout=30.0))
            yield Five(nodes, lt, mesh)
    finally:
        if entered:
            lt.run(mesh.close(), timeout=30)
        lt.close()
    assert live_node_pids(mesh_id) == []


def test_peers_lists_five_nodes_with_capabilities(five: Five) -> None:
    r = meshai("peers", "--json", "--mesh", five.nodes.mesh, "--wait", "5", timeout=60)
    assert r.returncode == 0, r.stderr
    peers = {p["name"]: p for p in json.loads(r.stdout)["peers"]}
    assert set(peers) == set(PROFILES)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    for name, profile in PROFILES.items():
        p = peers[name]
        assert p["address"] == five.nodes.address(name)
        cap = p["capabilities"]
        assert cap["name"] == name
        assert cap["profile"]["kind"] == profile
        assert cap["profile"]["flops"] and cap["profile"]["memory_bytes"] > 0
        emulated = {"cpu": False, "gpu": not has_cuda}.get(profile, True)
        assert cap["emulated"] is emulated, (name, cap["emulated"])


# ------------------------------------------------------------------------------ raw-socket abuse


def _hello(name: str) -> bytes:
    return b"".join(bytes(p) for p in encode(Hello(name, PROTOCOL_VERSION, "client", {}, "")))


def _prefix(header_len: int, body_len: int) -> bytes:
    return struct.pack(">4sIQ", MAGIC, header_len, body_len)


ATTACKS: dict[str, tuple[bytes, bool]] = {
    # name: (bytes sent, then half-close our side?)
    "random-bytes": (os.urandom(4096), False),
    "truncated-then-silence": (_prefix(200, 0) + b"\x82\xa1k", False),
    "truncated-then-eof": (_prefix(200, 0) + b"\x82\xa1k", True),
    "body-10GiB": (_prefix(16, 10 << 30) + b"\x00" * 16, False),
    "hello-then-garbage": (_hello("attacker-a") + os.urandom(2048), False),
    "hello-then-10GiB": (_hello("attacker-b") + _prefix(16, 10 << 30), False),
    "hello-then-bad-magic": (_hello("attacker-c") + b"HTTP/1.1 200 OK\r\n\r\n" + b"\0" * 64, False),
}


async def _attack(host: str, port: int, payload: bytes, half_close: bool, budget: float) -> str:
    """Send ``payload``; return how the node ended the connection ("eof" or "reset") within ``budget``."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(budget):
            while True:
                try:
                    chunk = await reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    return "reset"
                if not chunk:
                    return "eof"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _pipeline_results(
    mesh: Mesh, loaded: LoadedModel, nodes: list[str], reqs: list[dict[str, np.ndarray]]
) -> list[Any]:
    plan, _ = mesh.plan(loaded, objective="throughput", stages=len(nodes), nodes=nodes)
    assert sorted(s.node for s in plan.stages) == sorted(nodes)
    async with asyncio.timeout(60), mesh.deploy(plan, loaded) as pipe:
        return [o async for o in pipe.stream(reqs)]


def test_bad_frames_close_only_that_connection(five: Five, tmp_path: Path) -> None:
    target = "cpu0"
    host, _, port = five.nodes.address(target).rpartition(":")
    assert target in five.lt.run(_live_peers(five.mesh))

    async def all_attacks() -> dict[str, tuple[str, float]]:
        async def one(name: str, payload: bytes, half: bool) -> tuple[str, tuple[str, float]]:
            t0 = time.monotonic()
            how = await _attack(host, int(port), payload, half, budget=10.0)
            return name, (how, time.monotonic() - t0)

        done = await asyncio.gather(*(one(n, p, h) for n, (p, h) in ATTACKS.items()))
        return dict(done)

    outcome = asyncio.run(all_attacks())  # its own loop: plain sockets, no Mesh
    print({k: (how, round(t, 3)) for k, (how, t) in outcome.items()})
    for name, (_how, took) in outcome.items():
        # a protocol violation closes at once; a half-frame followed by silence when the channel's
        # liveness check (2 s of silence) or the server's hello timeout (5 s) fires
        limit = 5.0 + MARGIN_S if name == "truncated-then-silence" else 2.0 + MARGIN_S
        assert took < limit, f"{name}: connection closed after {took:.2f} s"
    assert five.nodes.alive(target), five.nodes.tail(target)
    # the node's other channels are untouched, and it still serves correct results
    assert target in five.lt.run(_live_peers(five.mesh))
    loaded = branchy(tmp_path)
    reqs = request_slices(random_inputs(loaded.model, seed=21, requests=4))
    outs = five.lt.run(_pipeline_results(five.mesh, loaded, [target, "gpu0"], reqs))
    for req, got in zip(reqs, outs, strict=True):
        assert not isinstance(got, BaseException), got
        assert_outputs_equal(got, run_whole(loaded.model, req), ["logits", "probs"])
    st = five.lt.run(five.mesh.status(target))
    assert not [p for p in st["peers"] if p.startswith("attacker")], st["peers"]


async def _live_peers(mesh: Mesh) -> list[str]:
    return sorted(mesh.peers())


# ------------------------------------------------------------------------------- a node dies


@pytest.mark.parametrize(
    "sig",
    [
        # the kernel closes a killed process's sockets: its peers see the connection end at once
        signal.SIGKILL,
        # a frozen node (or a cut link) says nothing: only the heartbeats can tell, within 3 s
        signal.SIGSTOP,
    ],
    ids=["sigkill", "sigstop"],
)
def test_middle_node_dies_while_requests_stream(sig: signal.Signals) -> None:
    mesh_id = unique_mesh()
    loaded = load_for_planning("squeezenet")
    x = request_slices(random_inputs(loaded.model, seed=5, requests=1))[0]
    want = run_whole(loaded.model, x)
    window = 8
    with Nodes(mesh_id) as nodes:
        for name in ("k0", "k1", "k2"):
            nodes.start(name, "--pace")  # each stage takes its profile's predicted time
        nodes.wait_ready()

        async def scenario() -> dict[str, Any]:
            async with asyncio.timeout(60), Mesh(mesh=mesh_id, name="victim-caller") as mesh:
                await mesh.wait_for_peers(3, timeout=20.0)
                plan, _ = mesh.plan(loaded, objective="throughput", stages=3)
                upstream, middle = plan.stages[0].node, plan.stages[1].node
                results: list[tuple[float, Any]] = []
                dropped: dict[str, float] = {}
                state = {"killed_at": 0.0, "in_flight": 0}

                def requests() -> Iterator[dict[str, np.ndarray]]:
                    for _ in range(80):
                        if state["killed_at"] and sig == signal.SIGSTOP:
                            return  # nothing new for a frozen node: only what is in flight
                        yield x

                async def watch_drop() -> None:
                    """When the caller, and the node upstream of the dead one, stop listing it."""
                    t0 = state["killed_at"]
                    while len(dropped) < 2 and time.monotonic() - t0 < DEAD_AFTER_S + 2 * MARGIN_S:
                        if "caller" not in dropped and middle not in mesh.peers():
                            dropped["caller"] = time.monotonic() - t0
                        if "upstream" not in dropped:
                            st = await mesh.status(upstream)
                            if middle not in st["peers"]:
                                dropped["upstream"] = time.monotonic() - t0
                        await asyncio.sleep(0.025)

                watcher: asyncio.Task[None] | None = None
                async with mesh.deploy(
                    plan, loaded, window=window, request_timeout=30.0, recover=False
                ) as pipe:
                    async for out in pipe.stream(requests()):
                        results.append((time.monotonic(), out))
                        if len(results) == 10:
                            state["in_flight"] = pipe.in_flight
                            nodes.kill(middle, sig)
                            state["killed_at"] = time.monotonic()
                            watcher = asyncio.create_task(watch_drop())
                    assert watcher is not None
                    await watcher
                return {"middle": middle, "results": results, "dropped": dropped, **state}

        t0 = time.monotonic()
        rep = asyncio.run(scenario())  # a stopped node is continued and ended by Nodes.stop
        total = time.monotonic() - t0
        middle = rep["middle"]
        if sig == signal.SIGKILL:
            assert not nodes.alive(middle)
        assert all(nodes.alive(n) for n in ("k0", "k1", "k2") if n != middle)

    killed_at = rep["killed_at"]
    assert rep["in_flight"] > 1, "requests should have been in flight when the node died"
    before = [o for _t, o in rep["results"][:10]]
    after = [(t - killed_at, o) for t, o in rep["results"][10:]]
    for o in before:
        assert not isinstance(o, BaseException), o
        assert_outputs_equal(o, want, list(want))
    errors = [(dt, o) for dt, o in after if isinstance(o, BaseException)]
    assert errors, "no request failed after the middle node died"
    assert len(after) - len(errors) <= window, "requests kept succeeding without the middle stage"
    for _dt, e in errors:
        assert isinstance(e, PeerError | InferenceError), repr(e)
        assert f"'{middle}'" in str(e), f"error does not name the dead node {middle!r}: {e}"
    first_error = errors[0][0]
    print(
        f"{sig.name} {middle} with {rep['in_flight']} in flight: first failure after {first_error:.3f} s, "
        f"dropped by {rep['dropped']}, {len(errors)} of {len(after)} failed, scenario {total:.1f} s; "
        f"first error: {errors[0][1]}"
    )
    assert first_error < DEAD_AFTER_S + MARGIN_S
    assert set(rep["dropped"]) == {"caller", "upstream"}, rep["dropped"]
    assert all(v < DEAD_AFTER_S + MARGIN_S for v in rep["dropped"].values()), rep["dropped"]


# ------------------------------------------------------------------------ long-lived deployments


def test_deploy_infer_undeploy_from_separate_processes(tmp_path: Path) -> None:
    mesh_id = unique_mesh()
    flags = ["--mesh", mesh_id, "--wait", "3", "--json"]
    loaded = load_for_planning("squeezenet")
    x = random_inputs(loaded.model, seed=9, requests=3)
    save_npz(tmp_path / "in.npz", x)
    with Nodes(mesh_id) as nodes:
        for name in ("d0", "d1", "d2"):
            nodes.start(name)
        nodes.wait_ready()

        r = meshai("deploy", "squeezenet", "--name", "det", "--stages", "2", *flags)
        assert r.returncode == 0, r.stderr  # the creating process has exited
        dep = json.loads(r.stdout)
        assert dep["name"] == "det" and dep["entry"] in {"d0", "d1", "d2"}
        assert len(dep["plan"]["stages"]) == 2

        r = meshai("deployments", *flags)
        assert r.returncode == 0, r.stderr
        listed = {d["name"]: d for d in json.loads(r.stdout)["deployments"]}
        assert set(listed) == {"det"}
        assert listed["det"]["entry"] == dep["entry"]
        assert [s["node"] for s in listed["det"]["plan"]["stages"]] == [
            s["node"] for s in dep["plan"]["stages"]
        ]

        out = tmp_path / "out.npz"
        r = meshai("infer", "det", "--inputs", str(tmp_path / "in.npz"), "--outputs", str(out), *flags)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["ok"] == 3 and rep["errors"] == 0 and rep["entry"] == dep["entry"]
        names = [o.name for o in loaded.model.graph.output]
        got = load_npz(out, names)
        whole = StageSession(loaded.model, name="whole")
        for i, req in enumerate(request_slices(x)):
            assert_outputs_equal({k: v[i] for k, v in got.items()}, whole.run(req), names)

        r = meshai("undeploy", "det", *flags)
        assert r.returncode == 0, r.stderr
        r = meshai("deployments", *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["deployments"] == []

        async def stages_left() -> dict[str, list[str]]:
            async with Mesh(mesh=mesh_id, name="inspect") as mesh:
                await mesh.wait_for_peers(3, timeout=20.0)
                deadline = time.monotonic() + 5.0  # Undeploy messages are not acknowledged
                while True:
                    left = {}
                    for n in ("d0", "d1", "d2"):
                        st = await mesh.status(n)
                        left[n] = [s["name"] for s in st["stages"]] + list(st["entries"])
                    if not any(left.values()) or time.monotonic() > deadline:
                        return left
                    await asyncio.sleep(0.1)

        assert asyncio.run(stages_left()) == {"d0": [], "d1": [], "d2": []}

        r = meshai("infer", "det", "--inputs", str(tmp_path / "in.npz"), *flags)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "no deployment named 'det'" in r.stderr


# ------------------------------------------------------------------------------ static discovery


def test_static_discovery_without_multicast(tmp_path: Path) -> None:
    mesh_id = unique_mesh()  # unused by the nodes' discovery; names the log files
    loaded = branchy(tmp_path)
    x = random_inputs(loaded.model, seed=13, requests=4)
    save_npz(tmp_path / "in.npz", x)
    with Nodes(mesh_id) as nodes:
        for name in ("s0", "s1", "s2"):
            nodes.start(name, "--discovery", "none")
        peers = ",".join(nodes.address(n) for n in ("s0", "s1", "s2"))
        out = tmp_path / "out.npz"
        r = meshai(
            "run", str(tmp_path / "branchy.onnx"), "--inputs", str(tmp_path / "in.npz"),
            "--outputs", str(out), "--stages", "3", "--discovery", "static", "--peers", peers,
            "--wait", "3", "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["errors"] == 0 and rep["ok"] == 4
        assert sorted(s["node"] for s in rep["plan"]["stages"]) == ["s0", "s1", "s2"]
        got = load_npz(out, ["logits", "probs"])
        for i, req in enumerate(request_slices(x)):
            assert_outputs_equal(
                {k: v[i] for k, v in got.items()}, run_whole(loaded.model, req), ["logits", "probs"]
            )
        assert all(nodes.alive(n) for n in ("s0", "s1", "s2"))
