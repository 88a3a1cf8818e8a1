"""Security refusals at the real-process, real-socket level: a real mesh CA, real mutual TLS 1.3 on
loopback, real signed and encrypted packages, real ``meshai node`` processes.

Unit-level coverage of the same checks lives in tests/test_security.py and tests/test_packages.py;
here every refusal happens in a node process, over a socket, as an operator would meet it.

- A spoofed advert (a plain-TCP ``meshai node --insecure`` and a raw socket server of ours, both
  registered over mDNS in the swarm's mesh) is listed as untrusted by ``meshai peers``, never planned
  on, and never receives an application byte.
- A stolen node id with a certificate from another CA is untrusted and never planned on; a node cannot
  start under another node's name, nor with a client identity.
- A plaintext client is cut off at once; an expired certificate is refused; the node keeps serving.
- Revocation: ``meshai peers --revocations`` hands the CA's newer list to one node; it floods on,
  every node cuts the revoked node off within the design's 3 s (plus a margin) and refuses it afresh.
- Packages against a ``--trusted-key`` node: tampered, unsigned, foreign-signed, downgraded, path
  traversal, external data, raw model bytes — each refused by name while a stage deployed earlier
  from a good package keeps serving correct results.
- A live fuzz of 1,000 mutated frames over authenticated TLS channels; the node survives and serves.
- ``meshai sim`` is secure by default; ``--insecure`` warns and still works.
- ``--insecure`` overrides ``$MESHAI_IDENTITY``.

Every node is a process this module starts and ends by pid, in a mesh of its own (``unique_mesh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import random
import secrets
import ssl
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography import x509
from models_helper import CASES
from runtime_helpers import (
    MESHAI,
    LoopThread,
    Nodes,
    assert_one_line_error,
    assert_outputs_equal,
    child_env,
    live_node_pids,
    meshai,
    test_secrets,
    unique_mesh,
)

from meshai.discovery import Advert, MdnsDiscovery, service_type_for
from meshai.errors import MeshaiError, PeerError, ProtocolError, SecurityError
from meshai.mesh import Mesh
from meshai.packages import FileEntry, Manifest, build_package, keygen, sign_package
from meshai.peers import PeerPool
from meshai.pipeline import Pipeline
from meshai.planning import LoadedModel, load_for_planning
from meshai.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Connection,
    Control,
    ControlReply,
    Deploy,
    Deployed,
    Error,
    FrameDecoder,
    Heartbeat,
    Hello,
    Infer,
    Message,
    Result,
    Undeploy,
    Upload,
    Uploaded,
    encode,
)
from meshai.security import (
    REVOKED,
    SESSION_SEP,
    Trust,
    ca_issue,
    ca_revoke,
    client_context,
    load_identity,
    load_revocations,
)
from meshai.tensors import random_inputs, request_slices
from meshai.transport import connect
from nodes.executor import run_whole

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

NODES = ("sr0", "sr1", "sr2")
OUTPUTS = ["logits", "probs"]
INPUTS = ("cam0", "cam1")
DEAD_AFTER_S = 3.0  # the design: a peer is cut off within 3 s
MARGIN_S = 1.5
NO_ENV_IDENTITY = ["env", "-u", "MESHAI_IDENTITY"]  # a shell without $MESHAI_IDENTITY (see the last test)


# ------------------------------------------------------------------------------------------ swarm


@dataclasses.dataclass
class Swarm:
    nodes: Nodes
    lt: LoopThread
    mesh: Mesh
    loaded: LoadedModel
    model_path: Path
    package: tuple[bytes, str]
    stores: dict[str, Path]

    @property
    def id(self) -> str:
        return self.nodes.mesh

    def hostport(self, name: str) -> tuple[str, int]:
        host, _, port = self.nodes.address(name).rpartition(":")
        return host, int(port)

    def addresses(self) -> set[str]:
        return {self.nodes.address(n) for n in NODES}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Three ``--trusted-key`` nodes (each with a store we can inspect) and a caller Mesh on a loop
    thread; pipelines are deployed from a package signed by the fleet key, encrypted for the nodes."""
    work = tmp_path_factory.mktemp("secrt")
    model_path = work / "branchy.onnx"
    onnx.save(CASES["branchy"](), str(model_path))
    loaded = load_for_planning(str(model_path))
    sec = test_secrets()
    mesh_id = unique_mesh()
    stores = {n: work / f"store-{n}" for n in NODES}
    lt = LoopThread()
    mesh = Mesh(mesh=mesh_id)  # the session's client identity ($MESHAI_IDENTITY)
    entered = False
    try:
        with Nodes(mesh_id) as nodes:
            for n in NODES:
                nodes.start(n, "--trusted-key", str(sec.pub), "--store", str(stores[n]))
            nodes.wait_ready()
            package = sec.package(model_path, "srbranchy", "1")  # now encrypted for sr0..sr2 too
            lt.run(mesh.__aenter__())
            entered = True
            lt.run(mesh.wait_for_peers(3, timeout=30.0))
            yield Swarm(nodes, lt, mesh, loaded, model_path, package, stores)
    finally:
        if entered:
            lt.run(mesh.close(), timeout=30)
        lt.close()
    assert live_node_pids(mesh_id) == []


def _requests(sw: Swarm, seed: int, n: int = 3) -> list[dict[str, np.ndarray]]:
    return request_slices(random_inputs(sw.loaded.model, seed=seed, requests=n))


def _check_outputs(sw: Swarm, reqs: list[dict[str, np.ndarray]], outs: list[Any]) -> None:
    assert len(outs) == len(reqs)
    for req, got in zip(reqs, outs, strict=True):
        assert not isinstance(got, BaseException), repr(got)
        assert_outputs_equal(got, run_whole(sw.loaded.model, req), OUTPUTS)


