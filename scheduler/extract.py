"""Plan → one self-contained ONNX model per stage (pure: ONNX protos in, ONNX protos out).

A stage model holds the stage's compute ops and the constant-only ops (weights in disguise) that make
the constants it reads, in the whole model's node order.  Its graph inputs are the activations it
receives (typed from the shape-inferred whole model, symbolic dims kept, so a stage runs for any batch
the whole model runs for); its outputs are what it sends on or returns; its initializers are exactly
those its nodes read, subgraph (If/Loop/Scan) reads from the outer scope included.  Weights therefore
never cross a link: a constant two stages need is in both stage models.

Every stage model passes ``onnx.checker.check_model``; one that does not raises ``ModelError`` naming
the stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from meshai.errors import ModelError
from meshai.plan import Plan
from scheduler.graph import GraphIR, infer_shapes, node_inputs, tensor_types
from scheduler.stages import StageSpec, split_stages

__all__ = [
    "extract_assignment",
    "extract_plan",
    "extract_stage",
    "stage_types",
]


def stage_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Types of every tensor of the whole (normalized) model after shape inference, by name.

    Compute it once and hand it to ``extract_stage(types=...)`` when extracting several stages.
    """
    return tensor_types(infer_shapes(model))


def _has_elem_type(v: onnx.ValueInfoProto | None) -> bool:
    if v is None or not v.HasField("type"):
        return False
    t = v.type
    if t.HasField("tensor_type"):
        return t.tensor_type.elem_type != onnx.TensorProto.UNDEFINED
    # sequence, map, optional and sparse types: take them as inferred
    return t.WhichOneof("value") is not None


def _value_info(
    tensor: str,
    graph: GraphIR,
    types: Mapping[str, onnx.ValueInfoProto],
    stage: str,
) -> onnx.ValueInfoProto:
    """A ValueInfo for a stage boundary tensor: the inferred type, else its elem type without shape."""
    v = types.get(tensor)
    if v is not None and _has_elem_type(v):
        out = onnx.ValueInfoProto()
        out.name = tensor
        out.type.CopyFrom(v.type)
        return out
    info = graph.tensors.get(tensor)
    if info is None:
        raise ModelError(f"stage {stage!r}: no type is known for tensor {tensor!r}")
    try:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"stage {stage!r}: tensor {tensor!r} has dtype {info.dtype!r} ONNX lacks") from None
    return helper.make_tensor_value_info(tensor, elem, None)


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: list[str] = []
    for n in names:
        if n in seen and n not in dup:
            dup.append(n)
        seen.add(n)
    return dup


