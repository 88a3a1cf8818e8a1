"""The ``meshai`` command line: thin over the library (composition layer).

Every reporting command takes ``--json``; errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from meshai.argtypes import positive_int as _positive_int
from meshai.errors import ConfigError, MeshaiError

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"meshai: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------- plan


def _plan_table(plan: Any) -> str:
    from meshai.tables import format_table, human_bytes

    rows = []
    for s in plan.stages:
        ops = f"{len(s.ops)} ({s.ops[0]} … {s.ops[-1]})" if len(s.ops) > 1 else f"1 ({s.ops[0]})"
        rows.append(
            [s.id, s.node, s.accelerator, s.precision, ops, f"{s.predicted_ms:.3f}", human_bytes(s.bytes_out)]
        )
    table = format_table(
        ["stage", "node", "accelerator", "precision", "ops", "predicted ms", "bytes out"],
        rows,
        right=(0, 5, 6),
    )
    p = plan.predicted
    summary = (
        f"objective {plan.objective}: latency {p.latency_ms:.3f} ms, bottleneck {p.bottleneck_ms:.3f} ms "
        f"(≤ {1e3 / p.bottleneck_ms if p.bottleneck_ms else float('inf'):.1f} req/s), "
        f"transfer {human_bytes(p.transfer_bytes)}, energy {p.energy_mj:.2f} mJ per request"
    )
    return f"{table}\n{summary}"


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a model over device profiles offline."""
    from meshai.plan import Constraints
    from meshai.planning import check_plan, load_for_planning, make_plan, parse_pins, swarm_from_flags

    loaded = load_for_planning(args.model, batch=args.batch)
    nodes = swarm_from_flags(args.profiles, args.profiles_file)
    constraints = Constraints(
        objective=args.objective,
        stages=args.stages,
        pins=parse_pins(args.pin or []),
        max_accuracy_drop=args.max_accuracy_drop,
    )
    loaded, quant = _quantization(args, loaded)
    if quant is not None:
        from meshai.planning import plan_measured, quant_report

        plan = plan_measured(loaded, nodes, constraints, quant)
    else:
        plan = make_plan(loaded, nodes, constraints)
    out = plan.to_dict()
    if quant is not None:
        out["quantization"] = quant_report(quant)
    if args.check:
        from meshai.tensors import random_inputs

        inputs = random_inputs(loaded.model, batch=args.batch, seed=args.seed)
        out["max_abs_diff"] = check_plan(loaded, plan, inputs)
    if args.json:
        _emit_json(out)
    else:
        print(
            f"model {loaded.name}: {len(loaded.graph.ops)} compute ops, {loaded.graph.total_flops / 1e9:.2f} GFLOP"
        )
        print(_plan_table(plan))
        for note in plan.notes:
            print(f"note: {note}")
        if args.check:
            print(f"check: stages run in order vs whole model, max abs diff {out['max_abs_diff']:.3g}")
    return 0


# ---------------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark and print its figures."""
    from meshai import bench

    if args.what == "plan":
        res = bench.bench_plan(cases=args.cases, repeats=args.repeats)
        if args.json:
            _emit_json(res)
        else:
            print(
                f"planning {res['model']} ({res['ops']} ops) on {len(res['devices'])} devices "
                f"({','.join(res['devices'])}): median {res['plan_ms']:.1f} ms "
                f"(latency {res['plan_ms_by_objective']['latency']:.1f} ms, "
                f"throughput {res['plan_ms_by_objective']['throughput']:.1f} ms)"
            )
            print(
                f"quality vs brute force over {res['cases']} random DAGs: worst ratio {res['worst_ratio']:.4f}, "
                f"mean {res['mean_ratio']:.6f}, within 2%: {res['within_2pct']}/{res['cases']}"
            )
        return 0
    if args.what == "transport":
        sizes = bench.parse_sizes(args.sizes)
        modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.tls]
        parts = [bench.bench_transport(sizes, mib=args.mib, repeats=args.repeats, tls=tls) for tls in modes]
        res = {**parts[0], "rows": [row for part in parts for row in part["rows"]]}
        if args.json:
            _emit_json(res)
        else:
            print(bench.transport_table(res))
        return 0
    if args.what == "pipeline":
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        res = bench.bench_pipeline(
            models, requests=args.requests, window=args.window, warmup=args.warmup, rounds=args.rounds
        )
        if args.json:
            _emit_json(res)
        else:
            print(bench.pipeline_table(res))
        return 0
    if args.what == "ray":
        model = args.models.split(",")[0].strip() if args.models != "squeezenet,resnet50" else "squeezenet"
        res = bench.bench_ray(model, requests=args.requests or 200, window=args.window)
        if args.json:
            _emit_json(res)
        else:
            from meshai.tables import format_table

            rows = [
                [k, res[k]["throughput_rps"], res[k]["p50_ms"], res[k]["p95_ms"]] for k in ("meshai", "ray")
            ]
            print(format_table(["pipeline", "req/s", "p50 ms", "p95 ms"], rows, right=(1, 2, 3)))
            b = res["batch"]
            print(
                f"{res['model']}, {res['stages']} stages, {res['requests']} requests, window {res['window']}: "
                f"throughput meshai/ray {res['throughput_ratio']:.2f}, p50 meshai/ray {res['p50_ratio']:.2f}; "
                f"batch on Ray {b['ray_rps']:.1f} req/s vs one local process {b['local_rps']:.1f} ({b['ratio']:.2f}x)"
            )
        return 0
    if args.what == "recovery":
        from meshai.bench_recovery import bench_recovery, recovery_table

        res = bench_recovery(
            kills=args.kills, model=args.models.split(",")[0].strip(), requests=args.requests or 120
        )
        if args.json:
            _emit_json(res)
        else:
            print(recovery_table(res))
        return 0
    if args.what == "runtimes":
        from meshai.bench_runtimes import CNN, bench_runtimes, runtimes_table

        names = (
            (CNN, "squeezenet")
            if args.models == "squeezenet,resnet50"
            else tuple(m.strip() for m in args.models.split(",") if m.strip())
        )
        res = bench_runtimes(names, runs=10 * args.repeats)
        if args.json:
            _emit_json(res)
        else:
            print(runtimes_table(res))
        return 0
    if args.what == "quantize":
        res = bench.bench_quantize()
        if args.json:
            _emit_json(res)
        else:
            print(bench.quantize_table(res))
        return 0
    raise ConfigError(f"unknown benchmark {args.what!r}")


