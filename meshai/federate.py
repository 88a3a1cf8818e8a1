"""Federated personalisation of a deployment's head: FedAvg rounds over the nodes that hold data.

The coordinator (``meshai federate``) never sees a sample.  It reads the deployment's signed package,
finds the model's head (``scheduler.head``), asks every connected node whether it holds data
(``federate`` control, ``info``), and runs R rounds: each data node fine-tunes the current global
head on its own train split (``nodes/federate.py``) and sends back only the new head weights, its
sample counts and its accuracies; the coordinator averages the weights by train sample count
(``scheduler.fedavg.fedavg``).  A last ``evaluate`` measures the final head on every node's test split.
The model with the new head initializers — every other byte as it was — is packaged as the next
version, signed with the fleet key and, with ``rollout``, handed to a staged rollout.

I/O sits at the edges (``open_current``, the control calls, ``write_package``); ``run_rounds`` takes
the control call as a function, so the rounds are data in, data out.  ``pooled_bound`` is for
demonstrations that hold every node's data: the same head fine-tuned centrally on the union of the
nodes' train splits, the upper bound FedAvg approaches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.errors import ConfigError, DeploymentError, PeerError
from scheduler.fedavg import fedavg, finetune_head, head_accuracy, head_from_wire, head_to_wire, local_split
from scheduler.head import Head, find_head, head_weights, with_head

if TYPE_CHECKING:
    import onnx

    from meshai.mesh import Mesh
    from meshai.packages import Manifest, OpenedPackage

__all__ = [
    "Current",
    "FederateConfig",
    "federate",
    "find_deployment",
    "next_version",
    "open_current",
    "pooled_bound",
    "run_rounds",
    "write_package",
]

OP = "federate"
#: Seconds a node may take to answer one round (features are computed on its first round).
ROUND_TIMEOUT_S = 600.0
#: Passes over the pooled data at least, for the upper bound: enough for the head to converge.
POOLED_EPOCHS = 50

Control = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]
"""``control(node, body)``: the body of the node's ``federate`` reply, or MeshaiError naming the node."""
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class FederateConfig:
    """How the rounds run: ``rounds`` of FedAvg, each node fine-tuning ``epochs`` passes at ``lr`` in
    minibatches of ``batch_size``; ``head`` names the head node (None: found automatically); ``seed``
    makes every node's shuffling reproducible."""

    rounds: int = 5
    epochs: int = 2
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0
    head: str | None = None

    def __post_init__(self) -> None:
        for name, lo in (("rounds", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not 0 < self.lr < 1e3:
            raise ConfigError(f"lr must be a number in (0, 1000), got {self.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Current:
    """The deployment's current package, verified and opened in memory: its manifest, its files
    (plaintext), the path of its model, the model (as stored and normalized), its head, and the
    recipients a new version is sealed for (None: not encrypted)."""

    opened: OpenedPackage
    model_path: str
    model: onnx.ModelProto
    normalized: onnx.ModelProto
    head: Head
    recipients: dict[str, bytes] | None

    @property
    def manifest(self) -> Manifest:
        return self.opened.manifest


# ------------------------------------------------------------------------------------ the edges


def _identity_dirs(spec: str) -> list[Path]:
    """Identity folders named by an ``--encrypt-for`` spec that hold a private X25519 key."""
    out: list[Path] = []
    for part in (s.strip() for s in spec.split(",")):
        p = Path(part.split("=", 1)[0] if "=" in part else part)
        if p.is_dir():
            out += (
                [p]
                if (p / "x25519.key").is_file()
                else sorted(c for c in p.iterdir() if (c / "x25519.key").is_file())
            )
    return out


def open_current(
    package: str | Path, signing_key: str | Path, encrypt_for: str | None, head: str | None
) -> Current:
    """Read and verify ``package`` against the public half of ``signing_key`` (the fleet key signs both
    versions), open it — when encrypted, with an identity of ``encrypt_for`` that it was sealed for —
    and find its model's head.  ConfigError/SecurityError name what was wrong."""
    from meshai.models import model_from_bytes
    from meshai.packages import load_identity, load_recipients, load_signing_key, open_package, verify_package
    from scheduler.graph import normalize_model

    try:
        data = Path(package).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read package {str(package)!r}: {exc.strerror or exc}") from None
    pub = load_signing_key(Path(signing_key)).public_key()
    manifest = verify_package(data, pub)
    recipients: dict[str, bytes] | None = None
    recipient: tuple[str, bytes] | None = None
    if manifest.encryption is not None:
        sealed_for = {r.id for r in manifest.encryption.recipients}
        if not encrypt_for:
            raise ConfigError(
                f"package {manifest.ref} is encrypted (for {', '.join(sorted(sealed_for))}): give --encrypt-for "
                "with their identity folders, to open it and to seal the new version for them"
            )
        recipients = load_recipients([s for s in encrypt_for.split(",") if s.strip()])
        for d in _identity_dirs(encrypt_for):
            ident = load_identity(d)
            if ident[0] in sealed_for:
                recipient = ident
                break
        if recipient is None:
            raise ConfigError(
                f"package {manifest.ref} is sealed for {', '.join(sorted(sealed_for))}; no identity folder in "
                "--encrypt-for holds one of their private keys (x25519.key)"
            )
    elif encrypt_for:
        recipients = load_recipients([s for s in encrypt_for.split(",") if s.strip()])
    opened = open_package(data, pub, recipient=recipient)
    if len(manifest.models) != 1:
        raise ConfigError(
            f"package {manifest.ref} holds {len(manifest.models)} ONNX models; federate needs one"
        )
    path = manifest.models[0]
    model = model_from_bytes(opened.files[path], f"package {manifest.ref}")
    normalized = normalize_model(model)
    return Current(opened, path, model, normalized, find_head(normalized, head), recipients)


def next_version(current: str, wanted: str | None = None) -> str:
    """``wanted`` if given (it must be newer than ``current``), else ``current`` with its patch level
    raised by one: ``1`` → ``1.0.1``, ``1.2`` → ``1.2.1``, ``1.2.3`` → ``1.2.4``."""
    from meshai.packages import compare_versions, parse_package_ref

    if wanted is not None:
        parse_package_ref(f"x@{wanted}")  # the version's syntax
        if compare_versions(wanted, current) <= 0:
            raise ConfigError(f"--version {wanted} is not newer than the current version {current}")
        return wanted
    parts = [int(p) for p in current.split(".")]
    parts += [0] * (3 - len(parts))
    parts[-1] += 1
    return ".".join(map(str, parts))


def write_package(
    current: Current,
    weights: Mapping[str, np.ndarray],
    version: str,
    out: str | Path,
    signing_key: str | Path,
) -> dict[str, Any]:
    """The model with the new head initializers, packaged as ``version`` beside the current package's
    other files, sealed for the same recipients, signed with ``signing_key``, written to ``out`` and
    verified again.  Returns ``{"ref", "path", "sha256", "model_sha256"}``."""
    from meshai.packages import build_package, load_signing_key, sign_package, verify_package

    model = with_head(current.model, weights).SerializeToString()
    files = dict(current.opened.files)
    files[current.model_path] = model
    out = Path(out)
    build_package(files, current.manifest.name, version, out, encrypt_for=current.recipients)
    manifest = sign_package(out, Path(signing_key))
    data = out.read_bytes()
    verify_package(data, load_signing_key(Path(signing_key)).public_key())
    return {
        "ref": manifest.ref,
        "path": str(out),
        "sha256": hashlib.sha256(data).hexdigest(),
        "model_sha256": hashlib.sha256(model).hexdigest(),
    }


async def find_deployment(mesh: Mesh, name: str, current: Current) -> dict[str, Any]:
    """The deployment ``name`` as its entry reports it; DeploymentError if no connected node hosts it,
    ConfigError if it runs another model than the package's."""
    dep = await mesh.find(name)
    plan = dep.get("plan", {})
    g = current.normalized.graph
    ins, outs = [i.name for i in g.input], [o.name for o in g.output]
    if list(plan.get("inputs", ins)) != ins or list(plan.get("outputs", outs)) != outs:
        raise ConfigError(
            f"deployment {name!r} runs a model with inputs {plan.get('inputs')} and outputs {plan.get('outputs')}, "
            f"but package {current.manifest.ref} holds one with {ins} and {outs}"
        )
    runs = dep.get("package") or dep.get("version")
    if runs and str(runs) not in (current.manifest.ref, current.manifest.version):
        raise ConfigError(f"deployment {name!r} runs {runs}, not {current.manifest.ref} (--package)")
    return dep


async def data_nodes(mesh: Mesh) -> dict[str, dict[str, Any]]:
    """The connected nodes that hold data, with their sample counts; ConfigError if none does."""
    names = sorted(mesh.peers())

    async def info(node: str) -> dict[str, Any] | None:
        try:
            reply = await mesh.pool.control(node, OP, {"action": "info"}, timeout=30.0)
        except PeerError:
            return None
        return dict(reply.body) if reply.ok and reply.body.get("data") else None

    answers = await asyncio.gather(*(info(n) for n in names))
    found = {n: a for n, a in zip(names, answers, strict=True) if a is not None}
    if not found:
        raise ConfigError(
            f"no connected node holds data (asked {', '.join(names) or 'none'}; start nodes with --data FILE.npz)"
        )
    return found


def _mesh_control(mesh: Mesh) -> Control:
    async def control(node: str, body: dict[str, Any]) -> Mapping[str, Any]:
        reply = await mesh.pool.control(node, OP, body, timeout=ROUND_TIMEOUT_S)
        if not reply.ok:
            raise DeploymentError(str(reply.body.get("error", f"node {node!r} refused {body.get('action')}")))
        return reply.body

    return control


# ------------------------------------------------------------------------------------ the rounds


def _weighted(values: Mapping[str, float], counts: Mapping[str, int]) -> float:
    total = sum(counts[n] for n in values)
    return sum(values[n] * counts[n] for n in values) / total if total else 0.0


def _number(body: Mapping[str, Any], key: str, node: str) -> float:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DeploymentError(f"node {node!r} answered {key!r} = {v!r}, not a number")
    return float(v)


async def run_rounds(
    control: Control,
    nodes: Sequence[str],
    package_ref: str,
    head: Head,
    start: Mapping[str, np.ndarray],
    config: FederateConfig,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``config.rounds`` rounds of FedAvg over ``nodes`` from the head weights ``start``, then one
    evaluation.  Returns the final head and the report: ``rounds`` (per round: seconds, global accuracy
    before, the nodes' local heads after fine-tuning), ``nodes`` (train/test samples, accuracy before
    the first round and of the final head) and ``global`` (sample-weighted over the test splits)."""
    spec = {"node": head.node, "weight": head.weight, "bias": head.bias}
    expect = {n: (tuple(a.shape), a.dtype.name) for n, a in start.items()}
    weights = dict(start)
    rounds: list[dict[str, Any]] = []
    train: dict[str, int] = {}
    test: dict[str, int] = {}
    first: dict[str, float] = {}
    for r in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        wire = head_to_wire(weights)
        bodies = [
            {
                "action": "round",
                "package": package_ref,
                "head": spec,
                "weights": wire,
                "epochs": config.epochs,
                "lr": float(config.lr),
                "batch_size": config.batch_size,
                "seed": (config.seed * 1_000_003 + r * 1009 + i) % 2**63,
            }
            for i, _ in enumerate(nodes)
        ]
        replies = await asyncio.gather(*(control(n, b) for n, b in zip(nodes, bodies, strict=True)))
        updates: list[tuple[dict[str, np.ndarray], int]] = []
        before: dict[str, float] = {}
        local: dict[str, float] = {}
        for n, rep in zip(nodes, replies, strict=True):
            try:
                new = head_from_wire(rep.get("weights"), expect)
            except ConfigError as exc:
                raise DeploymentError(f"node {n!r} sent bad head weights: {exc}") from None
            train[n] = int(_number(rep, "train_samples", n))
            test[n] = int(_number(rep, "test_samples", n))
            before[n], local[n] = _number(rep, "before", n), _number(rep, "after", n)
            updates.append((new, train[n]))
        if r == 1:
            first = dict(before)
        weights = fedavg(updates)
        seconds = time.perf_counter() - t0
        row = {
            "round": r,
            "seconds": round(seconds, 4),
            "global_before": _weighted(before, test),
            "global_local_after": _weighted(local, test),
            "nodes": {n: {"before": before[n], "local_after": local[n]} for n in nodes},
        }
        rounds.append(row)
        if progress is not None:
            progress(
                f"round {r}/{config.rounds}: global accuracy {row['global_before']:.2%} before, nodes' "
                f"fine-tuned heads {row['global_local_after']:.2%}, {seconds:.2f} s"
            )
    wire = head_to_wire(weights)
    final = await asyncio.gather(
        *(
            control(n, {"action": "evaluate", "package": package_ref, "head": spec, "weights": wire})
            for n in nodes
        )
    )
    after = {n: _number(rep, "accuracy", n) for n, rep in zip(nodes, final, strict=True)}
    for i, row in enumerate(rounds):
        nxt = rounds[i + 1]["global_before"] if i + 1 < len(rounds) else _weighted(after, test)
        row["global_after"] = nxt
    report = {
        "rounds": rounds,
        "nodes": {
            n: {"train_samples": train[n], "test_samples": test[n], "before": first[n], "after": after[n]}
            for n in nodes
        },
        "global": {
            "before": _weighted(first, test),
            "after": _weighted(after, test),
            "test_samples": sum(test.values()),
        },
        "seconds_per_round": round(sum(r["seconds"] for r in rounds) / len(rounds), 4),
    }
    if progress is not None:
        g = report["global"]
        progress(f"federated head: global accuracy {g['before']:.2%} → {g['after']:.2%}")
    return weights, report


async def federate(
    mesh: Mesh,
    deployment: str,
    current: Current,
    config: FederateConfig,
    *,
    out: str | Path,
    signing_key: str | Path,
    version: str | None = None,
    rollout: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Federate ``deployment``'s head over the connected data nodes, write the next signed package to
    ``out`` and, with a ``scheduler.rollout.RolloutConfig`` as ``rollout``, start a staged rollout of
    it.  Returns the report (``--json``)."""
    await find_deployment(mesh, deployment, current)
    new_version = next_version(current.manifest.version, version)
    nodes = await data_nodes(mesh)
    if progress is not None:
        progress(
            f"federating {deployment} ({current.manifest.ref}, head {current.head.node}) over "
            f"{len(nodes)} data node(s): {', '.join(nodes)}"
        )
    start = head_weights(current.normalized, current.head)
    weights, report = await run_rounds(
        _mesh_control(mesh), sorted(nodes), current.manifest.ref, current.head, start, config, progress
    )
    package = await asyncio.to_thread(write_package, current, weights, new_version, out, signing_key)
    reply: dict[str, Any] | None = None
    if rollout is not None:
        from meshai.rollout_client import start_rollout

        data = Path(package["path"]).read_bytes()
        reply = dict(await start_rollout(mesh, deployment, (data, package["ref"]), rollout))
    return {
        "deployment": deployment,
        "from": current.manifest.ref,
        "head": current.head.to_dict(),
        "config": config.to_dict(),
        **report,
        "package": package,
        "rollout": reply,
    }


# --------------------------------------------------------------------------- the demonstration's bound


def pooled_bound(
    model: onnx.ModelProto,
    datasets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    config: FederateConfig,
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The upper bound FedAvg is measured against, for a demonstration that holds every node's data
    (``datasets``: node → (x, y), split as the nodes split them): the head fine-tuned centrally on the
    union of the train splits until it has converged — ``rounds × epochs`` passes, at least
    ``POOLED_EPOCHS``.  Returns its accuracy per node (test split), globally (sample-weighted) and on
    ``holdout``, the start head's beside each, and its weights."""
    from nodes.federate import head_features
    from scheduler.graph import build_graph, normalize_model

    norm = normalize_model(model)
    graph = build_graph(norm, "model")
    head = find_head(norm, config.head)
    start = head_weights(norm, head)
    kw: dict[str, Any] = {"names": head.names, "trans_b": head.trans_b}
    feats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for n, (x, y) in datasets.items():
        f = head_features(norm, graph, head, x)
        tr, te = local_split(len(y))
        feats[n] = (f[tr], y[tr], f[te], y[te])
    fx = np.concatenate([v[0] for v in feats.values()])
    fy = np.concatenate([v[1] for v in feats.values()])
    pooled = finetune_head(
        start,
        fx,
        fy,
        epochs=max(config.rounds * config.epochs, POOLED_EPOCHS),
        lr=config.lr,
        seed=config.seed,
        batch_size=config.batch_size,
        **kw,
    )
    counts = {n: len(v[3]) for n, v in feats.items()}
    per_node = {n: head_accuracy(pooled, v[2], v[3], **kw) for n, v in feats.items()}
    base = {n: head_accuracy(start, v[2], v[3], **kw) for n, v in feats.items()}
    rep: dict[str, Any] = {
        "nodes": {n: {"base": base[n], "pooled": per_node[n]} for n in feats},
        "global": {"base": _weighted(base, counts), "pooled": _weighted(per_node, counts)},
        "train_samples": len(fy),
        "weights": pooled,
    }
    if holdout is not None:
        hf = head_features(norm, graph, head, holdout[0])
        rep["holdout"] = {
            "base": head_accuracy(start, hf, holdout[1], **kw),
            "pooled": head_accuracy(pooled, hf, holdout[1], **kw),
            "samples": len(holdout[1]),
        }
    return rep