async def _run_through(
    mesh: Mesh, sw: Swarm, nodes: list[str], reqs: list[dict[str, np.ndarray]], package: tuple[bytes, str]
) -> list[Any]:
    plan, _ = mesh.plan(sw.loaded, objective="throughput", stages=len(nodes), nodes=nodes)
    assert sorted(s.node for s in plan.stages) == sorted(nodes)
    async with asyncio.timeout(60), mesh.deploy(plan, sw.loaded, package=package) as pipe:
        return [o async for o in pipe.stream(reqs)]


def check_serves(sw: Swarm, nodes: list[str], seed: int) -> None:
    """A fresh pipeline from the good package over exactly ``nodes`` returns correct results."""
    reqs = _requests(sw, seed)
    outs = sw.lt.run(_run_through(sw.mesh, sw, nodes, reqs, sw.package))
    _check_outputs(sw, reqs, outs)


def _frame(msg: Message) -> bytes:
    return b"".join(bytes(p) for p in encode(msg))


def _raw_tls_context(identity_dir: Path) -> ssl.SSLContext:
    """A client context built by hand from an identity's files (``client_context`` refuses an expired or
    revoked identity before any socket is opened; the node must refuse it on its own)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(identity_dir / "ca.pem"))
    ctx.load_cert_chain(identity_dir / "cert.pem", identity_dir / "key.pem")
    return ctx


async def _dial(host: str, port: int, ctx: ssl.SSLContext, node_id: str, role: str) -> str:
    """Connect with TLS and a hand-made Hello: "" when the node answered with its Hello, else why not."""
    try:
        ch = await connect(host, port, Hello(node_id, PROTOCOL_VERSION, role, {}, ""), ssl=ctx, timeout=5.0)
    except PeerError as exc:
        return str(exc)
    await ch.close("probe done")
    return ""


def _peers_cli(mesh_id: str, *flags: str) -> dict[str, Any]:
    r = meshai("peers", "--json", "--mesh", mesh_id, *flags, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"peers", "untrusted"}
    return dict(out)


def _peers_until(
    mesh_id: str, flags: list[str], want_untrusted: set[str], tries: int = 4
) -> list[dict[str, Any]]:
    """Run ``meshai peers --json`` until every name in ``want_untrusted`` is listed as untrusted (an advert
    that resolves after the wanted number of peers connected is not tried in that run)."""
    seen = []
    for _ in range(tries):
        out = _peers_cli(mesh_id, *flags)
        seen.append(out)
        if want_untrusted <= {u["name"] for u in out["untrusted"]}:
            break
    return seen


async def _look(
    mesh_id: str,
    real: int,
    want_untrusted: set[str],
    sw: Swarm,
    stages: int | None = None,
    budget: float = 8.0,
) -> dict[str, Any]:
    """A fresh caller: connect, retry the adverts that failed until ``want_untrusted`` are all listed,
    then plan over every peer it has (``meshai sim``'s way) and run the plan from the good package."""
    async with Mesh(mesh=mesh_id) as m:
        await m.wait_for_peers(real, timeout=20.0)
        deadline = time.monotonic() + budget
        while not want_untrusted <= set(m.untrusted) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await m.wait_for_peers(real, timeout=5.0)
        plan, _ = m.plan(sw.loaded, objective="throughput", stages=stages)
        reqs = _requests(sw, seed=11, n=2)
        async with asyncio.timeout(60), m.deploy(plan, sw.loaded, package=sw.package) as pipe:
            outs = [o async for o in pipe.stream(reqs)]
        return {
            "peers": {n: p.address for n, p in m.peers().items()},
            "untrusted": dict(m.untrusted),
            "plan": [s.node for s in plan.stages],
            "reqs": reqs,
            "outs": outs,
        }


# --------------------------------------------------------------------------- 1. spoofed adverts


def _tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records in ``data`` (AssertionError if it is not a record stream)."""
    types, i = [], 0
    while i < len(data):
        assert i + 5 <= len(data), f"truncated TLS record header at {i}"
        types.append(data[i])
        i += 5 + int.from_bytes(data[i + 3 : i + 5], "big")
    assert i == len(data), "bytes after the last TLS record"
    return types


class SpoofServer:
    """A fake node: a valid mDNS advert in the mesh, plain TCP behind it, a meshai Hello sent back to
    whatever arrives, and every byte it receives recorded (one buffer per connection)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[bytearray] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._disc: MdnsDiscovery | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, mesh_id: str, fingerprint: str) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._disc = MdnsDiscovery(("127.0.0.1",), service_type=service_type_for(mesh_id))
        await self._disc.__aenter__()
        summary = {"acc": "gpu", "prec": "fp32,fp16", "mem": str(16 << 30), "emu": "0"}  # a tempting node
        await self._disc.register(
            Advert(self.name, "127.0.0.1", self.port, PROTOCOL_VERSION, summary, fingerprint)
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.received.append(buf)
        self._writers.add(writer)
        hello = _frame(Hello(self.name, PROTOCOL_VERSION, "node", {}, self.address))
        try:
            async with asyncio.timeout(20):
                while chunk := await reader.read(65536):
                    if not buf:
                        writer.write(hello)
                    buf += chunk
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._disc is not None:
            with contextlib.suppress(Exception):
                await self._disc.__aexit__(None, None, None)
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()


async def _insecure_status(name: str, address: str) -> dict[str, Any]:
    """Ask a plain-TCP node for its status (as an insecure caller would)."""
    pool = PeerPool(lambda: Hello(f"srprobe-{secrets.token_hex(2)}", PROTOCOL_VERSION, "client", {}, ""))
    async with pool:
        pool.remember(name, address)
        reply = await pool.control(name, "status", timeout=10.0)
        return dict(reply.body)


def test_spoofed_nodes_are_untrusted_never_planned_never_fed(swarm: Swarm) -> None:
    sw = swarm
    raw = SpoofServer("srspoofraw")
    sr0_fingerprint = load_identity(test_secrets().identities / "sr0").fingerprint  # adverts are hints
    sw.lt.run(raw.start(sw.id, sr0_fingerprint))
    try:
        with Nodes(sw.id) as spoofs:
            spoofs.start("srspoof", "--insecure", prefix=NO_ENV_IDENTITY)  # a real node, plain TCP
            spoofs.wait_ready()
            want = {"srspoof": spoofs.address("srspoof"), "srspoofraw": raw.address}

            # the operator's view: the real nodes are peers, the spoofs untrusted, with a reason
            seen = _peers_until(sw.id, ["--wait", "3"], set(want))
            for out in seen:
                assert {p["name"] for p in out["peers"]} == set(NODES), out["peers"]
                assert {p["address"] for p in out["peers"]} == sw.addresses()
            untrusted = {u["name"]: u for u in seen[-1]["untrusted"]}
            assert set(untrusted) == set(want), seen[-1]["untrusted"]
            for name, address in want.items():
                assert untrusted[name]["address"] == address
                assert untrusted[name]["reason"].startswith(f"cannot connect to {address}"), untrusted[name]
            print("untrusted:", {n: u["reason"] for n, u in untrusted.items()})

            # a planner over Mesh.peers() never sees them; the plan runs on the real nodes only
            look = sw.lt.run(_look(sw.id, 3, set(want), sw, stages=3))
            assert set(look["peers"]) == set(NODES) and set(look["peers"].values()) == sw.addresses()
            assert set(look["untrusted"]) == set(want), look["untrusted"]
            assert sorted(look["plan"]) == sorted(NODES)
            _check_outputs(sw, look["reqs"], look["outs"])

            # the spoof node never got a stage, nor any peer but our probe
            st = sw.lt.run(_insecure_status("srspoof", want["srspoof"]))
            assert st["stages"] == [] and st["entries"] == [] and st["bytes_sent"] == 0, st
            assert all(p.startswith("srprobe-") for p in st["peers"]), st["peers"]
            assert spoofs.alive("srspoof")
    finally:
        sw.lt.run(raw.close())

    # the raw spoof: every connection carried TLS handshake/alert records only — not one byte of
    # application data, no meshai frame (its plaintext Hello ended each handshake)
    assert len(raw.received) >= 2, "meshai peers and the fresh caller should both have tried the spoof"
    for buf in raw.received:
        data = bytes(buf)
        assert data, "a connection that sent nothing"
        assert MAGIC not in data
        types = _tls_records(data)
        assert types[0] == 0x16 and set(types) <= {0x15, 0x16}, types  # handshake, alert; never 0x17


# ------------------------------------------------------------------------- 2. stolen node ids


def test_stolen_node_id_from_another_ca_is_untrusted(swarm: Swarm, tmp_path: Path) -> None:
    sw = swarm
    sec = test_secrets()
    other = tmp_path / "other-ca"
    r = meshai("ca", "init", str(other), "--json")
    assert r.returncode == 0, r.stderr
    for name in ("srm", "sr1"):  # the same names, from a CA the mesh does not trust
        r = meshai("ca", "issue", name, "--ca", str(other), "--out", str(tmp_path / f"imp-{name}"), "--json")
        assert r.returncode == 0, r.stderr

    # a member joins and leaves; then an impostor takes its name
    with Nodes(sw.id) as member:
        member.start("srm", "--trusted-key", str(sec.pub))
        member.wait_ready()
        out = _peers_cli(sw.id, "--wait", "4")
        assert {p["name"] for p in out["peers"]} == {*NODES, "srm"} and out["untrusted"] == []
    with Nodes(sw.id) as imps:
        # log files are named by mesh and node name: the impostor "sr1" must not take over the real one's
        imps._logdir = tmp_path
        imps.start("srm", "--identity", str(tmp_path / "imp-srm"), "--trusted-key", str(sec.pub))
        imps.wait_ready()
        imp_addr = imps.address("srm")
        seen = _peers_until(sw.id, ["--wait", "3"], {"srm"})
        for out in seen:
            assert {p["name"] for p in out["peers"]} == set(NODES), out["peers"]
        u = {u["name"]: u for u in seen[-1]["untrusted"]}
        assert set(u) == {"srm"}, seen[-1]["untrusted"]
        assert u["srm"]["address"] == imp_addr
        assert "certificate verify failed" in u["srm"]["reason"], u["srm"]
        look = sw.lt.run(_look(sw.id, 3, {"srm"}, sw))
        assert "srm" in look["untrusted"] and look["untrusted"]["srm"]["address"] == imp_addr
        assert set(look["peers"]) == set(NODES) and set(look["plan"]) <= set(NODES)
        _check_outputs(sw, look["reqs"], look["outs"])

        # an impostor of a member that is up: whichever advert a caller resolves, the impostor is never
        # a peer and never planned on.  Not asserted: that the real sr1 is always found.  Discovery keeps
        # one advert per node id, so a caller that resolves the impostor's lists "sr1" as untrusted and
        # misses the real node (a denial of service by anyone on the link, no credentials needed).
        imps.start("sr1", "--identity", str(tmp_path / "imp-sr1"), "--trusted-key", str(sec.pub))
        imps.wait_ready()
        imp1 = imps.address("sr1")
        out = _peers_cli(sw.id, "--timeout", "2")
        assert {p["address"] for p in out["peers"]} <= sw.addresses(), out["peers"]
        for entry in out["untrusted"]:
            assert entry["address"] in {imp_addr, imp1}, entry
        shadowed = "sr1" not in {p["name"] for p in out["peers"]}
        print(f"real sr1 hidden from discovery by its impostor: {shadowed}")
        assert imps.alive("srm") and imps.alive("sr1")

    # a valid certificate for sr9 does not make a node sr1; a client identity makes no node at all
    d9 = sec.issue("sr9")
    r = meshai("node", "--name", "sr1", "--identity", str(d9), "--mesh", sw.id, "--json", timeout=60)
    assert_one_line_error(r, "is for 'sr9', not node 'sr1'")
    client = load_identity(sec.client)
    r = meshai("node", "--name", client.name, "--identity", str(sec.client), "--mesh", sw.id, timeout=60)
    assert_one_line_error(r, "is a client identity")
    assert r.stdout == ""  # no ready line: it never served


# ------------------------------------------------------------------------- 3. plaintext client


async def _plaintext(host: str, port: int, payload: bytes, half_close: bool) -> tuple[bytes, str, float]:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    got = bytearray()
    how = "eof"
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(15):
            while chunk := await reader.read(65536):
                got += chunk
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return bytes(got), how, time.monotonic() - t0


def test_plaintext_client_is_cut_off_and_node_keeps_serving(swarm: Swarm) -> None:
    sw = swarm
    host, port = sw.hostport("sr0")
    client = load_identity(test_secrets().client).name
    hello = _frame(Hello(f"{client}{SESSION_SEP}plain", PROTOCOL_VERSION, "client", {}, ""))
    status = _frame(Control("status", {}))

    async def both() -> list[tuple[bytes, str, float]]:
        return list(
            await asyncio.gather(
                _plaintext(host, port, hello, half_close=False),  # a valid Hello, then waits for ours
                _plaintext(host, port, hello + status, half_close=True),
            )
        )

    for got, how, took in asyncio.run(both()):
        print(f"plaintext client: {how} after {took:.3f} s, {len(got)} bytes back {got[:8].hex()}")
        assert took < 2.0 + MARGIN_S, f"a plaintext client was cut off only after {took:.2f} s"
        assert MAGIC not in got
        try:
            msgs = FrameDecoder().feed(got)
        except ProtocolError:
            msgs = []
        assert msgs == [], msgs  # nothing that parses as a meshai frame, let alone a Hello
        if got:
            assert _tls_records(got) == [0x15], got.hex()  # at most a TLS alert
    assert sw.nodes.alive("sr0"), sw.nodes.tail("sr0")
    st = sw.lt.run(sw.mesh.status("sr0"))
    assert not [p for p in st["peers"] if p.endswith(f"{SESSION_SEP}plain")], st["peers"]
    check_serves(sw, ["sr0", "sr1"], seed=31)


# ------------------------------------------------------------------------ 4. expired certificate


def test_expired_certificate_is_refused_and_node_keeps_serving(swarm: Swarm, tmp_path: Path) -> None:
    sw = swarm
    sec = test_secrets()
    name = f"srold{secrets.token_hex(2)}"
    out = tmp_path / name
    two_years_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=730)
    # ca_issue signs and writes the identity (and records it in issued.json), then raises when it loads it
    # back as of `now`: the session CA is younger than the certificate.  The files are what this test needs.
    with contextlib.suppress(SecurityError):
        ca_issue(name, sec.ca, out, now=two_years_ago, days=1)
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC) - dt.timedelta(days=700)
    with pytest.raises(SecurityError, match=f"certificate of '{name}' expired at"):
        load_identity(out)

    host, port = sw.hostport("sr0")
    client_dir = sec.client
    client = load_identity(client_dir).name

    async def dial_all() -> tuple[str, str, str]:
        expired_as_node = await _dial(host, port, _raw_tls_context(out), name, "node")
        expired_as_client = await _dial(host, port, _raw_tls_context(out), f"{name}{SESSION_SEP}x", "client")
        # the same hand-made context with a valid identity is answered: the refusal is the expiry
        control = await _dial(host, port, _raw_tls_context(client_dir), f"{client}{SESSION_SEP}ok", "client")
        return expired_as_node, expired_as_client, control

    as_node, as_client, control = asyncio.run(dial_all())
    print(f"expired certificate: {as_node!r} / {as_client!r}")
    assert control == ""
    for why in (as_node, as_client):
        # TLS 1.3: the node refuses the client certificate after the client's half of the handshake; the
        # client reads its alert ("certificate expired"), a reset or a plain close, depending on whether its
        # Hello was already on the wire. Either way the node never answers with its Hello.
        assert why.startswith(f"cannot connect to {host}:{port}") or why.startswith("no hello from"), why

    # nor can a node start with it
    r = meshai("node", "--name", name, "--identity", str(out), "--mesh", sw.id, timeout=60)
    assert_one_line_error(r, f"certificate of '{name}' expired at")

    assert sw.nodes.alive("sr0"), sw.nodes.tail("sr0")
    check_serves(sw, ["sr0", "sr2"], seed=41)


