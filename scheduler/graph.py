"""ONNX → GraphIR: ops with FLOPs and parameter bytes, tensors with shapes, dtypes and bytes.

``normalize_model`` makes a model plannable and extractable (unique, stable node names; graph inputs
that are really initializers or node outputs dropped, as IR-3 models list them; IR version raised).
``build_graph`` turns the normalized model into a ``GraphIR``.

Ops whose outputs depend only on constants (``Constant``, ``ConstantOfShape`` of an initializer, shape
arithmetic on initializers) are *weights in disguise*: they are not planned as ops.  Each compute op
lists the constant tensors it consumes; the stage that runs the op carries the constant ops that make
them (copied where several stages need them), and their bytes count as that stage's parameters.
Control-flow ops (If/Loop/Scan) are kept whole; names their subgraphs read from the outer scope count
as the op's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import onnx
from onnx import helper, shape_inference

from meshai.errors import ModelError, check_min

MIN_IR_VERSION = 7
#: Ops never folded as constants: their outputs differ per run.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor: dtype name, shape (symbolic dims as strings), and bytes at the planning batch."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None
    nbytes: int


@dataclass(frozen=True, slots=True)
class OpInfo:
    """A compute op: its inputs (implicit subgraph reads included), outputs, cost figures."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    const_inputs: tuple[str, ...]
    flops: float
    act_bytes: int  # bytes of the activations it reads and writes


@dataclass(frozen=True, slots=True)
class GraphIR:
    """A model as the planner sees it (compute ops in topological order)."""

    name: str
    ops: tuple[OpInfo, ...]
    tensors: Mapping[str, TensorInfo]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    const_bytes: Mapping[str, int]  # constant tensor -> bytes
    const_closure: Mapping[str, tuple[str, ...]]  # constant tensor -> const op names that make it
    producer: Mapping[str, int] = field(default_factory=dict)  # activation -> producing op position
    consumers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # tensor -> op positions
    batch: int = 1

    @property
    def total_flops(self) -> float:
        """Sum of FLOPs over compute ops."""
        return float(sum(op.flops for op in self.ops))

    @property
    def param_bytes(self) -> int:
        """Bytes of every constant tensor that a compute op consumes."""
        used = {t for op in self.ops for t in op.const_inputs}
        return sum(self.const_bytes[t] for t in used)

    def nbytes(self, tensor: str) -> int:
        """Bytes of a tensor at the planning batch (0 where unknown)."""
        info = self.tensors.get(tensor)
        return info.nbytes if info else 0

    def op_index(self, name: str) -> int:
        """Position of the compute op called ``name``."""
        for i, op in enumerate(self.ops):
            if op.name == name:
                return i
        raise ModelError(f"no compute op named {name!r} in model {self.name!r}")


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    out: list[str] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs = list(attr.graphs)
        else:
            continue
        for g in graphs:
            for name in _graph_free_names(g):
                if name not in out:
                    out.append(name)
    return out


def _graph_free_names(g: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in g.input} | {i.name for i in g.initializer}
    defined |= {i.name for i in g.sparse_initializer}
    free: list[str] = []
    for n in g.node:
        for name in list(n.input) + subgraph_reads(n):
            if name and name not in defined:
                free.append(name)
        defined.update(o for o in n.output if o)
    return free


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit non-empty inputs plus implicit outer-scope reads of subgraphs."""
    names = [i for i in node.input if i]
    for extra in subgraph_reads(node):
        if extra not in names:
            names.append(extra)
    return names


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with unique stable node names, real graph inputs only, IR >= 7, topological order."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if m.ir_version < MIN_IR_VERSION:
        m.ir_version = MIN_IR_VERSION
    produced = {o for n in g.node for o in n.output if o}
    inits = {t.name for t in g.initializer} | {t.name for t in g.sparse_initializer}
    real = [i for i in g.input if i.name not in inits and i.name not in produced]
    del g.input[:]
    g.input.extend(real)
    # unique, stable names: keep given names, name the rest OpType_index, suffix duplicates
    used: set[str] = set()
    for idx, n in enumerate(g.node):
        base = n.name or f"{n.op_type}_{idx}"
        name = base
        k = 1
        while name in used:
            name = f"{base}__{k}"
            k += 1
        n.name = name
        used.add(name)
    _toposort_inplace(g)
    return m


def _toposort_inplace(g: onnx.GraphProto) -> None:
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    available |= {t.name for t in g.sparse_initializer}
    nodes = list(g.node)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    deps: list[set[int]] = []
    for n in nodes:
        d = {producer[t] for t in node_inputs(n) if t in producer and t not in available}
        deps.append(d)
    order: list[int] = []
    done: set[int] = set()
    remaining = list(range(len(nodes)))
    while remaining:
        progressed = False
        nxt = []
        for i in remaining:
            if deps[i] <= done:
                order.append(i)
                done.add(i)
                progressed = True
            else:
                nxt.append(i)
        if not progressed:
            bad = nodes[nxt[0]]
            raise ModelError(
                f"model graph has a cycle or a missing input at node {bad.name!r} ({bad.op_type})"
            )
        remaining = nxt
    if order != list(range(len(nodes))):
        sorted_nodes = [nodes[i] for i in order]
        del g.node[:]
        g.node.extend(sorted_nodes)


def _dtype_name(elem_type: int) -> str:
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return "float32"


def _shape_of(t: onnx.TypeProto) -> tuple[int | str, ...] | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def _concrete(shape: tuple[int | str, ...] | None, batch: int) -> tuple[int, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else batch for d in shape)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy (data propagation on); a model that fails inference raises ModelError."""
    try:
        return shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and others
        raise ModelError(f"shape inference failed: {exc}") from None


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every value_info, input, output and initializer of an inferred model's main graph, by name."""
    g = model.graph
    out: dict[str, onnx.ValueInfoProto] = {}
    for t in g.initializer:
        out[t.name] = helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    for v in list(g.value_info) + list(g.input) + list(g.output):
        out[v.name] = v
    return out


