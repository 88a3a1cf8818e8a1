"""Several "hosts" on one machine: network namespaces joined by a bridge, real mDNS across them.

Three host namespaces, each with a veth whose other end sits on a bridge in a FOURTH namespace, so
the machine's own network (its namespaces, interfaces, routes) is never touched.  Addresses come from
a private 10.213.X.0/24.  One ``meshai node`` runs in each host namespace, bound to that namespace's
address; a caller in the first namespace discovers them over multicast, plans, deploys and runs.
Every process is ended by pid and every namespace deleted in ``finally``, also on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from models_helper import CASES
from runtime_helpers import Nodes, assert_outputs_equal, meshai, unique_mesh

from meshai.planning import load_for_planning
from meshai.tensors import load_npz, random_inputs, request_slices, save_npz
from nodes.executor import run_whole

pytestmark = [pytest.mark.netns, pytest.mark.process, pytest.mark.timeout(180)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _netns_names() -> set[str]:
    out = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns' is unavailable: {r.stderr.strip()}"
    return None


@dataclass
class Hosts:
    bridge_ns: str
    hosts: list[str]  # namespace names, host i has address <subnet>.<i+1>
    subnet: str  # "10.213.X"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i]]


def new_hosts() -> Hosts:
    """Names (random suffix) and a random private subnet for three hosts and a bridge."""
    tag = secrets.token_hex(3)
    subnet = f"10.213.{secrets.randbelow(250) + 1}"
    return Hosts(f"meshai-{tag}-br", [f"meshai-{tag}-h{i}" for i in range(3)], subnet)


@contextmanager
def three_hosts(h: Hosts) -> Iterator[Hosts]:
    """Create the four namespaces (three hosts, one bridge); all deleted on exit, whatever happened."""
    created: list[str] = []
    try:
        for ns in (h.bridge_ns, *h.hosts):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", h.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", h.bridge_ns, "link", "set", "br0", "up")
        _ip("-n", h.bridge_ns, "link", "set", "lo", "up")
        for i, ns in enumerate(h.hosts):
            port = f"p{i}"
            # created inside the host namespace, its peer straight in the bridge namespace
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", h.bridge_ns)
            _ip("-n", h.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", h.bridge_ns, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{h.addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)


def test_swarm_across_network_namespaces(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    mesh_id = unique_mesh()
    path = tmp_path / "branchy.onnx"
    onnx.save(CASES["branchy"](), str(path))
    branchy = load_for_planning(str(path))
    x = random_inputs(branchy.model, seed=17, requests=4)
    save_npz(tmp_path / "branchy_in.npz", x)
    sq = load_for_planning("squeezenet")
    save_npz(tmp_path / "sq_in.npz", random_inputs(sq.model, seed=2, requests=3))
    h = new_hosts()
    ours = {h.bridge_ns, *h.hosts}
    try:
        # leaving the block ends the node processes (by pid) first, then deletes the namespaces
        with three_hosts(h), Nodes(mesh_id) as nodes:
            for i in range(3):
                a = h.addr(i)
                nodes.start(f"h{i}", "--listen", f"{a}:0", "--interface", a, prefix=h.exec_prefix(i))
            ready = nodes.wait_ready()
            for i in range(3):
                assert ready[f"h{i}"]["address"].startswith(f"{h.addr(i)}:")

            # multicast crosses the bridge: a caller in the third namespace sees all three nodes
            common = ["--mesh", mesh_id, "--wait", "3", "--json"]
            r = meshai("peers", "--interface", h.addr(2), *common, prefix=h.exec_prefix(2), timeout=60)
            assert r.returncode == 0, r.stderr
            peers = {p["name"]: p["address"] for p in json.loads(r.stdout)["peers"]}
            assert peers == {f"h{i}": ready[f"h{i}"]["address"] for i in range(3)}

            # the caller lives in the first namespace (beside h0) and runs a real-weight model
            out = tmp_path / "branchy_out.npz"
            r = meshai(
                "run", str(path), "--inputs", str(tmp_path / "branchy_in.npz"), "--outputs", str(out),
                "--stages", "3", "--interface", h.addr(0), *common,
                prefix=h.exec_prefix(0), timeout=120,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            rep = json.loads(r.stdout)
            assert (rep["ok"], rep["errors"]) == (4, 0), rep.get("first_error")
            assert sorted(s["node"] for s in rep["plan"]["stages"]) == ["h0", "h1", "h2"]
            got = load_npz(out, ["logits", "probs"])
            for i, req in enumerate(request_slices(x)):
                want = run_whole(branchy.model, req)
                assert_outputs_equal({k: v[i] for k, v in got.items()}, want, ["logits", "probs"])

            r = meshai(
                "run", "squeezenet", "--inputs", str(tmp_path / "sq_in.npz"), "--stages", "3",
                "--interface", h.addr(0), *common, prefix=h.exec_prefix(0), timeout=120,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            rep = json.loads(r.stdout)
            assert (rep["ok"], rep["errors"]) == (3, 0), rep.get("first_error")
            assert all(nodes.alive(f"h{i}") for i in range(3))
    finally:
        leftover = _netns_names() & ours
    assert not leftover, f"namespaces left behind: {leftover}"
