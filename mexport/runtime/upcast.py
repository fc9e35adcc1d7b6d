"""In-memory ONNX graph rewrites that let ONNX Runtime run bf16 / fp16 graphs where it lacks the kernels.

ORT's CPU provider has almost no bf16 kernels ("Could not find an implementation for Where(16)") and few fp16
ones, so a CPU session of a bf16/fp16 export runs an fp32-compute copy of the graph: weights keep their stored
values (bf16 -> fp32 is exact), arithmetic is fp32. Callers report that as emulation, never as native bf16.

Memory: initializers stored inline are converted in the proto. Initializers in the external-data file stay as they
are on disk, read through a ``Cast(to=FLOAT)`` node. With ORT's default optimizations those casts are constant-folded
when the session is created: the session then holds fp32 weights (2x the stored bytes), plus any constant folded from
them (the tied embedding's transposed LM-head copy: 3.7 GB more for Meditron3-Gemma2-9B). That is fast for small
models. :func:`bound_weight_upcasts` prepares the graph for a session without constant folding instead, where the
stored weights stay memory-mapped in their own dtype and each node casts its weight when it runs: embedding rows are
gathered before the cast, and MatMuls over large weights (the LM head) run slice by slice so no fp32 copy of a large
weight ever exists whole. (Passing pre-converted fp32 arrays with ``add_external_initializers`` was measured worse
than folding: ORT copied them.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexport.formats import is_plain_transpose
from mexport.lazy import require

LOW_PRECISION_NAMES = {"bfloat16": "bf16", "float16": "fp16"}
# attributes whose INT value is a tensor element type (Cast.to, EyeLike.dtype, DequantizeLinear.output_dtype, ...)
ELEMENT_TYPE_ATTRIBUTES = {"to", "dtype", "output_dtype"}
STORED_SUFFIX = "__stored"
NATIVE_SUFFIX = "__native"
SLICE_SUFFIX = "__slice"
# the largest fp32 copy of a weight slice bound_weight_upcasts lets a MatMul materialize at run time
DEFAULT_SLICE_BYTES = 16 << 20
# ORT optimizers that undo bound_weight_upcasts: constant folding turns the casts back into fp32 initializers, and
# GatherSliceToSplitFusion merges a weight's slices into one Split, which runs (holding every slice) as soon as its
# constant input is ready, at the start of each forward
BOUNDED_UPCAST_DISABLED_OPTIMIZERS = ["ConstantFolding", "GatherSliceToSplitFusion"]


def _low_precision_types(onnx: Any) -> set[int]:
    return {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}


def _float32_tensor(onnx: Any, tensor: Any) -> Any:
    """An inline tensor's float32 copy (same name); bf16 -> fp32 and fp16 -> fp32 are exact."""
    values = onnx.numpy_helper.to_array(tensor).astype(np.float32)
    return onnx.numpy_helper.from_array(values, tensor.name)


def _upcast_graph(onnx: Any, graph: Any) -> None:
    low = _low_precision_types(onnx)
    float32 = onnx.TensorProto.FLOAT
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type in low:
            value.type.tensor_type.elem_type = float32

    stored_casts = []
    for tensor in graph.initializer:
        if tensor.data_type not in low:
            continue
        if onnx.external_data_helper.uses_external_data(tensor):
            # keep the external bytes untouched; the consumers read the cast output under the original name
            stored_name = tensor.name + STORED_SUFFIX
            stored_casts.append(onnx.helper.make_node("Cast", [stored_name], [tensor.name], to=float32))
            tensor.name = stored_name
        else:
            tensor.CopyFrom(_float32_tensor(onnx, tensor))

    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in low:
                attribute.t.CopyFrom(_float32_tensor(onnx, attribute.t))
            elif attribute.type == onnx.AttributeProto.INT and attribute.name in ELEMENT_TYPE_ATTRIBUTES:
                if attribute.i in low:
                    attribute.i = float32
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _upcast_graph(onnx, attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _upcast_graph(onnx, subgraph)

    if stored_casts:
        nodes = [*stored_casts, *graph.node]  # initializers are sources: casts first keeps topological order
        del graph.node[:]
        graph.node.extend(nodes)


def upcast_to_float32(model: Any) -> Any:
    """Rewrite ``model`` (in place, also returned) so every bf16/fp16 tensor, type and cast becomes float32.

    Covers graph IO and value_info types, Cast targets, Constant / ConstantOfShape values, initializers (inline
    ones converted, external ones cast at load) and Q/DQ scales, so quantized graphs with bf16 scales run too.
    """
    onnx = require("onnx", "rewriting a bf16/fp16 graph for fp32 compute")
    _upcast_graph(onnx, model.graph)
    return model


def cast_outputs_to_float32(model: Any, output_names: list[str]) -> Any:
    """Make graph outputs ``output_names`` float32 with a final Cast (in place, also returned).

    Used for native bf16/fp16 sessions so logits reach NumPy as float32 (NumPy has no bfloat16).
    """
    onnx = require("onnx", "casting graph outputs to float32")
    low = _low_precision_types(onnx)
    graph = model.graph
    outputs = {output.name: output for output in graph.output}
    for name in output_names:
        if outputs[name].type.tensor_type.elem_type not in low:
            continue
        native_name = name + NATIVE_SUFFIX
        for node in graph.node:
            node.output[:] = [native_name if produced == name else produced for produced in node.output]
            node.input[:] = [native_name if consumed == name else consumed for consumed in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [native_name], [name], to=onnx.TensorProto.FLOAT))
        outputs[name].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