# ------------------------------------------------------------------------------- 5. revocation


async def _spread(sw: Swarm, watcher: Mesh, victim: str, ca: Path) -> dict[str, Any]:
    """``meshai peers --revocations <ca>/revoked.json`` reaching sr0 only (a static peer list): the node
    takes the newer list from it, and the list must flood on over the nodes' own channels.  Returns when
    each node dropped ``victim`` (seconds since the client process started), as ``watcher`` sees in the
    nodes' status, and what the client printed."""
    host, port = sw.hostport("sr0")
    cmd = [*MESHAI, "peers", "--json", "--discovery", "static", "--peers", f"{host}:{port}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, "--revocations", str(ca / REVOKED)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env(),
    )
    try:
        dropped: dict[str, float] = {}
        while len(dropped) < len(NODES) and time.monotonic() - t0 < DEAD_AFTER_S + 3 * MARGIN_S:
            for n in NODES:
                if n not in dropped:
                    st = await watcher.status(n)
                    if victim not in st["peers"]:
                        dropped[n] = time.monotonic() - t0
            await asyncio.sleep(0.02)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"dropped": dropped, "rc": proc.returncode, "stdout": out, "stderr": err}


def test_revocation_floods_and_cuts_the_revoked_node_off(swarm: Swarm) -> None:
    sw = swarm
    sec = test_secrets()
    victim = f"srv{secrets.token_hex(2)}"  # a revoked name is never issued again: unique to this test
    with Nodes(sw.id) as vn:
        vn.start(victim, "--trusted-key", str(sec.pub))
        vn.wait_ready()
        vpkg = sec.package(sw.model_path, f"{victim}-branchy", "1")  # encrypted for the victim too
        # a caller of its own (its discovery is fresh), holding the list from before the revocation
        m0 = Mesh(mesh=sw.id)
        sw.lt.run(m0.__aenter__())
        pipes: list[Pipeline] = []

        async def deploy(nodes: list[str], seed: int) -> None:
            plan, _ = m0.plan(sw.loaded, objective="throughput", stages=len(nodes), nodes=nodes)
            pipe = await m0.deploy_pipeline(plan, sw.loaded, package=vpkg, request_timeout=30.0)
            pipes.append(pipe)
            reqs = _requests(sw, seed, n=1)
            _check_outputs(sw, reqs, [o async for o in pipe.stream(reqs)])

        async def close_all() -> None:
            for p in pipes:
                with contextlib.suppress(MeshaiError, TimeoutError):
                    async with asyncio.timeout(10):
                        await p.close()
            await m0.close()

        try:
            sw.lt.run(m0.wait_for_peers(4, timeout=30.0))
            # a deployment over every node, one more between sr0 and sr1 (so that the nodes' own channels
            # connect them all), and the victim's channels to sr0 and sr1
            sw.lt.run(deploy(list(NODES), 51))
            sw.lt.run(deploy(["sr0", "sr1"], 52))
            sw.lt.run(deploy(["sr0", victim], 53))
            sw.lt.run(deploy(["sr1", victim], 54))
            links = {n: set(sw.lt.run(m0.status(n))["peers"]) for n in (*NODES, victim)}
            assert victim in links["sr0"] and victim in links["sr1"], links
            reach, todo = {"sr0"}, ["sr0"]  # flooding from sr0 over node-to-node channels reaches every node
            while todo:
                for n in links[todo.pop()] & set(NODES) - reach:
                    reach.add(n)
                    todo.append(n)
            assert reach == set(NODES), links

            crl = ca_revoke(victim, sec.ca)
            rep = sw.lt.run(_spread(sw, m0, victim, sec.ca))
            print(f"revocation v{crl.version}: dropped {rep['dropped']}")
            assert rep["rc"] == 0, rep["stderr"]
            assert [p["name"] for p in json.loads(rep["stdout"])["peers"]] == ["sr0"]
            assert set(rep["dropped"]) == set(NODES), rep
            # sr0 and sr1 both had channels to the victim (sr1 heard of the list from sr0): cut off within
            # the design's 3 s (plus a margin) of the client process starting, its start-up included
            for n in ("sr0", "sr1"):
                assert rep["dropped"][n] < DEAD_AFTER_S + MARGIN_S, rep
            ca_pem = (sec.ca / "ca.crt").read_bytes()
            assert load_revocations(sec.client, ca_pem).version == crl.version  # the client kept it too

            # every node holds the new list (kept in its identity directory; sr2 heard of it only by
            # flooding) and says it is not news
            deadline = time.monotonic() + DEAD_AFTER_S + MARGIN_S
            held = {}
            while time.monotonic() < deadline:
                held = {n: load_revocations(sec.identities / n, ca_pem).version for n in NODES}
                if set(held.values()) == {crl.version}:
                    break
                time.sleep(0.05)
            assert held == dict.fromkeys(NODES, crl.version), held
            for n in NODES:
                reply = sw.lt.run(m0.pool.control(n, "revocations", {"crl": crl.to_bytes()}))
                assert reply.ok and reply.body == {"version": crl.version, "changed": False}, reply

            # a fresh connection with the victim's certificate is refused by every node
            ctx = _raw_tls_context(sec.identities / victim)

            async def dial_all() -> list[str]:
                return [await _dial(*sw.hostport(n), ctx, victim, "node") for n in NODES]

            refusal = f"certificate of '{victim}' is revoked (revocation list v{crl.version})"
            for n, why in zip(NODES, asyncio.run(dial_all()), strict=True):
                assert refusal in why, (n, why)

            # a caller started with --revocations refuses the victim too, and says why
            flags = ["--wait", "3", "--revocations", str(sec.ca / REVOKED)]
            seen = _peers_until(sw.id, flags, {victim})
            for out in seen:
                assert {p["name"] for p in out["peers"]} == set(NODES), out["peers"]
            u = {e["name"]: e for e in seen[-1]["untrusted"]}
            assert victim in u, seen[-1]["untrusted"]
            assert u[victim]["address"] == vn.address(victim)
            assert f"certificate of '{victim}' is revoked" in u[victim]["reason"], u[victim]
            assert vn.alive(victim)
        finally:
            sw.lt.run(close_all(), timeout=60)
    assert all(sw.nodes.alive(n) for n in NODES)
    check_serves(sw, ["sr0", "sr1"], seed=55)


