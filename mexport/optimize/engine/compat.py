"""Static TensorRT compatibility check: the graph held to the target TensorRT's documented ONNX-parser rules.

No machine here runs TensorRT, so a graph its parser would refuse (a negative DequantizeLinear scale, a per-channel
activation scale, an INT4 block size it has no kernel for) would otherwise first fail on the user's GPU host.
``mexport engine --plan`` and every build run :func:`require_compatible`; each violation names the node, the op,
the rule and the TensorRT version, and the plan fails with the input-error exit code.

The rules are data (:data:`RULES`, :data:`OPS`, :data:`OPSETS`), each with its source (:data:`SOURCES`); docs/engine.md
lists them. What the sources do not say is not checked: an op missing from :data:`OPS` is reported as unchecked
rather than guessed supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mexport.errors import MexportError
from mexport.formats import GRAPH_FILE
from mexport.lazy import require
from mexport.quant_schemes import SCHEMES
from mexport.trt_common import version_tuple

SOURCES = {
    "operators": "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 release (op table, supported types, limits)",
    "parser": "onnx/onnx-tensorrt onnxOpImporters.cpp, QuantizeLinear / DequantizeLinear importers (scale and "
    "zero-point checks, block inference from the scale's shape)",
    "quantized-types": "TensorRT developer guide, 'Working with Quantized Types' (per-tensor activations, "
    "per-channel and block-wise weights, INT4 block sizes 64 / 128, strongly typed DQ outputs)",
    "release-notes": "TensorRT release notes 10.0-11.0 (opset ranges; Attention in 10.14; RotaryEmbedding, "
    "RMSNormalization, TensorScatter in 10.15; FP8 / FP4 blocked quantization in 11.0)",
}


@dataclass(frozen=True)
class Rule:
    id: str
    text: str
    source: str


RULES: dict[str, Rule] = {
    rule.id: rule
    for rule in (
        Rule("opset", "the ONNX opset must be in the parser's documented range", "release-notes"),
        Rule("op-supported", "every op must be in the parser's op table for this TensorRT", "operators"),
        Rule("op-dtype", "every op's tensors must have a type the op table lists for it", "operators"),
        Rule("constant-axes", "Reduce* / Squeeze / Unsqueeze axes and CumSum's axis must be build-time constants",
             "operators"),
        Rule("topk-k", "TopK's K must be a constant below 3840", "operators"),
        Rule("scale-positive", "Q/DQ scales must be constant, finite and strictly positive", "parser"),
        Rule("zero-point-zero", "Q/DQ zero points must be constant zeros (symmetric quantization only)", "parser"),
        Rule("symmetric-scheme", "a quantized type with zero points (mexport's --asymmetric uint4, ONNX Runtime's "
             "asymmetric int4) is for ONNX Runtime only: TensorRT's IDequantizeLayer rejects non-zero zero points",
             "parser"),
        Rule("scale-rank", "Q/DQ scales have rank <= 2: scalar (per-tensor), 1-D (per-channel, the size of the "
             "axis) or the input's rank (block-wise)", "parser"),
        Rule("activation-per-tensor", "an activation (non-constant input) is quantized per tensor: scalar scale",
             "quantized-types"),
        Rule("blocked", "block-wise scales block exactly one of the last two dimensions of a constant; INT4 only "
             "before TensorRT 11 (INT4, FP8, FP4 from 11.0)", "quantized-types"),
        Rule("block-size", "INT4 block-wise quantization uses block size 64 or 128", "quantized-types"),
        Rule("int4-even", "an INT4 tensor has an even number of elements (two per byte)", "quantized-types"),
        Rule("dq-output-dtype", "a DequantizeLinear's output dtype (its scale's, or output_dtype) is the float "
             "dtype its consumer computes in", "quantized-types"),
        Rule("q-scale-dtype", "a QuantizeLinear's FP16 / BF16 scale has its input's dtype (FP32 is accepted)",
             "parser"),
    )
}

# highest ONNX opset each TensorRT release's parser documents (lowest: 9); a later opset needs a later release
OPSETS = ((20, "10.0"), (24, "10.15"), (25, "11.5"))
PARSER_MIN_OPSET = 9  # the lowest opset TensorRT's ONNX parser documents

FLOATS = ("FP32", "FP16", "BF16")
INTS = ("INT32", "INT64")
EVERY = (*FLOATS, *INTS, "BOOL")
QUANTIZED = ("INT8", "FP8", "FP4", "INT4")


@dataclass(frozen=True)
class OpRule:
    """An op's row in the parser's table: supported types, first release, which tensor the types are of."""

    dtypes: tuple[str, ...]
    since: str = "10.0"
    typed: str = "input0"  # "input0", "input1" (Where's data), "output0" (constants), "io" (Cast), "any" (Shape)


OPS: dict[str, OpRule] = {
    **{op: OpRule((*FLOATS, *INTS)) for op in ("Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Max", "Min",
                                                 "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Sign",
                                                 "Range", "Relu", "Mod")},
    **{op: OpRule(FLOATS) for op in ("MatMul", "Gemm", "Softmax", "LogSoftmax", "Tanh", "Sqrt", "Sin", "Cos",
                                     "Exp", "Log", "Erf", "Sigmoid", "Reciprocal", "Floor", "Ceil", "Round",
                                     "LayerNormalization")},
    **{op: OpRule((*FLOATS, *INTS)) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                                 "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp")},
    **{op: OpRule(EVERY) for op in ("Concat", "Expand", "Flatten", "Gather", "GatherElements", "GatherND",
                                    "Identity", "Reshape", "Slice", "Split", "Squeeze", "Unsqueeze", "Transpose",
                                    "Tile", "Trilu", "If", "Loop")},
    **{op: OpRule(("BOOL",)) for op in ("And", "Or", "Not", "Xor")},
    "Where": OpRule(EVERY, typed="input1"),
    "Shape": OpRule(EVERY, typed="any"),
    "Size": OpRule(EVERY, typed="any"),
    "Cast": OpRule((*EVERY, "UINT8"), typed="io"),
    "CastLike": OpRule((*EVERY, "UINT8"), typed="io"),
    "Constant": OpRule((*EVERY, "FP8", "FP4", "INT4"), typed="output0"),
    "ConstantOfShape": OpRule((*EVERY, "FP8", "FP4", "INT4"), typed="output0"),
    "CumSum": OpRule(FLOATS),
    "Gelu": OpRule((*FLOATS, "INT8", *INTS)),
    "TopK": OpRule((*FLOATS, *INTS)),
    "ScatterND": OpRule((*FLOATS, *INTS)),
    "ScatterElements": OpRule((*FLOATS, *INTS)),
    "QuantizeLinear": OpRule(FLOATS),
    "DequantizeLinear": OpRule(QUANTIZED),
    "Attention": OpRule((*FLOATS, "INT8", "FP8"), since="10.14"),
    "RMSNormalization": OpRule(FLOATS, since="10.15"),
    "RotaryEmbedding": OpRule(FLOATS, since="10.15"),
    "TensorScatter": OpRule((*FLOATS, "INT32"), since="10.15"),
}
AXES_INPUT_OPS = {"Squeeze", "Unsqueeze", "CumSum"} | {op for op in OPS if op.startswith("Reduce")}
INT4_BLOCK_SIZES = (64, 128)
TOPK_MAX_K = 3840
BLOCKED_TYPES_BEFORE_11 = ("INT4",)

# ONNX TensorProto element type names -> the operator table's names
ONNX_TYPE_NAMES = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT32": "INT32", "INT64": "INT64",
    "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "INT4": "INT4", "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4",
}


@dataclass(frozen=True)
class Violation:
    """One broken rule: where, which rule, what was seen, for which TensorRT."""

    node: str
    op: str
    rule: str
    detail: str
    tensorrt: str

    def __str__(self) -> str:
        rule = RULES[self.rule].text
        return f"node {self.node!r} ({self.op}): {self.detail} [rule {self.rule}: {rule}; TensorRT {self.tensorrt}]"


def first_tensorrt_for_opset(opset: int) -> str | None:
    """The first TensorRT release whose parser documents ``opset``; None when none does."""
    return next((version for highest, version in OPSETS if PARSER_MIN_OPSET <= opset <= highest), None)


class _Graph:
    """The ONNX graph without its weights, with inferred element types and constants read on demand."""

    def __init__(self, model: Any, base_dir: Path) -> None:
        onnx = require("onnx", "checking graphs against TensorRT's rules")
        self.onnx = onnx
        self.base_dir = base_dir
        inferred = onnx.shape_inference.infer_shapes(model)
        graph = inferred.graph
        self.graph = graph
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
        self.types: dict[str, str] = {}
        self.shapes: dict[str, tuple[int | str, ...]] = {}
        for info in [*graph.value_info, *graph.input, *graph.output]:
            tensor_type = info.type.tensor_type
            self.types[info.name] = self._type_name(tensor_type.elem_type)
            self.shapes[info.name] = tuple(dim.dim_value or dim.dim_param for dim in tensor_type.shape.dim)
        for tensor in graph.initializer:
            self.types[tensor.name] = self._type_name(tensor.data_type)
            self.shapes[tensor.name] = tuple(tensor.dims)
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def _type_name(self, elem_type: int) -> str:
        name = str(self.onnx.TensorProto.DataType.Name(elem_type))
        return ONNX_TYPE_NAMES.get(name, name)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def value(self, name: str) -> np.ndarray | None:
        """A constant's values (initializer, external data included, or Constant node); None for activations."""
        numpy_helper = self.onnx.numpy_helper
        if name in self.initializers:
            return np.asarray(numpy_helper.to_array(self.initializers[name], base_dir=str(self.base_dir)))
        if name in self.constants:
            attribute = next(a for a in self.constants[name].attribute if a.name == "value")
            return np.asarray(numpy_helper.to_array(attribute.t))
        return None


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _label(node: Any) -> str:
    return str(node.name or (node.output[0] if node.output else node.op_type))