# ------------------------------------------------------------------------------------- profiles


def cmd_profiles(args: argparse.Namespace) -> int:
    """List the built-in device profiles (and a user file's)."""
    from meshai.capabilities import BUILTIN_PROFILES, load_profiles
    from meshai.tables import format_table, human_bytes

    table = dict(BUILTIN_PROFILES)
    if args.profiles_file:
        table.update(load_profiles(args.profiles_file))
    if args.json:
        _emit_json({name: p.to_dict() for name, p in table.items()})
        return 0
    rows = []
    for name, p in table.items():
        speeds = ", ".join(f"{k} {v / 1e9:g}" for k, v in p.flops.items())
        ops = "all" if isinstance(p.ops, str) else f"{len(p.ops)} types"
        rows.append([name, speeds, human_bytes(p.memory_bytes), ops, f"{p.active_w:g}", p.description])
    print(format_table(["profile", "GFLOP/s", "memory", "ops", "W", "what"], rows))
    return 0


# ------------------------------------------------------------------------------------ the swarm


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


def _add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--interface",
        action="append",
        metavar="ADDR",
        help="IPv4 address of the interface mDNS uses (repeatable; default 127.0.0.1)",
    )
    p.add_argument("--discovery", choices=["mdns", "static"], default="mdns")
    p.add_argument("--peers", default="", help="static peer list host:port,… (with --discovery static)")
    p.add_argument("--mesh", default="", help="mesh id (isolates swarms that share a network)")
    p.add_argument("--wait", type=_positive_int, default=None, metavar="N", help="wait for N nodes")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for nodes")
    _add_identity_flags(p)
    p.add_argument(
        "--revocations", metavar="FILE", help="a newer revoked.json (e.g. the CA's) to hand to every node"
    )


def _add_identity_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--identity", metavar="DIR", help="identity from 'meshai ca issue' (default $MESHAI_IDENTITY)"
    )
    p.add_argument("--insecure", action="store_true", help="no TLS, no membership checks (debugging only)")


def _warn_insecure(args: argparse.Namespace) -> None:
    import os

    if args.insecure or (
        not getattr(args, "identity", None)
        and os.environ.get("MESHAI_INSECURE") == "1"
        and not os.environ.get("MESHAI_IDENTITY")
    ):
        sys.stderr.write(
            "meshai: warning: insecure mode: no TLS and no membership checks; anyone on this network "
            "can join the mesh, read tensors and send models\n"
        )


def _mesh(args: argparse.Namespace) -> Any:
    from meshai.mesh import Mesh

    _warn_insecure(args)
    peers = [p for p in args.peers.split(",") if p] if args.peers else []
    return Mesh(
        interfaces=tuple(args.interface or ["127.0.0.1"]),
        discovery=args.discovery,
        peers=peers,
        mesh=args.mesh,
        identity=args.identity,
        insecure=args.insecure,
        revocations=args.revocations,
    )


async def _gather_peers(mesh: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Wait for --wait N nodes (within --timeout), or take whatever shows up within --timeout (2 s)."""
    import asyncio

    from meshai.errors import PeerError

    if args.wait:
        return dict(await mesh.wait_for_peers(args.wait, timeout=args.timeout or 10.0))
    with contextlib.suppress(PeerError):
        await mesh.wait_for_peers(1, timeout=args.timeout or 2.0)
    await asyncio.sleep(0.3)  # let the rest of the burst of announcements arrive
    with contextlib.suppress(PeerError):
        await mesh.wait_for_peers(len(mesh._discovery.peers()) or 1, timeout=1.0)
    peers = dict(mesh.peers())
    if not peers:
        raise PeerError(f"no meshai nodes found within {args.timeout or 2.0:g} s")
    return peers


def _has_provider_library(kind: str = "cuda") -> bool:
    """Whether onnxruntime's ``kind`` (cuda, tensorrt) provider library is installed (without importing
    onnxruntime: fast start)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(d) / "capi" / f"libonnxruntime_providers_{kind}.so").exists()
        for d in spec.submodule_search_locations
    )