def build_graph(model: onnx.ModelProto, name: str = "model", batch: int = 1) -> GraphIR:
    """Build the GraphIR of a normalized model; symbolic dims are taken as ``batch``."""
    check_min("batch", batch, 1, ModelError)
    inferred = infer_shapes(model)
    g = inferred.graph
    vtypes = tensor_types(inferred)

    inits = {t.name for t in g.initializer} | {t.name for t in g.sparse_initializer}
    graph_outputs = tuple(o.name for o in g.output)
    graph_inputs = tuple(i.name for i in g.input if i.name not in inits)
    gout = set(graph_outputs)

    tensors: dict[str, TensorInfo] = {}

    def info(tname: str) -> TensorInfo:
        if tname in tensors:
            return tensors[tname]
        v = vtypes.get(tname)
        if v is None:
            ti = TensorInfo(tname, "float32", None, 0)
        else:
            dt = _dtype_name(v.type.tensor_type.elem_type)
            shape = _shape_of(v.type)
            conc = _concrete(shape, batch)
            nb = int(math.prod(conc)) * np.dtype(dt).itemsize if conc is not None else 0
            ti = TensorInfo(tname, dt, shape, nb)
        tensors[tname] = ti
        return ti

    const_tensors: set[str] = set(inits)
    const_closure: dict[str, tuple[str, ...]] = {t: () for t in inits}
    compute_nodes: list[onnx.NodeProto] = []
    for n in g.node:
        ins = node_inputs(n)
        is_const = (
            n.op_type not in _CONTROL_FLOW
            and n.op_type not in _NONDETERMINISTIC
            and all(i in const_tensors for i in ins)
            and not any(o in gout for o in n.output)
            and n.domain in ("", "ai.onnx")
        )
        if is_const:
            closure: list[str] = []
            for i in ins:
                closure.extend(c for c in const_closure[i] if c not in closure)
            closure.append(n.name)
            for o in n.output:
                if o:
                    const_tensors.add(o)
                    const_closure[o] = tuple(closure)
        else:
            compute_nodes.append(n)

    known = set(graph_inputs) | const_tensors | {o for n in compute_nodes for o in n.output if o}
    for n in compute_nodes:
        for i in node_inputs(n):
            if i not in known:
                raise ModelError(
                    f"op {n.name!r} ({n.op_type}) reads {i!r}, which no node makes and is not an input"
                )
    ops: list[OpInfo] = []
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for pos, n in enumerate(compute_nodes):
        ins = node_inputs(n)
        outs = tuple(o for o in n.output if o)
        cin = tuple(i for i in ins if i in const_tensors)
        act_in = [i for i in ins if i not in const_tensors]
        for i in ins:
            info(i)
        for o in outs:
            info(o)
        flops = op_flops(n, [info(i) for i in n.input if i], [info(o) for o in outs], batch)
        act_bytes = sum(info(i).nbytes for i in act_in) + sum(info(o).nbytes for o in outs)
        ops.append(OpInfo(pos, n.name, n.op_type, tuple(ins), outs, cin, flops, act_bytes))
        for o in outs:
            producer[o] = pos
        for i in ins:
            consumers.setdefault(i, []).append(pos)
    for t in graph_inputs + graph_outputs:
        info(t)
    const_bytes = {t: info(t).nbytes for t in const_tensors}
    for t in inits:
        init = next((x for x in g.initializer if x.name == t), None)
        if init is not None and const_bytes.get(t, 0) == 0:
            itemsize = np.dtype(_dtype_name(init.data_type)).itemsize
            const_bytes[t] = int(math.prod(init.dims)) * itemsize
    missing = [o for o in graph_outputs if o not in producer and o not in graph_inputs]
    if missing:
        raise ModelError(f"graph output {missing[0]!r} is produced by no op")
    return GraphIR(
        name=name,
        ops=tuple(ops),
        tensors=tensors,
        inputs=graph_inputs,
        outputs=graph_outputs,
        const_bytes=const_bytes,
        const_closure={t: c for t, c in const_closure.items() if t in const_tensors},
        producer=producer,
        consumers={k: tuple(v) for k, v in consumers.items()},
        batch=batch,
    )


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _elems(t: TensorInfo, batch: int) -> int:
    c = _concrete(t.shape, batch)
    return int(math.prod(c)) if c is not None else 0