def _op_violations(graph: _Graph, node: Any, version: str) -> Iterator[tuple[str, str]]:
    """(rule, detail) for the op table: presence, first release, dtypes, constant axes, TopK's K."""
    rule = OPS.get(node.op_type)
    if node.domain not in ("", "ai.onnx") or rule is None:
        yield "op-supported", (
            f"{node.domain + '.' if node.domain else ''}{node.op_type} is not in mexport's table of "
            "ops TensorRT's parser documents"
        )
        return
    if version_tuple(version) < version_tuple(rule.since):
        yield "op-supported", f"{node.op_type} is parsed from TensorRT {rule.since}"
    tensors = {
        "input0": node.input[:1], "input1": node.input[1:2], "output0": node.output[:1],
        "io": [*node.input[:1], *node.output[:1]], "any": [],
    }[rule.typed]
    for name in tensors:
        dtype = graph.types.get(name)
        if dtype is not None and dtype not in rule.dtypes:
            yield "op-dtype", f"tensor {name!r} is {dtype}; {node.op_type} takes {', '.join(rule.dtypes)}"
    if node.op_type in AXES_INPUT_OPS and len(node.input) > 1 and node.input[1] and not graph.is_constant(
        node.input[1]
    ):
        yield "constant-axes", f"axes input {node.input[1]!r} is computed at run time"
    if node.op_type == "TopK":
        k = graph.value(node.input[1])
        if k is None or int(k.reshape(-1)[0]) >= TOPK_MAX_K:
            yield "topk-k", f"K is {'not a constant' if k is None else int(k.reshape(-1)[0])}"