# ------------------------------------------------------------------------------ 6. packages


class Uploader:
    """A caller's own PeerPool (the class ``Mesh`` uses) that hands back the nodes' Uploaded and
    Deployed replies, so the refusals can be read as the node sent them."""

    def __init__(self, identity_dir: Path) -> None:
        self.trust = Trust.from_dir(identity_dir)
        self.name = f"{self.trust.identity.name}{SESSION_SEP}pk{secrets.token_hex(2)}"
        self.replies: asyncio.Queue[Message] = asyncio.Queue()
        self.pool = PeerPool(self._hello, self._on_message, trust=self.trust)

    def _hello(self) -> Hello:
        return Hello(self.name, PROTOCOL_VERSION, "client", {"revocations": self.trust.version}, "")

    async def _on_message(self, peer: str, msg: Message, ch: Any) -> None:
        if isinstance(msg, Uploaded | Deployed):
            await self.replies.put(msg)

    async def _reply(self, match: Any) -> Message:
        async with asyncio.timeout(60):
            while True:
                msg = await self.replies.get()
                if match(msg):
                    return msg

    async def upload(self, node: str, ref: str, data: bytes) -> Uploaded:
        await self.pool.send(node, Upload(ref, data))
        reply = await self._reply(lambda m: isinstance(m, Uploaded) and m.package == ref)
        assert isinstance(reply, Uploaded)
        return reply

    async def deploy(self, node: str, msg: Deploy) -> Deployed:
        await self.pool.send(node, msg)
        reply = await self._reply(lambda m: isinstance(m, Deployed) and m.deployment == msg.deployment)
        assert isinstance(reply, Deployed)
        return reply


