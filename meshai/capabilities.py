"""Device capabilities as data: accelerator profiles, links, and detection of the real host.

A profile describes a class of edge hardware (cpu, gpu, npu, tpu, mcu) by what the planner
needs: effective throughput per precision, memory bandwidth, memory, the op types it runs,
active and idle power, its network link, and per-op dispatch overhead.  The figures are
grounded in public numbers for representative parts (see ``docs/PROFILES.md``):

- ``cpu``  4-core Cortex-A72/A76-class SBC (Raspberry Pi 4/5): NEON fp32, int8 dot products.
- ``gpu``  Jetson Orin Nano-class module: CUDA fp32, fp16 tensor cores, int8.
- ``npu``  RK3588-class NPU: int8 and fp16 native, fp32 only through a slow fallback path.
- ``tpu``  Coral Edge-TPU-class: int8 only, a narrow op set, parameters in 8 MiB SRAM.
- ``mcu``  Cortex-M7-class microcontroller with CMSIS-NN kernels: int8 only, a few hundred KiB.

Numbers are *effective* (what kernels achieve on real layers), not datasheet peaks.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshai.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
KINDS: tuple[str, ...] = ("cpu", "gpu", "npu", "tpu", "mcu")


def _opset(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Op types every general-purpose runtime (onnxruntime on a CPU or GPU) runs.
ALL_OPS = "*"

_NPU_OPS = _opset(
    """
    Conv ConvTranspose Relu LeakyRelu PRelu Clip Sigmoid Tanh HardSigmoid HardSwish Elu Selu
    MaxPool AveragePool GlobalAveragePool GlobalMaxPool BatchNormalization InstanceNormalization
    Add Sub Mul Div Sum Max Min Concat Split Slice Reshape Flatten Transpose Squeeze Unsqueeze
    Gemm MatMul Softmax Pad Resize Upsample Identity Dropout Shape Gather Cast Mean ReduceMean
    DepthToSpace SpaceToDepth Exp Sqrt Pow Erf LayerNormalization
    """
)
_TPU_OPS = _opset(
    """
    Conv Relu Clip Sigmoid Tanh HardSwish MaxPool AveragePool GlobalAveragePool Add Mul Concat
    Reshape Flatten Squeeze Unsqueeze Gemm MatMul Softmax Pad Resize Identity Dropout Mean
    ReduceMean QuantizeLinear DequantizeLinear QLinearConv QLinearMatMul
    """
)
_MCU_OPS = _opset(
    """
    Conv Relu Clip Sigmoid Tanh MaxPool AveragePool GlobalAveragePool Add Mul Reshape Flatten
    Gemm MatMul Softmax Identity Dropout QuantizeLinear DequantizeLinear QLinearConv
    QLinearMatMul
    """
)


@dataclass(frozen=True, slots=True)
class Link:
    """A node's network attachment: bandwidth in bytes/s, one-way latency in seconds, J per byte."""

    bandwidth_bps: float
    latency_s: float
    joules_per_byte: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ConfigError(f"link bandwidth must be > 0 bytes/s, got {self.bandwidth_bps!r}")
        if not self.latency_s >= 0:
            raise ConfigError(f"link latency must be >= 0 s, got {self.latency_s!r}")

    def transfer_s(self, nbytes: float, other: Link | None = None) -> float:
        """Seconds to move ``nbytes`` between this link and ``other`` (the slower one bounds it)."""
        if nbytes <= 0:
            return 0.0
        bw = self.bandwidth_bps if other is None else min(self.bandwidth_bps, other.bandwidth_bps)
        lat = self.latency_s if other is None else max(self.latency_s, other.latency_s)
        return lat + nbytes / bw