_ELEMENTWISE_COST = {
    "Relu": 1,
    "LeakyRelu": 2,
    "PRelu": 2,
    "Clip": 2,
    "Add": 1,
    "Sub": 1,
    "Mul": 1,
    "Div": 1,
    "Sum": 1,
    "Max": 1,
    "Min": 1,
    "Mean": 1,
    "Sigmoid": 4,
    "Tanh": 4,
    "Exp": 4,
    "Log": 4,
    "Sqrt": 2,
    "Pow": 4,
    "Erf": 8,
    "HardSigmoid": 3,
    "HardSwish": 4,
    "Elu": 4,
    "Selu": 4,
    "Softplus": 4,
    "Abs": 1,
    "Neg": 1,
    "BatchNormalization": 2,
    "InstanceNormalization": 5,
    "LayerNormalization": 8,
    "Softmax": 5,
    "LogSoftmax": 5,
    "Dropout": 0,
    "Identity": 0,
    "Cast": 1,
}


def op_flops(
    node: onnx.NodeProto, ins: Sequence[TensorInfo], outs: Sequence[TensorInfo], batch: int = 1
) -> float:
    """FLOPs of one op (a multiply-add counts 2): Conv, Gemm, MatMul exact; others by elements."""
    t = node.op_type
    out_elems = _elems(outs[0], batch) if outs else 0
    if t in ("Conv", "ConvTranspose") and len(ins) >= 2:
        w = _concrete(ins[1].shape, batch)
        if w is None or len(w) < 3:
            return float(out_elems)
        group = int(_attr(node, "group", 1))  # type: ignore[call-overload]
        kernel = int(math.prod(w[2:]))
        if t == "Conv":
            cin_per_group = w[1]
            macs = out_elems * cin_per_group * kernel
        else:  # ConvTranspose: weight (Cin, Cout/g, k...); each input element feeds Cout/g*k outputs
            in_elems = _elems(ins[0], batch)
            macs = in_elems * w[1] * kernel
            _ = group
        bias = out_elems if len(ins) >= 3 else 0
        return float(2 * macs + bias)
    if t == "Gemm" and len(ins) >= 2:
        a = _concrete(ins[0].shape, batch)
        b = _concrete(ins[1].shape, batch)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return float(out_elems)
        trans_a = int(_attr(node, "transA", 0))  # type: ignore[call-overload]
        trans_b = int(_attr(node, "transB", 0))  # type: ignore[call-overload]
        m_, k_ = (a[1], a[0]) if trans_a else (a[0], a[1])
        n_ = b[0] if trans_b else b[1]
        bias = m_ * n_ if len(ins) >= 3 else 0
        return float(2 * m_ * n_ * k_ + bias)
    if t == "MatMul" and len(ins) >= 2:
        a = _concrete(ins[0].shape, batch)
        if a is None or not a:
            return float(out_elems)
        k_ = a[-1]
        return float(2 * out_elems * k_)
    if t in ("MaxPool", "AveragePool", "LpPool"):
        ks = cast("list[int]", _attr(node, "kernel_shape", [1]))
        return float(out_elems * int(math.prod(ks)))
    if t in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax"):
        return float(_elems(ins[0], batch)) if ins else float(out_elems)
    if t == "LRN":
        return float(out_elems * (int(_attr(node, "size", 5)) + 3))  # type: ignore[call-overload]
    if t in _CONTROL_FLOW:
        return float(sum(_elems(i, batch) for i in ins)) + float(out_elems)
    return float(out_elems * _ELEMENTWISE_COST.get(t, 1))


def consumers_of(graph: GraphIR, tensors: Iterable[str]) -> set[int]:
    """Positions of compute ops that read any of ``tensors``."""
    out: set[int] = set()
    for t in tensors:
        out.update(graph.consumers.get(t, ()))
    return out
