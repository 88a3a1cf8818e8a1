"""Federated personalisation end to end: real ``meshai node`` processes (mutual TLS, a fleet-signed
package encrypted for them), each data node holding its own label-skewed digits (``meshai digits
--federated``), ``meshai federate`` running FedAvg rounds of the head over them.

What is proven:

- FedAvg raises every node's accuracy on its own test split, and the global (sample-weighted) one,
  and stays within reach of the pooled upper bound (the head fine-tuned centrally on the union of the
  nodes' train splits, which only this test can compute: it holds every node's data).
- The new package verifies with the fleet key, carries the next version (``1`` → ``1.0.1``), and its
  model differs from the old one in exactly the head's two initializers.
- On the wire (each node's ``--audit-log``): see ``test_nothing_but_head_weights_leaves_a_data_node``.
- Bad input is one line naming what was wrong: no data on any connected node, an unknown head, an
  unknown deployment, a bad ``--data`` file; a node refuses a round for a package it does not hold,
  head names that are not the package's head, weights of the wrong shape, or without data.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from runtime_helpers import Nodes, assert_one_line_error, meshai, test_secrets, unique_mesh

from meshai.digits import FederatedDigits, federated_digits
from meshai.federate import FederateConfig, pooled_bound
from meshai.mesh import Mesh
from meshai.packages import load_identity, open_package, verify_package
from meshai.protocol import ControlReply
from nodes.audit import audit_record
from scheduler.fedavg import head_to_wire

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

ROUNDS, EPOCHS, LR = 3, 2, 0.1
DATA_NODES = ("site0", "site1", "site2")
PLAIN = "plain"  # a node without data; it hosts the deployment's entry
HEAD = ("fc3.weight", "fc3.bias")


@dataclass
class Swarm:
    work: Path
    case: FederatedDigits
    mesh: str
    nodes: Nodes
    package: Path
    ref: str
    audit: dict[str, Path]

    def flags(self, wait: int = 4) -> list[str]:
        return ["--mesh", self.mesh, "--wait", str(wait), "--timeout", "20"]

    def federate(self, *extra: str, deployment: str = "digits") -> Any:
        sec = test_secrets()
        return meshai(
            "federate", deployment, "--package", str(self.package), "--key", str(sec.key),
            "--encrypt-for", str(sec.identities), *extra, timeout=120,
        )  # fmt: skip


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Four node processes (three with data, one without), the base digits model deployed from a
    signed, encrypted package in two stages with its entry on the plain node, and 20 requests run
    through it (so the audit logs show what a stage sends)."""
    work = tmp_path_factory.mktemp("federate")
    case = federated_digits(work / "case", len(DATA_NODES))
    sec = test_secrets()
    mesh = unique_mesh()
    audit = {n: work / f"{n}.audit.jsonl" for n in (*DATA_NODES, PLAIN)}
    with Nodes(mesh) as nodes:
        for name, data in zip(DATA_NODES, case.nodes, strict=True):
            nodes.start(
                name, "--trusted-key", str(sec.pub), "--data", str(data), "--audit-log", str(audit[name])
            )
        nodes.start(PLAIN, "--trusted-key", str(sec.pub), "--audit-log", str(audit[PLAIN]))
        nodes.wait_ready()
        data, ref = sec.package(case.model, "digits")  # signed, sealed for every node issued
        pkg = work / "digits-1.pkg"
        pkg.write_bytes(data)
        s = Swarm(work, case, mesh, nodes, pkg, ref, audit)
        r = meshai(
            "deploy", str(case.model), "--name", "digits", "--package", str(pkg), "--entry", PLAIN,
            "--stages", "2", *s.flags(), "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with np.load(case.holdout) as z:
            np.savez(work / "requests.npz", pixels=z["x"][:20, None, :])
        r = meshai("infer", "digits", "--inputs", str(work / "requests.npz"), *s.flags(), "--json")
        assert r.returncode == 0, r.stderr
        yield s


@pytest.fixture(scope="module")
def federated(swarm: Swarm) -> dict[str, Any]:
    """``meshai federate digits --rounds 3 --json``, timed, with its report."""
    t0 = time.time()
    r = swarm.federate(
        "--rounds", str(ROUNDS), "--epochs", str(EPOCHS), "--lr", str(LR), "--out", str(swarm.work / "new.pkg"),
        *swarm.flags(), "--json",
    )  # fmt: skip
    t1 = time.time()
    assert r.returncode == 0, r.stderr
    return {"report": json.loads(r.stdout), "t0": t0, "t1": t1, "seconds": t1 - t0}


def _data(case: FederatedDigits) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, path in zip(DATA_NODES, case.nodes, strict=True):
        with np.load(path) as z:
            out[name] = (z["x"], z["y"])
    return out


def test_fedavg_raises_every_nodes_accuracy_towards_the_pooled_bound(
    swarm: Swarm, federated: dict[str, Any]
) -> None:
    rep = federated["report"]
    assert rep["deployment"] == "digits" and rep["from"] == swarm.ref
    assert rep["head"]["node"] == "fc3" and (rep["head"]["weight"], rep["head"]["bias"]) == HEAD
    assert sorted(rep["nodes"]) == list(DATA_NODES)  # the plain node said it holds no data
    assert len(rep["rounds"]) == ROUNDS and rep["rollout"] is None
    bound = pooled_bound(
        onnx.load(str(swarm.case.model)),
        _data(swarm.case),
        FederateConfig(rounds=ROUNDS, epochs=EPOCHS, lr=LR),
    )
    for name, v in rep["nodes"].items():
        assert v["after"] > v["before"] + 0.02, (name, v)
        assert v["before"] == pytest.approx(bound["nodes"][name]["base"], abs=1e-9)  # same split, same body
        assert v["train_samples"] + v["test_samples"] == len(_data(swarm.case)[name][1])
    g = rep["global"]
    assert g["after"] > g["before"] + 0.05, g
    assert g["before"] == pytest.approx(bound["global"]["base"], abs=1e-9)
    assert g["after"] <= bound["global"]["pooled"] + 0.03, (g, bound["global"])
    assert g["after"] > bound["global"]["pooled"] - 0.05, (g, bound["global"])
    assert (
        rep["rounds"][0]["global_before"] == g["before"] and rep["rounds"][-1]["global_after"] == g["after"]
    )


def test_the_new_package_is_the_next_signed_version_with_only_the_head_changed(
    swarm: Swarm, federated: dict[str, Any]
) -> None:
    sec = test_secrets()
    pkg = federated["report"]["package"]
    assert pkg["ref"] == "digits@1.0.1" and Path(pkg["path"]) == swarm.work / "new.pkg"
    data = Path(pkg["path"]).read_bytes()
    manifest = verify_package(data, sec.pub)
    assert manifest.version == "1.0.1" and manifest.encrypted
    opened = open_package(data, sec.pub, recipient=load_identity(sec.identities / DATA_NODES[0]))
    new = onnx.load_from_string(opened.model())
    old = onnx.load(str(swarm.case.model))
    assert list(new.graph.node) == list(old.graph.node)
    assert list(new.graph.input) == list(old.graph.input) and list(new.graph.output) == list(old.graph.output)
    olds = {t.name: numpy_helper.to_array(t) for t in old.graph.initializer}
    news = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert olds.keys() == news.keys()
    changed = {n for n in olds if not np.array_equal(olds[n], news[n])}
    assert changed == set(HEAD)
    assert all(olds[n].dtype == news[n].dtype and olds[n].shape == news[n].shape for n in HEAD)


def test_federate_hands_the_new_version_to_a_staged_rollout(swarm: Swarm, federated: dict[str, Any]) -> None:
    """``--rollout 50%,100%``: the new version goes to the nodes and starts as a canary on the
    deployment's entry (it waits for traffic to judge); the operator rolls it back without a key (the
    canary never became the active version)."""
    r = swarm.federate(
        "--rounds", "1", "--epochs", "1", "--out", str(swarm.work / "new2.pkg"), "--version", "1.0.2",
        "--rollout", "50%,100%", "--bake", "1s", *swarm.flags(), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["rollout"]
    assert (st["old_version"], st["new_version"], st["status"]) == ("1", "1.0.2", "baking")
    assert st["steps"][0]["share"] == 0.5 and st["config"]["bake_s"] == 1.0
    r = meshai("rollout", "rollback", "digits", *swarm.flags(), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["final"] == "rolled_back"


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_nothing_but_head_weights_leaves_a_data_node(swarm: Swarm, federated: dict[str, Any]) -> None:
    """The exact check, per data node, over every message its ``--audit-log`` recorded between the
    start and the end of ``meshai federate``: no message is an Infer or a Result; no message carries a
    tensor; every bytes value in any message is a ``federate`` ControlReply's
    ``body.weights.<name>.data`` for a head tensor, exactly that tensor's size (10×128 float32 weight
    or 10 float32 bias); and each data node sent one such weight and bias per round.  Before
    federation the same logs recorded the stages' Infer/Result tensors: the audit sees tensors."""
    sizes = {f"body.weights.{HEAD[0]}.data": 10 * 128 * 4, f"body.weights.{HEAD[1]}.data": 10 * 4}
    t0, t1 = federated["t0"], federated["t1"]
    tensors_before = 0
    for name in DATA_NODES:
        lines = _audit(swarm.audit[name])
        tensors_before += sum(1 for e in lines if e["t"] < t0 and e["tensors"])
        window = [e for e in lines if t0 <= e["t"] <= t1]
        assert window, name
        assert not [e for e in window if e["kind"] in ("infer", "result")], name
        assert not [e for e in window if e["tensors"]], name
        payloads = [e for e in window if e["bytes"]]
        for e in payloads:
            assert (e["kind"], e.get("op")) == ("control_reply", "federate"), e
            assert e["bytes"] == sizes, e
        assert len(payloads) == ROUNDS, (name, payloads)
    plain = _audit(swarm.audit[PLAIN])
    tensors_before += sum(1 for e in plain if e["t"] < t0 and e["tensors"])
    assert tensors_before > 0  # stages sent activations and results before: the audit records tensors


def test_audit_record_lists_shapes_and_sizes_never_values() -> None:
    body = {"weights": head_to_wire({"w": np.ones((2, 3), np.float32)}), "n": 5}
    rec = audit_record(ControlReply("federate", True, body), "client-1", 1.5)
    assert rec == {
        "t": 1.5, "kind": "control_reply", "peer": "client-1", "op": "federate", "tensors": [],
        "bytes": {"body.weights.w.data": 24},
    }  # fmt: skip
    from meshai.protocol import Infer

    rec = audit_record(Infer(7, "d", {"pixels": np.zeros((1, 64), np.float32)}), "n1", 2.0)
    assert rec["tensors"] == [{"name": "pixels", "dtype": "float32", "shape": [1, 64]}] and rec["bytes"] == {}


# ------------------------------------------------------------------------------------- refusals


def test_bad_input_is_one_line(swarm: Swarm) -> None:
    out = str(swarm.work / "never.pkg")
    r = swarm.federate("--rounds", "1", "--out", out, *swarm.flags(), deployment="nope")
    assert_one_line_error(r, "no deployment named 'nope'", "digits")
    r = swarm.federate("--rounds", "1", "--out", out, "--head", "fc9", *swarm.flags())
    assert_one_line_error(r, "no node named 'fc9'", "fc1, fc2, fc3")
    r = swarm.federate("--rounds", "1", "--out", out, "--head", "fc2", *swarm.flags())
    assert_one_line_error(r, "'fc2' (Gemm) does not feed a graph output", "Relu")
    plain = swarm.nodes.address(PLAIN)  # the entry, and the only node this caller connects to
    r = swarm.federate(
        "--rounds", "1", "--out", out, "--mesh", swarm.mesh, "--discovery", "static", "--peers", plain,
    )  # fmt: skip
    assert_one_line_error(r, "no connected node holds data", f"asked {PLAIN}", "--data")
    assert not Path(out).exists()
    bad = swarm.work / "bad.npz"
    np.savez(bad, x=np.zeros((4, 64), np.float64), y=np.zeros(4, np.int64))
    r = meshai("node", "--name", "x", "--insecure", "--discovery", "none", "--data", str(bad))
    assert_one_line_error(r, "x must be float32")
    np.savez(bad, pixels=np.zeros((4, 64), np.float32))
    r = meshai("node", "--name", "x", "--insecure", "--discovery", "none", "--data", str(bad))
    assert_one_line_error(r, "lacks array 'x'")


def test_a_node_refuses_a_round_it_cannot_do_safely(swarm: Swarm) -> None:
    model = onnx.load(str(swarm.case.model))
    good = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in HEAD}
    head = {"node": "fc3", "weight": HEAD[0], "bias": HEAD[1]}
    base = {"action": "round", "package": swarm.ref, "head": head, "weights": head_to_wire(good), "epochs": 1}
    cases: list[tuple[str, dict[str, Any], str]] = [
        (PLAIN, {}, "holds no data"),
        (DATA_NODES[0], {"package": "digits@9"}, "digits@9 is not in this node's store"),
        (DATA_NODES[0], {"head": {**head, "weight": "fc2.weight"}}, "reads weight 'fc3.weight'"),
        (DATA_NODES[0], {"head": {**head, "node": "relu1"}}, "not a Gemm or MatMul head layer"),
        (
            DATA_NODES[0],
            {"weights": head_to_wire({HEAD[0]: good[HEAD[0]][:5], HEAD[1]: good[HEAD[1]]})},
            "expected float32[10, 128]",
        ),
    ]

    async def go() -> list[ControlReply]:
        async with Mesh(mesh=swarm.mesh, identity=test_secrets().client) as mesh:
            await mesh.wait_for_peers(4, timeout=20)
            return [await mesh.pool.control(n, "federate", {**base, **change}) for n, change, _ in cases]

    for (node, _, words), reply in zip(cases, asyncio.run(go()), strict=True):
        assert not reply.ok and words in reply.body["error"], (node, reply.body)
        assert reply.body["error"].startswith(f"node {node!r}: ")


def test_the_example_runs_as_shipped(tmp_path: Path) -> None:
    """``examples/federated_digits.py --quick``: every site better, nothing but head weights on the wire."""
    from test_examples import run_example

    rep = run_example("federated_digits", tmp_path)
    assert rep["every_node_improved"] and rep["outputs_match"]
    assert rep["wire"]["tensors"] == 0 and rep["wire"]["payload_kinds"] == ["control_reply:federate"]
    assert rep["global"]["after"] > rep["global"]["before"] + 0.05
    assert rep["holdout"]["federated"] > rep["holdout"]["base"] and rep["package"]["ref"] == "digits@1.0.1"