def _rezip(pkg: bytes, change: Any = None, extra: tuple[str, bytes] | None = None) -> bytes:
    """The package's entries written again (valid CRCs), ``change(name, body)`` applied, ``extra`` added."""
    with zipfile.ZipFile(io.BytesIO(pkg)) as zf:
        items = [(info, zf.read(info)) for info in zf.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zw:
        for info, body in items:
            zw.writestr(info, change(info.filename, body) if change else body)
        if extra is not None:
            zw.writestr(zipfile.ZipInfo(extra[0], date_time=(1980, 1, 1, 0, 0, 0)), extra[1])
    return out.getvalue()


def _flip_middle_byte(name: str, body: bytes) -> bytes:
    if not name.startswith("files/"):
        return body
    b = bytearray(body)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


def _external_data_package(tmp: Path, key: Path) -> bytes:
    """A signed, intact package whose ONNX file points an initializer at a file on the node's disk."""
    m = CASES["branchy"]()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "../../../../etc/passwd"
    body = m.SerializeToString()
    manifest = Manifest(
        "srext",
        "1",
        "2026-01-01T00:00:00Z",
        (FileEntry("m.onnx", hashlib.sha256(body).hexdigest(), len(body)),),
    )
    path = tmp / "srext-1.pkg"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zw:
        zw.writestr(zipfile.ZipInfo("manifest.json", date_time=(1980, 1, 1, 0, 0, 0)), manifest.to_bytes())
        zw.writestr(zipfile.ZipInfo("files/m.onnx", date_time=(1980, 1, 1, 0, 0, 0)), body)
    sign_package(path, key)
    return path.read_bytes()


def _whole_model_deploy(deployment: str, package: str = "", model: bytes = b"") -> Deploy:
    return Deploy(
        deployment=deployment,
        stage_id=0,
        model=model,
        sha256=hashlib.sha256(model).hexdigest() if model else "",
        inputs=INPUTS,
        outputs=tuple(OUTPUTS),
        routes={},
        package=package,
        cut_inputs=INPUTS if package else (),
        cut_outputs=tuple(OUTPUTS) if package else (),
        options={"to_entry": OUTPUTS},
    )


def test_packages_refused_by_a_trusted_key_node(swarm: Swarm, tmp_path: Path) -> None:
    sw = swarm
    sec = test_secrets()
    target = "sr2"
    good, good_ref = sw.package
    recipients = dict(sec.recipients)

    unsigned = build_package([sw.model_path], "srunsigned", "1", tmp_path / "u.pkg", encrypt_for=recipients)
    other_key, _ = keygen(tmp_path / "other")
    foreign = build_package([sw.model_path], "srforeign", "1", tmp_path / "f.pkg", encrypt_for=recipients)
    sign_package(foreign, other_key)
    dg2, dg2_ref = sec.package(sw.model_path, "srdg", "2")
    dg1, dg1_ref = sec.package(sw.model_path, "srdg", "1")
    cases: dict[str, tuple[str, bytes, str]] = {  # case: (ref, bytes, what the refusal must say)
        "tampered": (
            good_ref,
            _rezip(good, _flip_middle_byte),
            "does not match its SHA-256 in the signed manifest",
        ),
        "unsigned": ("srunsigned@1", unsigned.read_bytes(), "package is unsigned (no manifest.sig)"),
        "foreign-key": ("srforeign@1", foreign.read_bytes(), "not the trusted key"),
        "path-traversal": (
            good_ref,
            _rezip(good, extra=("files/../../../etc/cron.d/meshai", b"* * * * * root sh\n")),
            "'files/../../../etc/cron.d/meshai' contains '..' (path traversal)",
        ),
        "external-data": ("srext@1", _external_data_package(tmp_path, sec.key), "refers to external data"),
    }

    async def scenario() -> dict[str, Any]:
        # a stage deployed earlier from the good package, serving throughout
        plan, _ = sw.mesh.plan(sw.loaded, stages=1, nodes=[target])
        pipe = await sw.mesh.deploy_pipeline(plan, sw.loaded, package=sw.package, request_timeout=30.0)
        before = _requests(sw, seed=61, n=2)
        after = _requests(sw, seed=62, n=2)
        up = Uploader(sec.client)
        try:
            outs_before = [o async for o in pipe.stream(before)]
            up.pool.remember(target, sw.nodes.address(target))
            replies = {case: await up.upload(target, ref, data) for case, (ref, data, _) in cases.items()}
            # a downgrade: 2 is uploaded and activated, then 1 is refused
            ok2 = await up.upload(target, dg2_ref, dg2)
            dep = f"srdg.{secrets.token_hex(3)}"
            deployed2 = await up.deploy(target, _whole_model_deploy(dep, package=dg2_ref))
            await up.pool.send(target, Undeploy(dep))
            replies["downgrade"] = await up.upload(target, dg1_ref, dg1)
            raw = await up.deploy(
                target, _whole_model_deploy(f"srraw.{secrets.token_hex(3)}", model=sw.model_path.read_bytes())
            )
            outs_after = [o async for o in pipe.stream(after)]
            st = await sw.mesh.status(target)
        finally:
            await up.pool.close()
            with contextlib.suppress(MeshaiError):
                await pipe.close()
        return {
            "replies": replies,
            "ok2": ok2,
            "deployed2": deployed2,
            "raw": raw,
            "before": (before, outs_before),
            "after": (after, outs_after),
            "stage": pipe.stage_deployment,
            "status": st,
        }

    rep = sw.lt.run(scenario(), timeout=180)
    _check_outputs(sw, *rep["before"])
    _check_outputs(sw, *rep["after"])
    assert rep["stage"] in {s["deployment"] for s in rep["status"]["stages"]}
    assert rep["ok2"].ok and rep["deployed2"].ok, (rep["ok2"], rep["deployed2"])
    expect = {case: msg for case, (_, _, msg) in cases.items()}
    expect["downgrade"] = "refusing srdg@1: lower than 2, the highest version this node has activated"
    for case, reply in rep["replies"].items():
        print(f"{case}: {reply.message}")
        assert not reply.ok, case
        assert expect[case] in reply.message, (case, reply.message)
    raw = rep["raw"]
    assert not raw.ok and f"node '{target}' loads only signed packages" in raw.message, raw
    assert "came as raw model bytes" in raw.message

    # what reached the node's disk: only the packages it accepted, still encrypted
    store = sw.stores[target]
    stored = {str(p.relative_to(store)) for p in store.rglob("*.pkg")}
    assert {"srbranchy/1.pkg", "srdg/2.pkg"} <= stored, stored
    assert (store / "srbranchy" / "1.pkg").read_bytes() == good  # the tampered copies changed nothing
    refused = ("srunsigned", "srforeign", "srext", "srdg/1.pkg")
    assert not [p for p in stored if p.startswith(refused)], stored
    assert not [p for p in store.parent.rglob("*") if "cron" in p.name], "a traversal entry was written"
    assert not Path("/etc/cron.d/meshai").exists()
    weights = onnx.numpy_helper.to_array(sw.loaded.model.graph.initializer[0]).tobytes()[:64]
    for p in store.rglob("*"):
        if p.is_file():
            assert weights not in p.read_bytes(), f"plaintext weights in {p}"
    assert sw.nodes.alive(target)


# ---------------------------------------------------------------------------------- 7. live fuzz

FUZZ_FRAMES = 1000
FUZZ_WORKERS = 8


def _fuzz_corpus(deployment: str, model: bytes) -> list[bytes]:
    """Valid frames of every kind a peer can send after the hellos."""
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    msgs: list[Message] = [
        Heartbeat(1, time.time()),
        Control("status", {}),
        Control("deployments", {}),
        Control("revocations", {"crl": b'{"format":"meshai-revocations/1"}'}),
        Control("no-such-op", {"x": [1, 2, 3], "y": {"z": b"\x00" * 8}}),
        Infer(1 << 40, deployment, {"cam0": x, "cam1": x}),
        Infer((1 << 40) + 1, "fz.none", {"t": np.arange(16, dtype=np.int64)}),
        Upload("fz@1", os.urandom(512)),
        _whole_model_deploy("fz.raw", model=model),
        _whole_model_deploy("fz.pkg", package="fz@1"),
        Undeploy("fz.none"),
        Result(7, "fz.none", {"y": x}),
        Error(None, "bogus", "fuzz"),
        Deployed("fz.none", 0, True, ""),
        Uploaded("fz@1", True, ""),
        ControlReply("status", True, {}),
    ]
    return [_frame(m) for m in msgs]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    kind = rng.randrange(7)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        del b[rng.randrange(1, len(b)) :]
    elif kind == 2:  # random bytes
        return rng.randbytes(rng.randint(1, 2048))
    elif kind == 3:  # the prefix's length fields
        pos = rng.randrange(4, 16)
        b[pos : pos + 4] = rng.randbytes(4)
    elif kind == 4:  # random bytes spliced into the header or body
        pos = rng.randrange(len(b))
        b[pos : pos + rng.randint(1, 32)] = rng.randbytes(rng.randint(1, 32))
    elif kind == 5:  # a frame cut short, then the next one
        return bytes(b[: rng.randrange(1, len(b))]) + frame
    return bytes(b)  # kind 6: the valid frame as is


async def _fuzz(
    host: str, port: int, ctx: ssl.SSLContext, client: str, corpus: list[bytes]
) -> dict[str, int]:
    stats = {"sent": 0, "connections": 0, "closed_by_node": 0, "answers": 0}
    rng = random.Random(20260101)

    async def session(worker: int, n: int) -> None:
        stats["connections"] += 1
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            me = f"{client}{SESSION_SEP}fz{worker}x{n}"
            conn = Connection(me, "client")
            writer.write(b"".join(bytes(p) for p in conn.send(Hello(me, PROTOCOL_VERSION, "client", {}, ""))))
            async with asyncio.timeout(10):
                while conn.their_hello is None:
                    data = await reader.read(65536)
                    assert data, "the node closed an authenticated channel before its Hello"
                    conn.receive_data(data)
            for _ in range(rng.randint(1, 12)):
                if stats["sent"] >= FUZZ_FRAMES:
                    return
                writer.write(_mutate(rng, rng.choice(corpus)))
                stats["sent"] += 1
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.01)
                except TimeoutError:
                    continue
                if not data:
                    stats["closed_by_node"] += 1
                    return
                stats["answers"] += 1
        except (ConnectionError, ssl.SSLError):
            stats["closed_by_node"] += 1
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await writer.wait_closed()

    async def worker(w: int) -> None:
        n = 0
        while stats["sent"] < FUZZ_FRAMES:
            n += 1
            await session(w, n)

    async with asyncio.timeout(90):
        await asyncio.gather(*(worker(w) for w in range(FUZZ_WORKERS)))
    return stats