def extract_stage(
    model: onnx.ModelProto,
    graph: GraphIR,
    ops: Sequence[str],
    const_ops: Sequence[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    name: str,
    *,
    types: Mapping[str, onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    """One valid, self-contained ONNX model for one stage of the normalized ``model``.

    ``ops`` names compute ops of ``graph``, ``const_ops`` the constant-only nodes the stage carries,
    ``inputs``/``outputs`` the tensors it receives and sends.  ``types`` (from ``stage_types``) saves
    a shape inference per call.  Unknown ops, tensors read but never made, outputs never made and a
    stage model that fails ``onnx.checker`` raise ``ModelError`` naming the stage.
    """
    g = model.graph
    for what, names in (("op", ops), ("const op", const_ops), ("input", inputs), ("output", outputs)):
        dup = _duplicates(names)
        if dup:
            raise ModelError(f"stage {name!r} lists {what} {dup[0]!r} twice")

    compute = {op.name for op in graph.ops}
    for op_name in ops:
        if op_name not in compute:
            raise ModelError(f"stage {name!r}: no compute op named {op_name!r} in model {graph.name!r}")
    wanted_const = set(const_ops)
    for op_name in const_ops:
        if op_name in compute:
            raise ModelError(f"stage {name!r}: const op {op_name!r} is a compute op, not a constant")
    wanted = set(ops) | wanted_const
    nodes = [n for n in g.node if n.name in wanted]
    found = {n.name for n in nodes}
    missing = [o for o in list(ops) + list(const_ops) if o not in found]
    if missing:
        raise ModelError(f"stage {name!r}: model {graph.name!r} has no node named {missing[0]!r}")

    # every name a node reads must be a stage input, an initializer, or made earlier in the stage
    input_set = set(inputs)
    init_names = {t.name for t in g.initializer}
    sparse_names = {t.name for t in g.sparse_initializer}
    available = input_set | init_names | sparse_names
    referenced: set[str] = set()
    produced: set[str] = set()
    for n in nodes:
        for t in node_inputs(n):
            if t not in available:
                makers = [c for c in graph.const_closure.get(t, ()) if c not in wanted_const]
                if makers:
                    raise ModelError(
                        f"stage {name!r}: node {n.name!r} ({n.op_type}) reads constant tensor {t!r}, but "
                        f"the stage's const_ops lack {', '.join(repr(c) for c in makers)}, which make it"
                    )
                raise ModelError(
                    f"stage {name!r}: node {n.name!r} ({n.op_type}) reads tensor {t!r}, which is "
                    "neither a stage input, a constant, nor made earlier in the stage"
                )
            referenced.add(t)
        for o in n.output:
            if o:
                available.add(o)
                produced.add(o)
    for t in outputs:
        if t not in produced and t not in input_set:
            raise ModelError(f"stage {name!r}: output {t!r} is made by none of the stage's nodes")

    all_types = types if types is not None else stage_types(model)
    input_vis = [_value_info(t, graph, all_types, name) for t in inputs]
    output_vis = [_value_info(t, graph, all_types, name) for t in outputs]
    boundary = input_set | set(outputs)
    value_info = [v for v in g.value_info if v.name in produced and v.name not in boundary]
    inits = [t for t in g.initializer if t.name in referenced and t.name not in input_set]
    sparse = [
        t for t in g.sparse_initializer if t.values.name in referenced and t.values.name not in input_set
    ]

    sg = helper.make_graph(nodes, name, input_vis, output_vis, initializer=inits, value_info=value_info)
    sg.sparse_initializer.extend(sparse)
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.producer_name = "meshai"
    m.producer_version = model.producer_version
    m.domain = model.domain
    m.model_version = model.model_version
    m.functions.extend(model.functions)
    m.metadata_props.extend(model.metadata_props)
    m.graph.CopyFrom(sg)
    try:
        onnx.checker.check_model(m)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"stage {name!r} is not a valid ONNX model: {first}") from None
    return m


def extract_plan(model: onnx.ModelProto, graph: GraphIR, plan: Plan) -> list[onnx.ModelProto]:
    """One stage model per stage of ``plan`` (its ops, const_ops, inputs and outputs), in stage order."""
    types = stage_types(model)
    return [
        extract_stage(
            model,
            graph,
            s.ops,
            s.const_ops,
            s.inputs,
            s.outputs,
            f"stage{s.id}_{s.node}" if s.node else f"stage{s.id}",
            types=types,
        )
        for s in plan.stages
    ]


def extract_assignment(
    model: onnx.ModelProto, graph: GraphIR, assignment: Sequence[int]
) -> tuple[list[StageSpec], list[onnx.ModelProto]]:
    """Split ``assignment`` (a device per compute op) into stages and extract one model per stage."""
    specs = split_stages(graph, assignment)
    types = stage_types(model)
    models = [
        extract_stage(
            model,
            graph,
            [graph.ops[pos].name for pos in spec.ops],
            spec.const_ops,
            spec.inputs,
            spec.outputs,
            f"stage{k}",
            types=types,
        )
        for k, spec in enumerate(specs)
    ]
    return specs, models


def ops_between(graph: GraphIR, inputs: Sequence[str], outputs: Sequence[str]) -> tuple[list[int], list[str]]:
    """The compute ops (positions) that make ``outputs`` from ``inputs``, and the const ops they carry.

    This is how a node cuts its own stage out of a whole model it received in a signed package: the
    stage is named by its cut tensors only.  ModelError if ``outputs`` need a tensor that is neither
    among ``inputs``, nor a constant, nor made by an op in between.
    """
    cut = set(inputs)
    need: list[str] = [t for t in outputs if t not in cut]
    ops: set[int] = set()
    seen: set[str] = set()
    while need:
        t = need.pop()
        if t in seen:
            continue
        seen.add(t)
        p = graph.producer.get(t)
        if p is None:
            if t in graph.const_bytes:
                continue
            raise ModelError(f"the stage needs tensor {t!r}, which is not among its cut inputs")
        if p in ops:
            continue
        ops.add(p)
        need.extend(i for i in graph.ops[p].inputs if i not in cut and i not in graph.const_bytes)
    order = sorted(ops)
    const_ops: dict[str, None] = {}
    for p in order:
        for t in graph.ops[p].const_inputs:
            const_ops.update(dict.fromkeys(graph.const_closure.get(t, ())))
    return order, list(const_ops)


def extract_cut(
    model: onnx.ModelProto, graph: GraphIR, inputs: Sequence[str], outputs: Sequence[str], name: str
) -> onnx.ModelProto:
    """The stage model between cut tensors ``inputs`` and ``outputs`` of a normalized whole model."""
    order, const_ops = ops_between(graph, inputs, outputs)
    if not order:
        raise ModelError(f"{name}: no op lies between its cut inputs and outputs")
    return extract_stage(model, graph, [graph.ops[p].name for p in order], const_ops, inputs, outputs, name)
