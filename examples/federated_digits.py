"""Federated personalisation: each site tunes the digits classifier's head on its own data; no image leaves it.

Three sites (real node processes: mDNS, mutual TLS, the model as a fleet-signed package encrypted for
them) each hold label-skewed digits — site 0 mostly 0–3, site 1 mostly 4–6, site 2 mostly 7–9 — that
never leave the site.  The deployed *base* model was trained on a small, skewed set, so every site
has classes it gets wrong.  ``meshai.federate`` runs FedAvg rounds of the head (its last Gemm): each
site fine-tunes the head on its own train split and sends back only the new weights; the averaged head
becomes the next package version, signed with the fleet key.  Reported per site and globally: accuracy
before, after, and the pooled upper bound — the same head trained centrally on the union of the sites'
data, which only this script can compute because it made all the data.  Each site's ``--audit-log``
proves what went on the wire during federation: no tensor, only head-sized weight payloads.

    .venv/bin/python examples/federated_digits.py [--nodes N] [--rounds R] [--epochs E] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# examples/_common.py: the plumbing the examples share (node processes, command line, PNG, printing)
from _common import add_output_flags, run_and_report, verdict

from meshai.argtypes import positive_int
from meshai.digits import federated_digits
from meshai.federate import FederateConfig, federate, open_current, pooled_bound
from meshai.mesh import Mesh
from meshai.packages import load_identity, open_package
from meshai.planning import load_for_planning
from meshai.sim import MeshSecrets, NodeProcesses
from meshai.tables import format_table
from nodes.executor import run_whole

DEPLOYMENT = "digits"


class DataNodes(NodeProcesses):
    """Node processes that each hold their own ``--data`` and keep an ``--audit-log``."""

    def __init__(self, data: dict[str, Path], audit: dict[str, Path], **kw: Any) -> None:
        super().__init__(list(data), ["cpu"] * len(data), **kw)
        self.data, self.audit = data, audit

    def node_args(self, name: str, profile: str) -> list[str]:
        extra = ["--data", str(self.data[name]), "--audit-log", str(self.audit[name])]
        return super().node_args(name, profile) + extra


def holdout_accuracy(model: onnx.ModelProto | bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Share of the held-out images the whole model gets right (onnxruntime, here)."""
    logits = run_whole(model, {"pixels": x})["logits"]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def wire_audit(audit: dict[str, Path], t0: float, t1: float) -> dict[str, Any]:
    """What the sites sent while federation ran (their ``--audit-log`` lines between t0 and t1)."""
    window = [
        e
        for path in audit.values()
        for e in map(json.loads, path.read_text().splitlines())
        if t0 <= e["t"] <= t1
    ]
    payloads = [n for e in window for n in e["bytes"].values()]
    return {
        "messages": len(window),
        "tensors": sum(len(e["tensors"]) for e in window),
        "infer_or_result": sum(e["kind"] in ("infer", "result") for e in window),
        "byte_payloads": len(payloads),
        "max_payload_bytes": max(payloads, default=0),
        "payload_kinds": sorted({f"{e['kind']}:{e.get('op', '')}" for e in window if e["bytes"]}),
    }


async def run(nodes: int, rounds: int, epochs: int, lr: float, samples: int, out: Path) -> dict[str, Any]:
    """Make the sites' data, start them, deploy the base model, federate its head, measure."""
    config = FederateConfig(rounds=rounds, epochs=epochs, lr=lr)
    case = federated_digits(out / "case", nodes)
    names = [f"site{i}" for i in range(nodes)]
    with np.load(case.holdout) as z:
        hx, hy = z["x"], z["y"]
    mesh_id = secrets.token_hex(4)  # a private mDNS service type: other swarms stay invisible
    with tempfile.TemporaryDirectory(prefix="meshai-example-") as work:
        sec = MeshSecrets(Path(work))  # throwaway mesh CA, site identities, fleet signing key
        for n in names:
            sec.issue(n)
        data, ref = sec.package(case.model, DEPLOYMENT)
        current_pkg = out / f"{DEPLOYMENT}-1.pkg"
        current_pkg.write_bytes(data)
        audit = {n: out / f"{n}.audit.jsonl" for n in names}
        for p in audit.values():
            p.unlink(missing_ok=True)
        procs = DataNodes(
            dict(zip(names, case.nodes, strict=True)), audit, mesh=mesh_id, pace=False,
            extra=sec.node_args(), identities=sec.identities,
        )  # fmt: skip
        with procs:
            async with Mesh(mesh=mesh_id, identity=sec.client) as mesh:
                await mesh.wait_for_peers(nodes, timeout=30)
                loaded = load_for_planning(str(case.model))
                plan, _ = mesh.plan(loaded, stages=min(2, nodes))
                await mesh.deploy_named(DEPLOYMENT, plan, loaded, package=(data, ref))
                dep = await mesh.attach(DEPLOYMENT)  # the served base model, on held-out images
                served = [await dep.infer({"pixels": hx[i : i + 1]}) for i in range(samples)]
                served_acc = float(np.mean([np.argmax(o["logits"]) == hy[i] for i, o in enumerate(served)]))
                current = open_current(current_pkg, sec.key, str(sec.identities), config.head)

                def progress(line: str) -> None:
                    print(f"federated_digits: {line}", file=sys.stderr, flush=True)

                t0 = time.time()
                rep = await federate(
                    mesh, DEPLOYMENT, current, config, out=out / f"{DEPLOYMENT}-next.pkg",
                    signing_key=sec.key, progress=progress,
                )  # fmt: skip
                t1 = time.time()
        opened = open_package(
            Path(rep["package"]["path"]).read_bytes(),
            sec.pub,
            recipient=load_identity(sec.identities / names[0]),
        )
        new_model = onnx.load_from_string(opened.model())
    datasets = {}
    for n, path in zip(names, case.nodes, strict=True):
        with np.load(path) as z:
            datasets[n] = (z["x"], z["y"])
    bound = pooled_bound(onnx.load(str(case.model)), datasets, config, holdout=(hx, hy))
    wire = wire_audit(audit, t0, t1)
    improved = all(v["after"] > v["before"] for v in rep["nodes"].values())
    clean = (
        wire["tensors"] == 0
        and wire["infer_or_result"] == 0
        and wire["payload_kinds"] == ["control_reply:federate"]
    )
    return {
        "nodes": {
            n: {**v, "pooled": bound["nodes"][n]["pooled"], "class_counts": list(c)}
            for (n, v), c in zip(rep["nodes"].items(), case.node_classes, strict=True)
        },
        "global": {**rep["global"], "pooled": bound["global"]["pooled"]},
        "holdout": {
            "samples": len(hy),
            "base": holdout_accuracy(onnx.load(str(case.model)), hx, hy),
            "base_served": served_acc,
            "served_samples": samples,
            "federated": holdout_accuracy(new_model, hx, hy),
            "pooled": bound["holdout"]["pooled"],
        },
        "rounds": rep["rounds"],
        "seconds_per_round": rep["seconds_per_round"],
        "federate_s": round(t1 - t0, 3),
        "package": {"from": rep["from"], **rep["package"]},
        "head": rep["head"],
        "config": rep["config"],
        "wire": wire,
        "audit_logs": {n: str(p) for n, p in audit.items()},
        "every_node_improved": improved,
        "outputs_match": improved and clean,  # the example's verdict: better everywhere, nothing leaked
    }