def _has_cuda_provider() -> bool:
    """Whether onnxruntime's CUDA provider library is installed."""
    return _has_provider_library("cuda")


def _gpu_providers() -> tuple[str, ...]:
    """A gpu node's onnxruntime providers, fastest first: TensorRT where its library is installed, CUDA,
    then CPU for what neither runs (the session skips any this host cannot load)."""
    trt = ("TensorrtExecutionProvider",) if _has_provider_library("tensorrt") else ()
    return (*trt, "CUDAExecutionProvider", "CPUExecutionProvider")


def _declared_link(cap: Any, spec: str) -> Any:
    """``cap`` advertising the link ``spec`` declares: its rate as bandwidth, its delay as latency."""
    import dataclasses

    from meshai.capabilities import Link
    from meshai.linkem import parse_link

    link = parse_link(spec)
    old = cap.profile.link
    new = Link(
        bandwidth_bps=link.rate_Bps or old.bandwidth_bps,
        latency_s=link.delay_s if link.delay_s or link.jitter_s else old.latency_s,
        joules_per_byte=old.joules_per_byte,
    )
    return dataclasses.replace(cap, profile=dataclasses.replace(cap.profile, link=new))


def cmd_node(args: argparse.Namespace) -> int:
    """Run a node agent until SIGTERM/SIGINT."""
    import asyncio
    import os
    import signal

    from meshai.capabilities import NodeCapability, load_profiles, resolve_profiles
    from nodes.agent import NodeAgent, NodeConfig

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"bad --listen {args.listen!r}: expected host:port (port 0 picks one)")
    if args.data:  # checked now, so that a bad file stops the node with one line, not a later refusal
        from nodes.federate import load_node_data

        load_node_data(args.data)
    physical = {"cpu"} | ({"gpu"} if _has_cuda_provider() else set())
    if args.profile == "host":  # this machine as it is: cores, memory, providers, measured speed
        from meshai.capabilities import detect_host

        cap = detect_host(args.name)
        profile = cap.profile
        providers = cap.providers
    else:
        extra = load_profiles(args.profiles_file) if args.profiles_file else None
        profile = resolve_profiles([args.profile], extra)[0]
        gpu = profile.kind == "gpu" and "gpu" in physical
        providers = _gpu_providers() if gpu else ("CPUExecutionProvider",)
        cap = NodeCapability(args.name, profile, emulated=profile.kind not in physical, providers=providers)
    if args.declare_link:
        cap = _declared_link(cap, args.declare_link)
    from nodes.executors import check_runtimes, detect_runtimes

    runtimes = check_runtimes(args.runtime.split(",")) if args.runtime else detect_runtimes()
    cap = dataclasses.replace(cap, runtimes=runtimes)
    peers = tuple(p for p in args.peers.split(",") if p) if args.peers else ()
    if args.identity and args.insecure:
        raise ConfigError("give either --identity or --insecure, not both")
    identity = args.identity or (None if args.insecure else os.environ.get("MESHAI_IDENTITY")) or None
    if not identity and not args.insecure and os.environ.get("MESHAI_INSECURE") != "1":
        raise ConfigError(
            "a node needs --identity DIR (from 'meshai ca issue'; mutual TLS) or --insecure (debugging only)"
        )
    _warn_insecure(args)
    if args.link:
        from meshai import linkem

        linkem.install(linkem.parse_link(args.link), args.link_seed)
        linkem.install_signal_handlers()
    import logging

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s {args.name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    cfg = NodeConfig(
        name=args.name,
        capability=cap,
        host=host,
        port=int(port),
        interfaces=tuple(args.interface or [host if host != "0.0.0.0" else "127.0.0.1"]),
        discovery=args.discovery,
        peers=peers,
        mesh=args.mesh,
        pace=args.pace,
        threads=args.threads,
        providers=providers,
        identity=identity,
        trusted_key=args.trusted_key,
        store=args.store,
        metrics_port=args.metrics_port,
        mqtt=args.mqtt,
        site=args.site,
        telemetry_interval=args.telemetry_interval,
        entry_only=args.entry_only,
        data=args.data,
        audit_log=args.audit_log,
    )

    async def serve() -> None:
        async with NodeAgent(cfg) as agent:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, agent.stop)
            ready = {
                "event": "ready",
                "name": agent.name,
                "address": agent.address,
                "pid": os.getpid(),
                "profile": profile.kind,
                "emulated": cap.emulated,
                "metrics": agent.metrics_address,
            }
            sys.stdout.write(
                json.dumps(ready) + "\n"
                if args.json
                else f"node {agent.name} ({profile.kind}{', emulated' if cap.emulated else ''}) "
                f"serving on {agent.address}\n"
            )
            sys.stdout.flush()
            await agent.serve_forever()

    _run(serve())
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    """List the nodes this host can see, with their capabilities."""
    from meshai.tables import format_table, human_bytes

    async def go() -> tuple[dict[str, Any], list[dict[str, str]]]:
        from meshai.errors import PeerError

        async with _mesh(args) as mesh:
            try:
                peers = await _gather_peers(mesh, args)
            except PeerError:
                if not mesh.untrusted:
                    raise
                peers = dict(mesh.peers())
            return {n: p.to_dict() for n, p in sorted(peers.items())}, sorted(
                mesh.untrusted.values(), key=lambda u: u["name"]
            )

    peers, untrusted = _run(go())
    if args.json:
        _emit_json({"peers": list(peers.values()), "untrusted": untrusted})
        return 0
    for u in untrusted:
        sys.stderr.write(f"untrusted: {u['name']} at {u['address']}: {u['reason']}\n")
    rows = []
    for p in peers.values():
        prof = p["capabilities"]["profile"]
        emulated = "yes" if p["capabilities"]["emulated"] else "no"
        memory = human_bytes(prof["memory_bytes"])
        rows.append([p["name"], p["address"], prof["kind"], ",".join(prof["flops"]), memory, emulated])
    print(format_table(["node", "address", "accelerator", "precisions", "memory", "emulated"], rows))
    return 0