def _qdq_violations(graph: _Graph, node: Any, version: str) -> Iterator[tuple[str, str]]:
    """(rule, detail) for one QuantizeLinear / DequantizeLinear."""
    data, scale_name = node.input[0], node.input[1]
    zero_point = node.input[2] if len(node.input) > 2 else ""
    scale = graph.value(scale_name)
    if scale is None:
        yield "scale-positive", f"scale {scale_name!r} is computed at run time"
        return
    values = scale.astype(np.float64)
    if not (np.isfinite(values).all() and (values > 0).all()):
        yield "scale-positive", (
            f"scale {scale_name!r} has {int((~(np.isfinite(values) & (values > 0))).sum())} "
            f"non-positive or non-finite value(s) (min {float(np.nanmin(values)):g})"
        )
    if zero_point:
        points = graph.value(zero_point)
        if points is None or np.any(points.astype(np.float64) != 0):
            yield "zero-point-zero", f"zero point {zero_point!r} is {'not constant' if points is None else 'non-zero'}"
    constant = graph.is_constant(data)
    shape = graph.shapes.get(data, ())
    quantized_type = graph.types.get(data if node.op_type == "DequantizeLinear" else node.output[0], "?")
    scheme = next((scheme for scheme in SCHEMES.values() if scheme.onnx_type == quantized_type), None)
    if scheme is not None and not scheme.symmetric:
        yield "symmetric-scheme", (
            f"{quantized_type} ({scheme.name}) weights with zero points: {scheme.tensorrt}; re-quantize without "
            "--asymmetric for TensorRT"
        )
    if scale.ndim > 2:
        yield "scale-rank", f"scale {scale_name!r} has rank {scale.ndim}"
    elif scale.size > 1 and not constant:
        yield "activation-per-tensor", f"activation {data!r} has a {scale.ndim}-D scale of {scale.size} values"
    elif scale.ndim == 1 and scale.size > 1:
        axis = int(_attribute(node, "axis", 1))
        if shape and isinstance(shape[axis], int) and shape[axis] != scale.size:
            yield "scale-rank", f"per-channel scale of {scale.size} values on axis {axis} of shape {list(shape)}"
    elif scale.ndim >= 2 and scale.size > 1:
        yield from _blocked_violations(node, data, scale.shape, shape, quantized_type, version)
    dims = [d for d in shape if isinstance(d, int)]
    if quantized_type == "INT4" and shape and len(dims) == len(shape) and int(np.prod(dims)) % 2:
        yield "int4-even", f"INT4 tensor {data!r} of shape {list(shape)} has an odd element count"
    if node.op_type == "QuantizeLinear":
        scale_type, input_type = graph.types.get(scale_name), graph.types.get(data)
        if scale_type in ("FP16", "BF16") and input_type != scale_type:
            yield "q-scale-dtype", f"scale {scale_name!r} is {scale_type} and input {data!r} is {input_type}"
    else:
        yield from _dq_output_violations(graph, node)