def test_live_fuzz_over_tls_leaves_the_node_serving(swarm: Swarm) -> None:
    sw = swarm
    target = "sr1"
    host, port = sw.hostport(target)
    sec = test_secrets()
    ident = load_identity(sec.client)

    async def deploy() -> tuple[Pipeline, list[Any]]:
        plan, _ = sw.mesh.plan(sw.loaded, objective="throughput", stages=2, nodes=[target, "sr0"])
        pipe = await sw.mesh.deploy_pipeline(plan, sw.loaded, package=sw.package, request_timeout=30.0)
        return pipe, [o async for o in pipe.stream(reqs)]

    reqs = _requests(sw, seed=71, n=2)
    pipe, outs = sw.lt.run(deploy())
    try:
        _check_outputs(sw, reqs, outs)
        corpus = _fuzz_corpus(pipe.stage_deployment, sw.model_path.read_bytes())
        t0 = time.monotonic()
        stats = asyncio.run(_fuzz(host, port, client_context(ident), ident.name, corpus))
        print(f"fuzz: {stats} in {time.monotonic() - t0:.1f} s")
        assert stats["sent"] == FUZZ_FRAMES
        assert stats["closed_by_node"] > 0, "no mutated frame made the node close a channel"
        assert stats["answers"] > 0, "the node answered none of the frames that stayed valid"
        assert sw.nodes.alive(target), sw.nodes.tail(target)

        # every fuzz channel is gone from the node; the stage deployed before keeps serving correctly
        async def after() -> tuple[list[str], list[Any]]:
            deadline = time.monotonic() + DEAD_AFTER_S + MARGIN_S
            while True:
                st = await sw.mesh.status(target)
                left = [p for p in st["peers"] if f"{SESSION_SEP}fz" in p]
                if not left or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            return left, [o async for o in pipe.stream(reqs2)]

        reqs2 = _requests(sw, seed=72, n=3)
        left, outs2 = sw.lt.run(after())
        assert left == [], left
        _check_outputs(sw, reqs2, outs2)
    finally:
        with contextlib.suppress(MeshaiError):
            sw.lt.run(pipe.close())
    check_serves(sw, [target, "sr2"], seed=73)
    assert sw.nodes.alive(target)
    log = sw.nodes.logs[target].read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------------ 8. sim


