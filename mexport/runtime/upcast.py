"""In-memory ONNX graph rewrites that let ONNX Runtime run bf16 / fp16 graphs where it lacks the kernels.

ORT's CPU provider has almost no bf16 kernels ("Could not find an implementation for Where(16)") and few fp16
ones, so a CPU session of a bf16/fp16 export runs an fp32-compute copy of the graph: weights keep their stored
values (bf16 -> fp32 is exact), arithmetic is fp32. Callers report that as emulation, never as native bf16.

Memory: initializers stored inline are converted in the proto. Initializers in the external-data file stay as they
are on disk, read through a ``Cast(to=FLOAT)`` node; ORT constant-folds those casts when the session is created, so
the session holds fp32 weights, plus any constant it folds from them: the tied embedding's transposed LM-head copy
is folded too (a fp32 export keeps it unfolded). Measured on the wide fixture (bf16 data 40 MiB, embedding-heavy):
+163 MiB resident after a forward, vs +94 MiB for its fp32 export (81 MiB data). For Meditron3-Gemma2-9B that is
~37 GB of fp32 weights + ~3.7 GB transposed embedding: run bf16 exports of large models on a GPU, not on CPU.
(Passing pre-converted fp32 arrays with ``add_external_initializers`` was measured worse: ORT copied them.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexport.lazy import require

LOW_PRECISION_NAMES = {"bfloat16": "bf16", "float16": "fp16"}
# attributes whose INT value is a tensor element type (Cast.to, EyeLike.dtype, DequantizeLinear.output_dtype, ...)
ELEMENT_TYPE_ATTRIBUTES = {"to", "dtype", "output_dtype"}
STORED_SUFFIX = "__stored"
NATIVE_SUFFIX = "__native"


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