def _constraints_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    p.add_argument("--stages", type=_positive_int)
    p.add_argument("--pin", action="append", metavar="INPUT=NODE")


def _quant_flags(p: argparse.ArgumentParser) -> None:
    """Flags of precision chosen with placement (an int8 variant under an accuracy budget)."""
    p.add_argument(
        "--calibration",
        metavar="DATA",
        help="int8 variant: calibration samples (npz or a directory of npz) or a calibration .json",
    )
    p.add_argument("--eval", metavar="DATA", help="samples to measure int8's accuracy cost on")
    p.add_argument("--labels", metavar="LABELS", help="labels npz of --eval (accuracy instead of agreement)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="PTS",
        help="accuracy budget of int8 stages in points (default 1.0; 0 rules int8 out)",
    )
    p.add_argument("--per-channel", action="store_true", help="per-channel int8 weights")


def _quantization(args: argparse.Namespace, loaded: Any) -> tuple[Any, Any]:
    """``--calibration …``: the model carrying its calibration and the measured int8 figures."""
    if not getattr(args, "calibration", None):
        for flag in ("eval", "labels"):
            if getattr(args, flag, None):
                raise ConfigError(f"--{flag} applies only with --calibration")
        return loaded, None
    from meshai.planning import prepare_quantization

    return prepare_quantization(loaded, args.calibration, args.eval, args.labels, args.per_channel)


def _package(args: argparse.Namespace, loaded: Any) -> tuple[bytes, str] | None:
    """``--package PKG``: the signed package to deploy from; it must hold the model being planned."""
    if not getattr(args, "package", None):
        return None
    from meshai.packages import read_signed

    data, manifest = read_signed(args.package)
    if not any(f.sha256 == loaded.source_sha256 for f in manifest.files):
        raise ConfigError(f"package {args.package!r} ({manifest.ref}) does not contain model {loaded.name!r}")
    return data, manifest.ref


def _plan_with_package(
    args: argparse.Namespace, mesh: Any, loaded: Any
) -> tuple[Any, tuple[bytes, str] | None]:
    """``meshai run`` / ``deploy``: the plan over the connected nodes (knowing which stages the
    ``--package`` carries converted for runtime-only nodes) and the package."""
    from meshai.planning import parse_pins

    package = _package(args, loaded)
    arts = _package_artifacts(package)
    plan, _ = mesh.plan(
        loaded,
        objective=args.objective,
        stages=args.stages,
        pins=parse_pins(args.pin or []),
        artifacts=arts,
        artifacts_only=arts is not None,
    )
    return plan, package


def _package_artifacts(package: tuple[bytes, str] | None) -> Any:
    """The converted stages a plain (unencrypted) package says it carries, as planner data (None when it
    carries none, or is encrypted: then the nodes alone know, and refuse a cut they have no artifact for)."""
    if package is None:
        return None
    from meshai.packages import peek_file
    from nodes.executors import RUNTIMES_FILE, planner_artifacts

    raw = peek_file(package[0], RUNTIMES_FILE)
    return None if raw is None else planner_artifacts(json.loads(raw))