def report_table(rep: dict[str, Any]) -> str:
    """Accuracy per site and globally (before / after / pooled), then the wire and the package."""

    def pct(v: float) -> str:
        return f"{v * 100:.1f} %"

    rows: list[list[object]] = [
        [n, v["train_samples"], v["test_samples"], pct(v["before"]), pct(v["after"]), pct(v["pooled"])]
        for n, v in rep["nodes"].items()
    ]
    g, h = rep["global"], rep["holdout"]
    rows.append(["global", "", g["test_samples"], pct(g["before"]), pct(g["after"]), pct(g["pooled"])])
    rows.append(["held-out", "", h["samples"], pct(h["base"]), pct(h["federated"]), pct(h["pooled"])])
    table = format_table(
        ["site", "train", "test", "before", "after FedAvg", "pooled bound"], rows, right=(1, 2, 3, 4, 5)
    )
    w, p = rep["wire"], rep["package"]
    facts = [
        ["rounds", f"{len(rep['rounds'])} × {rep['config']['epochs']} local epochs, {rep['seconds_per_round']:.3f} s per round"],
        ["served base model", f"{pct(h['base_served'])} on {h['served_samples']} held-out images through the swarm"],
        [
            "on the wire while federating",
            f"{w['messages']} messages, {w['tensors']} tensors, {w['byte_payloads']} byte payloads "
            f"(largest {w['max_payload_bytes']} B: head weights), {w['infer_or_result']} Infer/Result",
        ],
        ["new package", f"{p['ref']} signed, {p['path']}"],
        ["verdict", f"every site improved: {'yes' if rep['every_node_improved'] else 'NO'}; "
         f"{verdict(rep['outputs_match'])}"],
    ]  # fmt: skip
    return table + "\n\n" + format_table(["federated personalisation", "result"], facts)


def plot(rep: dict[str, Any], plt: Any) -> Any:
    """Grouped bars per site and globally: before, after FedAvg, pooled bound."""
    labels = [*rep["nodes"], "global"]
    rows = [*rep["nodes"].values(), rep["global"]]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for k, (key, name, color) in enumerate(
        (
            ("before", "base model", "#8C8C8C"),
            ("after", "after FedAvg", "#4C72B0"),
            ("pooled", "pooled bound", "#DD8452"),
        )
    ):
        ax.bar(x + (k - 1) * 0.27, [r[key] * 100 for r in rows], 0.27, label=name, color=color)
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy % (each site's own test split)")
    ax.set_ylim(max(0.0, min(r["before"] for r in rows) * 100 - 10), 100)
    ax.set_title(f"federated head personalisation: {len(rep['rounds'])} FedAvg rounds")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=positive_int, default=3, help="sites, 1-10 (default 3)")
    p.add_argument("--rounds", type=positive_int, default=5, help="FedAvg rounds (default 5)")
    p.add_argument("--epochs", type=positive_int, default=2, help="local epochs per round (default 2)")
    p.add_argument("--lr", type=float, default=0.1, help="local learning rate (default 0.1)")
    p.add_argument(
        "--samples", type=positive_int, default=100, help="held-out images served before (default 100)"
    )
    add_output_flags(p, "federated_digits", quick="3 sites, 3 rounds, 30 images served")
    args = p.parse_args(argv)
    nodes, rounds, samples = (3, 3, 30) if args.quick else (args.nodes, args.rounds, args.samples)
    work = run(nodes, rounds, args.epochs, args.lr, samples, args.out)
    return run_and_report("federated_digits", args, work, plot, report_table)


if __name__ == "__main__":
    sys.exit(main())