@dataclass(frozen=True, slots=True)
class Profile:
    """An accelerator class as data: speed per precision, memory, ops, power, link."""

    kind: str
    description: str
    flops: Mapping[str, float]  # effective FLOP/s (ops/s for int8) per precision
    mem_bandwidth_bps: float
    memory_bytes: int
    ops: frozenset[str] | str  # ALL_OPS or the op types it runs
    active_w: float
    idle_w: float
    link: Link
    op_overhead_s: float = 5e-6

    def __post_init__(self) -> None:
        if not self.kind:
            raise ConfigError("profile kind must be a non-empty string")
        bad = [p for p in self.flops if p not in PRECISIONS]
        if bad:
            raise ConfigError(
                f"profile {self.kind!r}: unknown precision {bad[0]!r} (known: {', '.join(PRECISIONS)})"
            )
        if not self.flops:
            raise ConfigError(f"profile {self.kind!r} declares no precision")
        for p, v in self.flops.items():
            if not v > 0:
                raise ConfigError(f"profile {self.kind!r}: throughput for {p} must be > 0, got {v!r}")
        if self.memory_bytes <= 0:
            raise ConfigError(f"profile {self.kind!r}: memory must be > 0 bytes, got {self.memory_bytes!r}")
        if self.mem_bandwidth_bps <= 0:
            raise ConfigError(
                f"profile {self.kind!r}: memory bandwidth must be > 0, got {self.mem_bandwidth_bps!r}"
            )

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this device runs, fastest first."""
        return tuple(sorted(self.flops, key=lambda p: -self.flops[p]))

    def supports(self, op_type: str) -> bool:
        """Whether this device runs ops of ``op_type``."""
        return self.ops == ALL_OPS or op_type in self.ops

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inverse of ``profile_from_dict``)."""
        return {
            "kind": self.kind,
            "description": self.description,
            "flops": dict(self.flops),
            "mem_bandwidth_bps": self.mem_bandwidth_bps,
            "memory_bytes": self.memory_bytes,
            "ops": self.ops if isinstance(self.ops, str) else sorted(self.ops),
            "active_w": self.active_w,
            "idle_w": self.idle_w,
            "link": {
                "bandwidth_bps": self.link.bandwidth_bps,
                "latency_s": self.link.latency_s,
                "joules_per_byte": self.link.joules_per_byte,
            },
            "op_overhead_s": self.op_overhead_s,
        }


GIB = 1024**3
MIB = 1024**2
KIB = 1024

_WIFI = Link(bandwidth_bps=100e6 / 8, latency_s=1.0e-3, joules_per_byte=5e-9 * 8)
_ETH = Link(bandwidth_bps=1e9 / 8, latency_s=0.2e-3, joules_per_byte=1e-9 * 8)
_SPI = Link(bandwidth_bps=2e6 / 8, latency_s=5e-3, joules_per_byte=50e-9 * 8)

BUILTIN_PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        kind="cpu",
        description="4-core Cortex-A76-class SBC, NEON (Raspberry Pi 5-like)",
        flops={"fp32": 25e9, "int8": 60e9},
        mem_bandwidth_bps=8e9,
        memory_bytes=4 * GIB,
        ops=ALL_OPS,
        active_w=7.0,
        idle_w=2.5,
        link=_ETH,
        op_overhead_s=8e-6,
    ),
    "gpu": Profile(
        kind="gpu",
        description="Jetson Orin Nano-class CUDA GPU (fp16 tensor cores)",
        flops={"fp32": 400e9, "fp16": 1200e9, "int8": 2500e9},
        mem_bandwidth_bps=60e9,
        memory_bytes=8 * GIB,
        ops=ALL_OPS,
        active_w=15.0,
        idle_w=5.0,
        link=_ETH,
        op_overhead_s=25e-6,
    ),
    "npu": Profile(
        kind="npu",
        description="RK3588-class NPU: int8/fp16 native, fp32 via slow fallback",
        flops={"fp32": 15e9, "fp16": 500e9, "int8": 1500e9},
        mem_bandwidth_bps=15e9,
        memory_bytes=2 * GIB,
        ops=_NPU_OPS,
        active_w=5.0,
        idle_w=1.0,
        link=_WIFI,
        op_overhead_s=15e-6,
    ),
    "tpu": Profile(
        kind="tpu",
        description="Coral Edge-TPU-class: int8 only, narrow op set, 8 MiB SRAM + host streaming",
        flops={"int8": 2000e9},
        mem_bandwidth_bps=4e9,
        memory_bytes=256 * MIB,
        ops=_TPU_OPS,
        active_w=2.0,
        idle_w=0.5,
        link=_WIFI,
        op_overhead_s=10e-6,
    ),
    "mcu": Profile(
        kind="mcu",
        description="Cortex-M7-class MCU with CMSIS-NN: int8 only, 512 KiB SRAM",
        flops={"int8": 0.4e9},
        mem_bandwidth_bps=0.4e9,
        memory_bytes=512 * KIB,
        ops=_MCU_OPS,
        active_w=0.3,
        idle_w=0.01,
        link=_SPI,
        op_overhead_s=2e-6,
    ),
}