def cmd_run(args: argparse.Namespace) -> int:
    """Plan over the discovered swarm, deploy, run the requests in --inputs, report."""
    from meshai.planning import load_for_planning
    from meshai.tensors import load_npz, request_slices, save_npz, stack_requests

    loaded = load_for_planning(args.model)
    reqs = request_slices(load_npz(args.inputs, list(loaded.graph.inputs)))

    async def go() -> dict[str, Any]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            plan, package = _plan_with_package(args, mesh, loaded)
            outs: list[Any] = []
            async with mesh.deploy(plan, loaded, package=package) as pipe:
                async for o in pipe.stream(reqs):
                    outs.append(o)
                st = pipe.stats
            ok = [o for o in outs if not isinstance(o, BaseException)]
            errs = [o for o in outs if isinstance(o, BaseException)]
            if args.outputs and ok:
                save_npz(args.outputs, stack_requests(ok))
            rep: dict[str, Any] = {
                "plan": plan.to_dict(),
                "requests": len(reqs),
                "ok": len(ok),
                "errors": len(errs),
                "latency_ms": st.latency_ms(),
                "throughput_rps": st.throughput_rps(),
                "outputs": args.outputs or "",
            }
            if errs:
                rep["first_error"] = str(errs[0])
            return rep

    rep = _run(go())
    if args.json:
        _emit_json(rep)
    else:
        from meshai.plan import Plan

        print(_plan_table(Plan.from_dict(rep["plan"])))
        print(
            f"{rep['ok']} ok, {rep['errors']} errors of {rep['requests']}; latency p50 {rep['latency_ms']['p50']} ms"
        )
    return 0 if rep["errors"] == 0 else EXIT_ERROR