def _consumers(graph: Any) -> dict[str, list[Any]]:
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _int64_initializer(onnx: Any, graph: Any, name: str, values: list[int]) -> str:
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def _gather_then_cast(onnx: Any, gather: Any, stored: Any) -> list[Any]:
    """``gather`` reading the stored table, then a cast of the gathered rows only."""
    stored_rows = onnx.NodeProto()
    stored_rows.CopyFrom(gather)
    stored_rows.input[0] = stored.name
    stored_rows.output[0] = gather.output[0] + STORED_SUFFIX
    cast = onnx.helper.make_node("Cast", [stored_rows.output[0]], [gather.output[0]], to=onnx.TensorProto.FLOAT)
    return [stored_rows, cast]


def _sliced_matmul(onnx: Any, graph: Any, matmul: Any, stored: Any, transposed: bool, slice_bytes: int) -> list[Any]:
    """Nodes computing ``matmul`` slice by slice of the output columns of ``stored``: each slice is cut in the stored
    dtype, cast (and transposed: a tied LM head stores (outputs, inputs)), multiplied alone; products concatenated."""
    helper = onnx.helper
    axis = 0 if transposed else 1
    outputs = stored.dims[axis]
    per_slice = max(1, slice_bytes // (4 * stored.dims[1 - axis]))
    prefix = matmul.output[0] + SLICE_SUFFIX
    axes = _int64_initializer(onnx, graph, f"{prefix}_axes", [axis])
    nodes, products = [], []
    for index, start in enumerate(range(0, outputs, per_slice)):
        name = f"{prefix}{index}"
        starts = _int64_initializer(onnx, graph, f"{name}_start", [start])
        ends = _int64_initializer(onnx, graph, f"{name}_end", [min(start + per_slice, outputs)])
        nodes += [
            helper.make_node("Slice", [stored.name, starts, ends, axes], [f"{name}_stored"]),
            helper.make_node("Cast", [f"{name}_stored"], [f"{name}_float"], to=onnx.TensorProto.FLOAT),
        ]
        weight = f"{name}_float"
        if transposed:
            nodes.append(helper.make_node("Transpose", [weight], [f"{name}_weight"], perm=[1, 0]))
            weight = f"{name}_weight"
        nodes.append(helper.make_node("MatMul", [matmul.input[0], weight], [f"{name}_product"]))
        products.append(f"{name}_product")
    nodes.append(helper.make_node("Concat", products, [matmul.output[0]], axis=-1))
    return nodes


def _bounded_reader(
    onnx: Any, graph: Any, readers: dict[str, list[Any]], reader: Any, stored: Any, slice_bytes: int
) -> dict[int, list[Any]] | None:
    """Replacements (by id of the node replaced) for ``reader`` of the upcast of ``stored``; None: keep it."""
    weight = stored.name[: -len(STORED_SUFFIX)]
    if reader.op_type == "Gather" and reader.input[0] == weight:
        return {id(reader): _gather_then_cast(onnx, reader, stored)}
    if len(stored.dims) != 2 or 4 * stored.dims[0] * stored.dims[1] <= slice_bytes:
        return None
    if reader.op_type == "MatMul" and reader.input[1] == weight:
        return {id(reader): _sliced_matmul(onnx, graph, reader, stored, False, slice_bytes)}
    matmuls = readers.get(reader.output[0], [])
    only_matmuls_read_it = all(m.op_type == "MatMul" and m.input[1] == reader.output[0] for m in matmuls)
    if is_plain_transpose(reader) and matmuls and only_matmuls_read_it:
        return {id(reader): [], **{id(m): _sliced_matmul(onnx, graph, m, stored, True, slice_bytes) for m in matmuls}}
    return None


def bound_weight_upcasts(model: Any, slice_bytes: int | None = None) -> Any:
    """Rewrite an :func:`upcast_to_float32` graph (in place, also returned) so a session that does not fold constants
    (BOUNDED_UPCAST_DISABLED_OPTIMIZERS) never holds a whole fp32 copy of a large stored weight: a ``Gather`` reads
    the stored rows and casts only those; a ``MatMul`` (directly or through a ``Transpose``) over a weight larger than
    ``slice_bytes`` (default DEFAULT_SLICE_BYTES) in fp32 runs slice by slice. The fp32 values and arithmetic are those
    of the upcast graph.
    """
    onnx = require("onnx", "rewriting a bf16/fp16 graph for fp32 compute")
    slice_bytes = slice_bytes or DEFAULT_SLICE_BYTES
    graph = model.graph
    stored_tensors = {tensor.name: tensor for tensor in graph.initializer if tensor.name.endswith(STORED_SUFFIX)}
    graph_outputs = {output.name for output in graph.output}
    readers = _consumers(graph)
    replaced: dict[int, list[Any]] = {}  # id(node) -> the nodes taking its place
    for cast in graph.node:
        if cast.op_type != "Cast" or cast.input[0] not in stored_tensors:
            continue
        kept_readers = 0
        for reader in readers.get(cast.output[0], []):
            replacements = _bounded_reader(onnx, graph, readers, reader, stored_tensors[cast.input[0]], slice_bytes)
            if replacements is None:
                kept_readers += 1
            else:
                replaced.update(replacements)
        if not kept_readers and cast.output[0] not in graph_outputs:
            replaced[id(cast)] = []
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    return model
