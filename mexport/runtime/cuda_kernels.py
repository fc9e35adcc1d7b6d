"""Which nodes ONNX Runtime's CUDA provider has no kernel for, so that a GPU run never silently computes on the CPU.

ONNX Runtime assigns a node the CUDA provider has no kernel for to the CPU provider, with only a log line: for the 9B
that turns a minutes-long GPU validate into hours. Its session option ``session.disable_cpu_ep_fallback`` is no
guard for these graphs: session creation then fails as soon as ANY node is on the CPU provider
(``inference_session.cc``: "This session contains graph nodes that are assigned to the default CPU EP"), and the CUDA
provider deliberately leaves shape subgraphs (Shape -> Gather -> Concat -> Reshape, in every layer of a
dynamic-shape decoder) to the CPU (``GetCpuPreferredNodes``, microsoft/onnxruntime PRs #4940, #16491). So the
compute nodes are checked here against the CUDA provider's registered kernels before a session is made.

Sources (CUDAExecutionProvider tables of onnxruntime ``docs/OperatorKernels.md``, and
``onnxruntime/core/providers/cuda/tensor/quantize_linear.cc``): QuantizeLinear / DequantizeLinear are registered with
float and float16 scales only (no bfloat16, at any opset); quantized types int8/uint8 from opset 10, float8
(e4m3fn, e5m2) from 19, int4/uint4 from 21; a blocked DequantizeLinear (``block_size``) only for int4/uint4, and only
in releases whose CUDA kernel implements blocks. The element-wise and reduction ops listed in NO_BF16_OPS have
float/float16 CUDA kernels but no bfloat16 one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mexport.lazy import require
from mexport.quant_schemes import SCHEMES

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_SCALE_TYPES = ("float32", "float16")
# opset from which the CUDA provider registers Q/DQ for a quantized element type
QDQ_MIN_OPSET = {scheme.element_type: scheme.ort_cuda_min_opset for scheme in SCHEMES.values()}
BLOCKED_TYPES = tuple(scheme.element_type for scheme in SCHEMES.values() if scheme.ort_cuda_blocked)
NO_BF16_OPS = frozenset({
    "Ceil", "Clip", "Cos", "CumSum", "Equal", "Floor", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Log",
    "Pad", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "Round", "Sin", "TopK",
})


@dataclass(frozen=True)
class UnsupportedNode:
    """A node the CUDA provider would hand to the CPU, and why."""

    name: str
    op: str
    reason: str

    def describe(self) -> str:
        return f"{self.name} ({self.op}: {self.reason})"


def qdq_gap(op: str, quantized: str, scale: str, opset: int, blocked: bool) -> str | None:
    """Why the CUDA provider has no kernel for this Q/DQ node (None: it has one)."""
    if scale not in QDQ_SCALE_TYPES:
        return f"{scale} scales (CUDA {op} takes float32/float16 only)"
    if quantized not in QDQ_MIN_OPSET or opset < QDQ_MIN_OPSET[quantized]:
        return f"{quantized} at opset {opset} (no CUDA {op} kernel)"
    if blocked and quantized not in BLOCKED_TYPES:
        return f"blocked {quantized} (CUDA blocked {op} is int4/uint4 only)"
    return None


def _element_types(model: Any) -> dict[str, str]:
    """Tensor name -> numpy-style element type name, from type inference (weights need not be loaded)."""
    onnx = require("onnx")
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {
        value.name: value.type.tensor_type.elem_type
        for value in [*graph.input, *graph.value_info, *graph.output]
        if value.type.HasField("tensor_type")
    }
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    names = {code: onnx.TensorProto.DataType.Name(code).lower() for code in set(types.values())}
    renamed = {"float": "float32", "double": "float64"}
    return {name: renamed.get(names[code], names[code]) for name, code in types.items()}


def cuda_unsupported_nodes(model: Any) -> list[UnsupportedNode]:
    """The nodes of ``model`` (an onnx.ModelProto, external data not loaded) without a CUDA kernel."""
    onnx = require("onnx")
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    types = _element_types(model)
    found = []
    for node in model.graph.node:
        inputs = [types.get(name, "") for name in node.input]
        if node.op_type in QDQ_OPS:
            attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
            quantized, scale = (inputs[0], inputs[1]) if node.op_type == "DequantizeLinear" else (
                types.get(node.output[0], ""), inputs[1]
            )
            reason = qdq_gap(node.op_type, quantized, scale, opset, bool(attributes.get("block_size")))
        else:
            reason = "bfloat16 input (no CUDA bfloat16 kernel)" if (
                node.op_type in NO_BF16_OPS and "bfloat16" in inputs
            ) else None
        if reason:
            found.append(UnsupportedNode(node.name or node.output[0], node.op_type, reason))
    return found