def cmd_deploy(args: argparse.Namespace) -> int:
    """Plan, deploy and leave serving under a name."""
    from meshai.planning import load_for_planning

    loaded = load_for_planning(args.model)

    async def go() -> dict[str, Any]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            plan, package = _plan_with_package(args, mesh, loaded)
            return dict(await mesh.deploy_named(args.name, plan, loaded, entry=args.entry, package=package))

    rep = _run(go())
    if args.json:
        _emit_json(rep)
    else:
        from meshai.plan import Plan

        print(f"deployment {rep['name']} serving; entry on {rep['entry']}")
        print(_plan_table(Plan.from_dict(rep["plan"])))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Run the requests of an npz through a long-lived deployment."""
    import time

    from meshai.pipeline import percentiles_ms
    from meshai.planning import read_labels
    from meshai.tensors import load_npz, request_slices, save_npz, stack_requests

    async def go() -> dict[str, Any]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            dep = await mesh.attach(args.name)
            reqs = request_slices(load_npz(args.inputs, list(dep.plan.inputs)))
            labels = read_labels(args.labels, len(reqs)) if args.labels else None
            outs = []
            lat = []
            for i, r in enumerate(reqs):
                t0 = time.perf_counter()
                label = None if labels is None else int(labels[i])
                outs.append(await dep.infer(r, key=args.key, label=label))
                lat.append(time.perf_counter() - t0)
            if args.outputs:
                save_npz(args.outputs, stack_requests(outs))
            return {
                "name": args.name,
                "entry": dep.entry,
                "requests": len(reqs),
                "ok": len(outs),
                "errors": 0,
                "latency_ms": percentiles_ms(lat),
                "outputs": args.outputs or "",
            }

    rep = _run(go())
    if args.json:
        _emit_json(rep)
    else:
        print(
            f"{rep['ok']} requests through {rep['name']} (entry {rep['entry']}); p50 {rep['latency_ms']['p50']} ms"
        )
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    """List long-lived deployments on the mesh."""

    async def go() -> list[dict[str, Any]]:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            return list(await mesh.deployments())

    deps = _run(go())
    if args.json:
        _emit_json({"deployments": deps})
    else:
        from meshai.tables import format_table

        rows = [
            [
                d["name"],
                d["entry"],
                " → ".join(s["node"] for s in d["plan"]["stages"]),
                d["served"],
                d["errors"],
            ]
            for d in deps
        ]
        print(format_table(["name", "entry", "stages", "served", "errors"], rows))
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    """Release a long-lived deployment."""

    async def go() -> None:
        async with _mesh(args) as mesh:
            await _gather_peers(mesh, args)
            await mesh.undeploy(args.name)

    _run(go())
    if args.json:
        _emit_json({"name": args.name, "undeployed": True})
    else:
        print(f"deployment {args.name} released")
    return 0


def _fault_flags(p: argparse.ArgumentParser) -> None:
    """Faults, the SLO loop and emulated networks (``meshai sim``)."""
    g = p.add_argument_group("failures and networks (NODE: a name, or stage:K of the first plan)")
    g.add_argument(
        "--kill", action="append", default=[], metavar="NODE@N", help="SIGKILL NODE after N results"
    )
    g.add_argument(
        "--pause", action="append", default=[], metavar="NODE@N:S", help="SIGSTOP NODE for S seconds"
    )
    g.add_argument(
        "--partition",
        action="append",
        default=[],
        metavar="NODE@N:S",
        help="cut NODE off the network for S s",
    )
    g.add_argument(
        "--slow", action="append", default=[], metavar="NODE@N:F", help="a paced NODE becomes F times slower"
    )
    g.add_argument("--slo", type=float, metavar="MS", help="replan when p95 latency stays above MS")
    g.add_argument(
        "--no-recover", action="store_true", help="fail requests a lost node touched; no replanning"
    )
    g.add_argument("--netns", action="store_true", help="each node in its own network namespace (root)")
    g.add_argument(
        "--link", metavar="SPEC", help='shape links, e.g. "delay=20ms,jitter=5ms,rate=100mbit,loss=1%%"'
    )
    r = p.add_argument_group("a staged rollout mid-stream (gates and bake time scale to the run)")
    r.add_argument(
        "--rollout-to", metavar="MODEL2", help="roll MODEL2 out as the next version of the package"
    )
    r.add_argument(
        "--canary-slowdown",
        type=float,
        default=1.0,
        metavar="F",
        help="every stage of the new version takes F times its time",
    )
    r.add_argument(
        "--rollout-stages",
        default="25%,50%,100%",
        metavar="S",
        help="shares of traffic, e.g. 10%%,50%%,100%%",
    )
    r.add_argument(
        "--rollout-at", type=int, metavar="N", help="start after N results (default: a tenth of the run)"
    )
    r.add_argument(
        "--max-p95-regression",
        default="25%",
        metavar="P",
        help="the p95 gate: how much slower the new version may be",
    )


def _faults(args: argparse.Namespace) -> tuple[Any, ...]:
    from meshai.faults import parse_faults

    return parse_faults(
        {"kill": args.kill, "pause": args.pause, "partition": args.partition, "slow": args.slow}
    )


def cmd_sim(args: argparse.Namespace) -> int:
    """Start N real node processes on loopback, plan, deploy, stream R requests, check, stop."""
    from meshai.capabilities import parse_profile_list
    from meshai.planning import parse_pins
    from meshai.sim import SimOptions, run_sim_blocking, sim_table

    profiles = tuple(parse_profile_list(args.profiles)) if args.profiles else ()
    nodes = args.nodes if args.nodes is not None else (len(profiles) or 3)
    opts = SimOptions(
        model=args.model,
        nodes=nodes,
        profiles=profiles,
        requests=args.requests,
        objective=args.objective,
        stages=args.stages,
        pins=parse_pins(args.pin or []),
        inputs=args.inputs,
        outputs=args.outputs,
        seed=args.seed,
        pace=args.pace,
        window=args.window,
        batch=args.batch,
        profiles_file=args.profiles_file,
        insecure=args.insecure,
        ca=args.ca,
        prom_file=args.prom_file,
        report=args.report,
        reference=args.reference,
        offload=args.offload,
        offload_threshold=args.offload_threshold,
        rate=args.rate,
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
        ray_cpus=args.ray_cpus,
        calibration=args.calibration,
        eval=args.eval,
        labels=args.labels,
        max_accuracy_drop=args.max_accuracy_drop,
        per_channel=args.per_channel,
        faults=_faults(args),
        slo_ms=args.slo,
        netns=args.netns,
        link=args.link,
        recover=not args.no_recover,
        rollout_to=args.rollout_to,
        canary_slowdown=args.canary_slowdown,
        rollout_stages=args.rollout_stages,
        rollout_at=args.rollout_at,
        max_p95_regression=args.max_p95_regression,
        runtimes=tuple(r for r in (args.runtimes or "").split(",") if r),
    )
    _warn_insecure(args)
    import signal

    def _terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that every node process is stopped on SIGTERM too, as on Ctrl-C

    signal.signal(signal.SIGTERM, _terminated)
    rep = run_sim_blocking(opts)
    if args.json:
        _emit_json(rep)
    else:
        print(sim_table(rep))
    return 0 if rep["errors"] == 0 else EXIT_ERROR


# ----------------------------------------------------------------------------------------- main


#: Commands whose parsers live in meshai.security_cli / meshai.package_cli.
SECURITY_COMMANDS = frozenset({"ca", "keygen", "package"})


def build_parser(with_security: bool = True) -> argparse.ArgumentParser:
    """The full argument parser (without the CA and package commands when ``with_security`` is off)."""
    p = _Parser(prog="meshai", description="Run one neural network across a swarm of edge devices.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pl = sub.add_parser("plan", help="plan a model over device profiles (offline)")
    pl.add_argument("model", help="an .onnx path or a light model name (squeezenet, resnet50, …)")
    pl.add_argument(
        "--profiles", default="cpu,gpu,npu", help="one device class per node: n0, n1, … (default cpu,gpu,npu)"
    )
    pl.add_argument("--profiles-file", help="JSON/TOML file of extra profiles")
    pl.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    pl.add_argument("--stages", type=_positive_int, help="exactly K stages, each on a different node")
    pl.add_argument(
        "--pin", action="append", metavar="INPUT=NODE", help="keep a raw input on its node (repeatable)"
    )
    pl.add_argument("--batch", type=_positive_int, default=1, help="batch size for symbolic dims (default 1)")
    _quant_flags(pl)
    pl.add_argument("--check", action="store_true", help="run the stages in-process and report max_abs_diff")
    pl.add_argument("--seed", type=int, default=0, help="seed of the random inputs used by --check")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    be = sub.add_parser("bench", help="benchmarks, with ratios against a baseline measured in the same run")
    be.add_argument(
        "what", choices=["plan", "transport", "pipeline", "ray", "quantize", "recovery", "runtimes"]
    )
    be.add_argument(
        "--kills", type=_positive_int, default=10, help="recovery: rounds, one kill each (default 10)"
    )
    be.add_argument(
        "--cases", type=_positive_int, default=300, help="plan: random DAGs for the quality check"
    )
    be.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="plan, transport: timed runs; runtimes: 10x this per stage (default 5)",
    )
    be.add_argument(
        "--sizes",
        default="4MiB,64KiB",
        help="transport: float32 tensor sizes in bytes, KiB or MiB (default 4MiB,64KiB)",
    )
    be.add_argument(
        "--mib", type=float, default=64.0, help="transport: MiB sent per run and kind (default 64)"
    )
    be.add_argument(
        "--tls",
        choices=["both", "off", "on"],
        default="both",
        help="transport: plain TCP, TLS or both (default)",
    )
    be.add_argument(
        "--models",
        default="squeezenet,resnet50",
        help="pipeline: models, comma-separated (default squeezenet,resnet50)",
    )
    be.add_argument(
        "--requests",
        type=_positive_int,
        help="pipeline: timed requests per model (default 200 for squeezenet, 40 for resnet50)",
    )
    be.add_argument(
        "--window", type=_positive_int, default=8, help="pipeline: requests in flight (default 8)"
    )
    be.add_argument(
        "--warmup", type=int, default=5, help="pipeline: untimed requests per deployment first (default 5)"
    )
    be.add_argument(
        "--rounds",
        type=_positive_int,
        default=2,
        help="pipeline: chunks the timed requests are cut into, deployments taking turns (default 2)",
    )
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    pr = sub.add_parser("profiles", help="list device profiles")
    pr.add_argument("--profiles-file")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profiles)

    nd = sub.add_parser("node", help="run a node agent")
    nd.add_argument("--name", required=True)
    nd.add_argument(
        "--profile",
        default="cpu",
        help="device class this node presents (cpu, gpu, npu, tpu, mcu, a --profiles-file name, or host: this machine measured)",
    )
    nd.add_argument("--profiles-file")
    nd.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve on (default 127.0.0.1:0)")
    nd.add_argument(
        "--interface",
        action="append",
        metavar="ADDR",
        help="IPv4 address mDNS uses (default: the --listen host)",
    )
    nd.add_argument("--discovery", choices=["mdns", "static", "none"], default="mdns")
    nd.add_argument("--peers", default="")
    nd.add_argument("--mesh", default="")
    nd.add_argument("--pace", action="store_true", help="take the time the profile predicts for each stage")
    nd.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime threads per stage")
    _add_identity_flags(nd)
    nd.add_argument("--trusted-key", metavar="K.pub", help="fleet package key: load only packages it signed")
    nd.add_argument("--store", metavar="DIR", help="where verified packages are kept (default: a temp dir)")
    nd.add_argument("--mqtt", metavar="HOST:PORT", help="publish aggregate telemetry to this MQTT broker")
    nd.add_argument(
        "--site", default="default", help="site name in telemetry topics (meshai/<site>/<node>/…)"
    )
    nd.add_argument(
        "--telemetry-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between telemetry snapshots",
    )
    nd.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz, /readyz on the --listen host at PORT (0: any free port)",
    )
    nd.add_argument("--verbose", action="store_true", help="log peers refused, lost and revoked (stderr)")
    nd.add_argument(
        "--link",
        metavar="SPEC",
        help="emulate this link on every connection, e.g. delay=20ms,jitter=5ms,rate=100mbit,loss=1%%"
        " (SIGUSR1 takes the link down, SIGUSR2 brings it up)",
    )
    nd.add_argument("--link-seed", type=int, default=0, metavar="N", help="seed of the --link emulator")
    nd.add_argument(
        "--entry-only",
        action="store_true",
        help="host long-lived deployments' entries (meshai deploy --entry NAME), never run a stage",
    )
    nd.add_argument(
        "--declare-link",
        metavar="SPEC",
        help="advertise this link to planners (rate as bandwidth, delay as latency; default: the profile's)",
    )
    nd.add_argument(
        "--data",
        metavar="FILE.npz",
        help="labelled samples (x, y) for 'meshai federate': fine-tuned on here, never sent",
    )
    nd.add_argument(
        "--audit-log", metavar="FILE", help="append one JSON line per message sent (kinds, shapes, sizes)"
    )
    nd.add_argument(
        "--runtime",
        metavar="R[,R…]",
        help="the runtimes this node offers, preferred first: onnxruntime, ort-mobile, litert "
        "(default: every one installed here)",
    )
    nd.add_argument("--json", action="store_true", help="print the ready line as JSON")
    nd.set_defaults(func=cmd_node)

    pe = sub.add_parser("peers", help="the nodes this host can see and their capabilities")
    _add_mesh_flags(pe)
    pe.add_argument("--json", action="store_true")
    pe.set_defaults(func=cmd_peers)

    rn = sub.add_parser("run", help="plan over the discovered swarm, deploy, run, report")
    rn.add_argument("model")
    rn.add_argument("--inputs", required=True)
    rn.add_argument("--outputs")
    rn.add_argument("--package", metavar="PKG", help="deploy from this signed package (nodes verify it)")
    _constraints_flags(rn)
    _add_mesh_flags(rn)
    rn.add_argument("--json", action="store_true")
    rn.set_defaults(func=cmd_run)

    dp = sub.add_parser("deploy", help="plan, deploy and leave a named pipeline serving")
    dp.add_argument("model")
    dp.add_argument("--name", required=True)
    dp.add_argument("--entry", help="node that hosts the deployment's entry (default: stage 0's)")
    dp.add_argument("--package", metavar="PKG", help="deploy from this signed package (nodes verify it)")
    _constraints_flags(dp)
    _add_mesh_flags(dp)
    dp.add_argument("--json", action="store_true")
    dp.set_defaults(func=cmd_deploy)

    inf = sub.add_parser("infer", help="run requests through a long-lived deployment")
    inf.add_argument("name")
    inf.add_argument("--inputs", required=True)
    inf.add_argument("--outputs")
    inf.add_argument(
        "--labels",
        metavar="FILE",
        help="an npz whose 'labels' hold the class each request should get (accuracy per version)",
    )
    inf.add_argument(
        "--key", default="", metavar="ROBOT", help="the robot the requests come from (an A/B split by robot)"
    )
    _add_mesh_flags(inf)
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_infer)

    dl = sub.add_parser("deployments", help="list long-lived deployments")
    _add_mesh_flags(dl)
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_deployments)

    ud = sub.add_parser("undeploy", help="release a long-lived deployment")
    ud.add_argument("name")
    _add_mesh_flags(ud)
    ud.add_argument("--json", action="store_true")
    ud.set_defaults(func=cmd_undeploy)

    si = sub.add_parser(
        "sim", help="a real swarm of node processes on loopback, checked against the whole model"
    )
    si.add_argument("--nodes", type=_positive_int)
    si.add_argument("--profiles", default="", help="one device class per node (default: every node cpu)")
    si.add_argument("--profiles-file")
    si.add_argument("--model", required=True)
    si.add_argument("--requests", type=_positive_int, default=100)
    _constraints_flags(si)
    si.add_argument("--inputs")
    si.add_argument("--outputs")
    _quant_flags(si)
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--pace", action="store_true")
    si.add_argument("--window", type=_positive_int, default=8, help="requests in flight")
    si.add_argument("--batch", type=_positive_int, default=1)
    si.add_argument("--insecure", action="store_true", help="no TLS, unsigned stage models (debugging only)")
    si.add_argument(
        "--prom-file", metavar="F", help="write the swarm's final Prometheus exposition text to F"
    )
    si.add_argument(
        "--reference", metavar="in.npz", help="drift reference inputs (default: the first requests)"
    )
    si.add_argument("--report", metavar="DIR", help="write a PNG of the run (latencies, timeline) into DIR")
    si.add_argument(
        "--ca", metavar="DIR", help="issue the sim's identities from this mesh CA (default: a throwaway one)"
    )
    si.add_argument("--offload", choices=["ray"], help="spill requests to Ray when the swarm's queue is full")
    si.add_argument(
        "--offload-threshold",
        type=_positive_int,
        metavar="Q",
        help="with --offload: requests arriving while the swarm holds Q or more go to Ray",
    )
    si.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="with --offload: requests arrive R per second (default: all at once, a burst)",
    )
    si.add_argument("--ray-address", metavar="ADDRESS", help="a Ray cluster (default: an embedded local one)")
    si.add_argument("--ray-actors", type=_positive_int, default=2, help="Ray actors (default 2)")
    si.add_argument("--ray-cpus", type=_positive_int, default=2, help="CPUs of the embedded Ray (default 2)")
    si.add_argument(
        "--runtimes",
        metavar="R,R,…",
        help="node i runs only the i-th runtime (onnxruntime, ort-mobile, litert); stages are converted for it",
    )
    _fault_flags(si)
    si.add_argument("--json", action="store_true")
    si.set_defaults(func=cmd_sim)

    from meshai.batch_cli import add_batch_parser
    from meshai.federate_cli import add_federate_parser
    from meshai.quantize_cli import add_digits_parser, add_quantize_parser
    from meshai.rollout_cli import add_rollout_parsers
    from meshai.telemetry_cli import add_telemetry_parser

    add_batch_parser(sub)
    add_quantize_parser(sub)
    add_digits_parser(sub)
    add_telemetry_parser(sub)
    add_federate_parser(sub)
    add_rollout_parsers(sub)
    if with_security:  # cryptography and onnx load in ~0.2 s: keep them off `meshai node`'s start
        from meshai.package_cli import add_package_parsers
        from meshai.security_cli import add_ca_parser

        add_ca_parser(sub)
        add_package_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; MeshaiError becomes one line on stderr and exit 1."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(with_security=command is None or command in SECURITY_COMMANDS)
    args = parser.parse_args(words)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MeshaiError as exc:
        sys.stderr.write(f"meshai: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("meshai: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