def _blocked_violations(
    node: Any, data: str, scale_shape: tuple[int, ...], shape: tuple[int | str, ...], quantized: str, version: str
) -> Iterator[tuple[str, str]]:
    if len(scale_shape) != len(shape) or not all(isinstance(d, int) for d in shape):
        yield "scale-rank", f"scale of shape {list(scale_shape)} for input {data!r} of shape {list(shape)}"
        return
    blocked = [axis for axis, (d, s) in enumerate(zip(shape, scale_shape, strict=True)) if d != s]
    allowed = BLOCKED_TYPES_BEFORE_11 if version_tuple(version) < (11,) else ("INT4", "FP8", "FP4")
    if len(blocked) != 1 or blocked[0] < len(shape) - 2:
        yield "blocked", f"scale {list(scale_shape)} blocks axes {blocked} of shape {list(shape)}"
        return
    if quantized not in allowed:
        yield "blocked", f"{quantized} is block-quantized; TensorRT {version} blocks {', '.join(allowed)} only"
    axis = blocked[0]
    size, blocks = int(shape[axis]), int(scale_shape[axis])
    if size % blocks:
        yield "blocked", f"axis {axis} of {size} does not split into {blocks} whole blocks"
    elif quantized == "INT4" and size // blocks not in INT4_BLOCK_SIZES:
        yield "block-size", (
            f"INT4 block size {size // blocks} (axis {axis} of {size} in {blocks} blocks); "
            f"TensorRT takes {' or '.join(map(str, INT4_BLOCK_SIZES))}"
        )


def _dq_output_violations(graph: _Graph, node: Any) -> Iterator[tuple[str, str]]:
    output = node.output[0]
    produced = graph.types.get(output)
    for consumer in graph.consumers.get(output, []):
        others = {graph.types.get(name) for name in consumer.input if name and name != output}
        floats = sorted(dtype for dtype in others if dtype in FLOATS)
        if produced is not None and floats and produced not in floats:
            yield "dq-output-dtype", (
                f"output {output!r} is {produced} and its consumer {_label(consumer)!r} "
                f"({consumer.op_type}) computes in {', '.join(floats)}"
            )


def check_graph(model_dir: Path, tensorrt_version: str) -> list[Violation]:
    """Every rule violation of ``model_dir/model.onnx`` for TensorRT ``tensorrt_version``."""
    onnx = require("onnx", "checking graphs against TensorRT's rules")
    model = onnx.load(str(Path(model_dir) / GRAPH_FILE), load_external_data=False)
    graph = _Graph(model, Path(model_dir))
    violations = []
    first = first_tensorrt_for_opset(graph.opset)
    if first is None or version_tuple(tensorrt_version) < version_tuple(first):
        documented = f"is outside every documented range ({PARSER_MIN_OPSET}-{OPSETS[-1][0]})"
        reason = f"needs TensorRT {first}" if first else documented
        violations.append(Violation("<model>", "opset_import", "opset", f"opset {graph.opset} {reason}",
                                    tensorrt_version))
    for node in graph.graph.node:
        found = list(_op_violations(graph, node, tensorrt_version))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found += list(_qdq_violations(graph, node, tensorrt_version))
        violations += [Violation(_label(node), node.op_type, rule, detail, tensorrt_version) for rule, detail in found]
    return violations


def require_compatible(model_dir: Path, tensorrt_version: str, shown: int = 10) -> int:
    """Raise :class:`MexportError` listing the violations (the first ``shown``); returns the rules checked."""
    violations = check_graph(model_dir, tensorrt_version)
    if violations:
        lines = "\n".join(f"  - {violation}" for violation in violations[:shown])
        more = f"\n  ... and {len(violations) - shown} more" if len(violations) > shown else ""
        raise MexportError(
            f"{model_dir}: TensorRT {tensorrt_version}'s ONNX parser would refuse this graph "
            f"({len(violations)} violation(s)):\n{lines}{more}",
            hint="re-export / re-quantize with a current mexport, or plan for another --tensorrt-version; the rules "
            "and their sources are in docs/engine.md",
        )
    return len(RULES)