@dataclass(frozen=True, slots=True)
class NodeCapability:
    """One node of the swarm: its name, its accelerator profile, and what it really is."""

    name: str
    profile: Profile
    emulated: bool = True
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    runtimes: tuple[str, ...] = ("onnxruntime",)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 63:
            raise ConfigError(f"node name must be 1-63 characters, got {self.name!r}")

    @property
    def kind(self) -> str:
        """The accelerator class (cpu, gpu, npu, tpu, mcu or a user profile's kind)."""
        return self.profile.kind

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inverse of ``capability_from_dict``)."""
        return {
            "name": self.name,
            "profile": self.profile.to_dict(),
            "emulated": self.emulated,
            "providers": list(self.providers),
            "runtimes": list(self.runtimes),
            "extra": dict(self.extra),
        }

    def summary(self) -> dict[str, str]:
        """A short string summary for mDNS TXT records."""
        return {
            "acc": self.profile.kind,
            "prec": ",".join(self.profile.precisions),
            "mem": str(self.profile.memory_bytes),
            "emu": "1" if self.emulated else "0",
        }


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing key {key!r}")
    return d[key]


def profile_from_dict(d: Mapping[str, Any], base: Profile | None = None) -> Profile:
    """Build a Profile from a mapping; keys missing from ``d`` come from ``base`` if given."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a profile must be a mapping, got {type(d).__name__}")
    src: dict[str, Any] = base.to_dict() if base is not None else {}
    src.update(d)
    where = f"profile {src.get('kind', '?')!r}"
    try:
        link_d = _need(src, "link", where)
        ops = _need(src, "ops", where)
        return Profile(
            kind=str(_need(src, "kind", where)),
            description=str(src.get("description", "")),
            flops={str(k): float(v) for k, v in dict(_need(src, "flops", where)).items()},
            mem_bandwidth_bps=float(_need(src, "mem_bandwidth_bps", where)),
            memory_bytes=int(_need(src, "memory_bytes", where)),
            ops=ALL_OPS if ops == ALL_OPS else frozenset(str(o) for o in ops),
            active_w=float(_need(src, "active_w", where)),
            idle_w=float(_need(src, "idle_w", where)),
            link=Link(
                bandwidth_bps=float(_need(link_d, "bandwidth_bps", where + " link")),
                latency_s=float(_need(link_d, "latency_s", where + " link")),
                joules_per_byte=float(link_d.get("joules_per_byte", 0.0)),
            ),
            op_overhead_s=float(src.get("op_overhead_s", 5e-6)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value: {exc}") from None


def capability_from_dict(d: Mapping[str, Any]) -> NodeCapability:
    """Build a NodeCapability from its ``to_dict`` form (e.g. received in a hello)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"capabilities must be a mapping, got {type(d).__name__}")
    return NodeCapability(
        name=str(_need(d, "name", "capabilities")),
        profile=profile_from_dict(_need(d, "profile", "capabilities")),
        emulated=bool(d.get("emulated", True)),
        providers=tuple(str(p) for p in d.get("providers", ("CPUExecutionProvider",))),
        runtimes=tuple(str(r) for r in d.get("runtimes", ("onnxruntime",))),
        extra=dict(d.get("extra", {})),
    )


def load_profiles(path: str | os.PathLike[str]) -> dict[str, Profile]:
    """Read user profiles from a JSON or TOML file: ``{"name": {profile fields}, ...}``.

    A profile may name ``"base": "gpu"`` to start from a built-in and override some fields.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read profiles file {str(p)!r}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"profiles file {str(p)!r} is not valid {p.suffix[1:] or 'JSON'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"profiles file {str(p)!r} must map profile names to profiles")
    out: dict[str, Profile] = {}
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"profiles file {str(p)!r}: profile {name!r} must be a mapping")
        base_name = body.get("base")
        base = None
        if base_name is not None:
            if base_name not in BUILTIN_PROFILES:
                raise ConfigError(f"profile {name!r}: unknown base {base_name!r} (known: {', '.join(KINDS)})")
            base = BUILTIN_PROFILES[base_name]
        fields_ = {k: v for k, v in body.items() if k != "base"}
        fields_.setdefault("kind", name)
        out[name] = profile_from_dict(fields_, base)
    return out


def resolve_profiles(names: Sequence[str], extra: Mapping[str, Profile] | None = None) -> list[Profile]:
    """Map profile names to Profiles (built-ins plus ``extra``); unknown names raise ConfigError."""
    table = dict(BUILTIN_PROFILES)
    if extra:
        table.update(extra)
    out = []
    for n in names:
        n = n.strip()
        if n not in table:
            raise ConfigError(f"unknown profile {n!r} (known: {', '.join(sorted(table))})")
        out.append(table[n])
    if not out:
        raise ConfigError("no profiles given")
    return out


def parse_profile_list(text: str) -> list[str]:
    """Split ``"cpu,gpu,npu"`` into names; empty entries are an error."""
    names = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ConfigError(f"bad --profiles value {text!r}: expected names like cpu,gpu,npu")
    return names


def swarm(profiles: Iterable[Profile], prefix: str = "n") -> list[NodeCapability]:
    """Name one node per profile ``n0``, ``n1``, … in order (the sim and plan convention)."""
    return [NodeCapability(name=f"{prefix}{i}", profile=p) for i, p in enumerate(profiles)]


def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 * GIB


def measure_matmul_flops(n: int = 256, repeats: int = 20) -> float:
    """Measure this host's fp32 FLOP/s with an onnxruntime MatMul (one thread, no spinning)."""
    import time

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, n], np.ones((n, n), np.float32).ravel().tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "mm", [a], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    sess.run(None, {"a": x})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"a": x})
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * n * n / best


def detect_host(name: str = "host", measure: bool = True) -> NodeCapability:
    """Describe the real host: cores, memory, onnxruntime providers, measured fp32 speed.

    A host with onnxruntime's CUDA provider is described as a ``gpu`` (not emulated), else ``cpu``.
    """
    import onnxruntime as ort

    providers = tuple(ort.get_available_providers())
    cores = os.cpu_count() or 1
    kind = "gpu" if "CUDAExecutionProvider" in providers else "cpu"
    base = BUILTIN_PROFILES[kind]
    fp32 = measure_matmul_flops() * cores if measure and kind == "cpu" else base.flops["fp32"]
    flops = dict(base.flops)
    flops["fp32"] = fp32
    if kind == "cpu":
        flops["int8"] = fp32 * 0.8  # no VNNI on the reference machine: QDQ int8 runs ~0.8x fp32
    prof = replace(
        base,
        description=f"this host: {cores} cores, measured {fp32 / 1e9:.1f} GFLOP/s fp32",
        flops=flops,
        memory_bytes=_host_memory_bytes(),
    )
    return NodeCapability(
        name=name, profile=prof, emulated=False, providers=providers, extra={"cores": cores}
    )