def test_sim_is_secure_by_default_and_insecure_warns(swarm: Swarm) -> None:
    args = ["sim", "--nodes", "2", "--model", str(swarm.model_path), "--requests", "4", "--stages", "2", "--json"]  # fmt: skip
    r = meshai(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "insecure" not in r.stderr
    rep = json.loads(r.stdout)
    assert rep["security"] == {
        "mutual_tls": True,
        "package": "branchy@1",
        "package_signed": True,
        "package_encrypted": True,
    }
    assert rep["ok"] == 4 and rep["errors"] == 0 and rep["max_abs_diff"] < 1e-4

    # as run from a shell without $MESHAI_IDENTITY (with it, see the next test)
    r = meshai(*args, "--insecure", timeout=120, prefix=NO_ENV_IDENTITY)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshai: warning: insecure mode"), r.stderr
    rep = json.loads(r.stdout)
    assert rep["security"]["mutual_tls"] is False
    assert rep["security"]["package_signed"] is False and rep["security"]["package"] is None
    assert rep["ok"] == 4 and rep["errors"] == 0 and rep["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------------ 9. --insecure vs env


def test_insecure_flag_overrides_identity_from_environment() -> None:
    assert os.environ.get("MESHAI_IDENTITY"), "conftest sets $MESHAI_IDENTITY"
    assert Mesh(insecure=True).trust is None, "Mesh(insecure=True) uses $MESHAI_IDENTITY"
    with Nodes(unique_mesh()) as nodes:
        nodes.start("srinsecure", "--insecure")
        nodes.wait_ready(timeout=30)
