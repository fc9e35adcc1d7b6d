"""Graph edits that implement the recipes: input-channel scaling (SmoothQuant / AWQ) and Q/DQ insertion.

Every edit keeps the graph runnable and topologically sorted; node names of the linear layers never change, so
the manifest's list of quantized nodes names MatMuls a reader can find in the output graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexport.formats import TRANSPOSED_SUFFIX
from mexport.lazy import require
from mexport.models import NORM_ONE_PLUS_WEIGHT, NORM_WEIGHT
from mexport.optimize.quantize.graph import Linear, ModelGraph
from mexport.optimize.quantize.numerics import (
    QuantizedWeight,
    activation_scale,
    column_slices,
    quantize_weight,
    storage_dtype,
)
from mexport.quant_schemes import SCHEMES

# ops a norm's output may pass through on its way to the linear layers (bf16 exports cast back after the norm)
PASS_THROUGH_OPS = {"Cast", "Identity"}
# readers that see only a tensor's shape, so scaling its values cannot change what they compute
SHAPE_ONLY_OPS = {"Shape", "Size"}


def _selects_positions(node: Any) -> bool:
    """A Gather of whole positions (axis 1), as lean graphs select the LM head's rows with ``logits_indices``:
    per-channel scaling commutes with it."""
    axes = [attribute.i for attribute in node.attribute if attribute.name == "axis"]
    return node.op_type == "Gather" and axes == [1]


def _element_type(scheme: str) -> int:
    return getattr(require("onnx").TensorProto, SCHEMES[scheme].onnx_type)


def _base_name(weight: str) -> str:
    """Stem for tensors derived from a weight (the exporter suffixes pre-transposed Linear weights)."""
    return weight.removesuffix(TRANSPOSED_SUFFIX)


def _first_in_graph_order(graph: ModelGraph, nodes: list[Any]) -> Any:
    order = {id(node): index for index, node in enumerate(graph.graph.node)}
    return min(nodes, key=lambda node: order[id(node)])


# ---- input-channel scaling -------------------------------------------------------------------------------------


def _norm_form(graph: ModelGraph, gamma: str) -> str | None:
    """The RMSNorm form whose weight ``gamma`` is: a stored weight ``w`` (through Casts), ``1 + w``, or neither."""
    producer = graph.producers().get(gamma)
    if gamma in graph.initializers:
        return NORM_WEIGHT
    if producer is None:
        return None
    if producer.op_type in PASS_THROUGH_OPS:
        return _norm_form(graph, producer.input[0])
    if producer.op_type == "Add":
        for index in (0, 1):
            one = graph.constant_value(producer.input[index])
            is_one = one is not None and one.size == 1 and float(one.reshape(())) == 1.0
            if is_one and _norm_form(graph, producer.input[1 - index]) == NORM_WEIGHT:
                return NORM_ONE_PLUS_WEIGHT
    return None


def _foldable_norm_scale(
    graph: ModelGraph, tensor: str, readers: list[Any], channels: int
) -> tuple[Any, int, np.ndarray] | None:
    """The ``Mul(x, gamma)`` that produced ``tensor``, the index of gamma and its value, when ``tensor``
    (through Casts) feeds only ``readers`` and gamma is a constant expression with one value per channel.

    That Mul is the last op of an RMSNorm (``normed * (1 + w)`` or ``normed * w``, the model family's
    ``graph.norm_form``; a gamma of another form is not folded), so scaling gamma scales ``tensor``.
    """
    producers = graph.producers()
    current, expected = tensor, {id(node) for node in readers}
    while True:
        value_readers = {id(node) for node in graph.consumers(current) if node.op_type not in SHAPE_ONLY_OPS}
        if graph.is_graph_output(current) or value_readers != expected:
            return None
        producer = producers.get(current)
        if producer is None:
            return None
        if producer.op_type in PASS_THROUGH_OPS or _selects_positions(producer):
            current, expected = producer.input[0], {id(producer)}
            continue
        if producer.op_type != "Mul":
            return None
        for index in (0, 1):
            gamma = graph.constant_value(producer.input[index])
            other_is_constant = graph.constant_value(producer.input[1 - index]) is not None
            if gamma is not None and not other_is_constant and gamma.size == channels == gamma.shape[-1]:
                if graph.norm_form is not None and _norm_form(graph, producer.input[index]) != graph.norm_form:
                    return None
                return producer, index, gamma
        return None


def scale_input_channels(graph: ModelGraph, layers: list[Linear], factors: np.ndarray) -> str:
    """Divide the shared input of ``layers`` by ``factors`` per channel and multiply each weight's input rows by
    them, leaving the function unchanged; returns how the division was done ("norm-fold" or "mul").

    Where the input is an RMSNorm output read only by these layers, the division folds into the norm's gamma
    (computed as a constant in float32, so a ``1 + w`` is never re-rounded); elsewhere an explicit
    ``Mul(x, 1/s)`` goes in front of them.
    """
    onnx = require("onnx")
    tensor = layers[0].input
    norm = _foldable_norm_scale(graph, tensor, [layer.node for layer in layers], layers[0].in_features)
    if norm is not None:
        mul, index, gamma = norm
        folded = (gamma.astype(np.float64) / factors.astype(np.float64).reshape(gamma.shape)).astype(gamma.dtype)
        mul.input[index] = graph.add_initializer(graph.unique_name(f"{mul.name}/smoothed_gamma"), folded)
        how = "norm-fold"
    else:
        activation_dtype = graph.numpy_dtype(layers[0].weight)
        inverse = graph.add_initializer(
            graph.unique_name(f"{tensor}_smooth_inverse"), (1.0 / factors.astype(np.float64)).astype(activation_dtype)
        )
        smoothed = graph.unique_name(f"{tensor}_smoothed")
        mul = onnx.helper.make_node("Mul", [tensor, inverse], [smoothed], name=graph.unique_name(f"{tensor}_Smooth"))
        graph.insert_before(_first_in_graph_order(graph, [layer.node for layer in layers]), [mul])
        for layer in layers:
            layer.node.input[0] = smoothed
        how = "mul"
    for layer in layers:
        _scale_weight_rows(graph, layer, factors)
    return how


def _scale_weight_rows(graph: ModelGraph, layer: Linear, factors: np.ndarray) -> None:
    """Point the layer at a new initializer ``W * factors[:, None]`` (computed when written); the original is
    dropped when nothing else reads it (a tied embedding stays for its Gather)."""
    source, transposed = layer.weight, layer.transposed
    dtype, numpy_dtype = graph.data_type(source), graph.numpy_dtype(source)
    name = graph.unique_name(f"{_base_name(source)}_smoothed")

    def compute() -> dict[str, np.ndarray]:
        weight = graph.weight_matrix(source, transposed)
        scaled = np.empty(weight.shape, dtype=numpy_dtype)
        for columns in column_slices(weight.shape):
            scaled[:, columns] = np.asarray(weight[:, columns], dtype=np.float32) * factors[:, None]
        return {name: scaled}

    graph.add_pending(name, {name: ((layer.in_features, layer.out_features), dtype)}, compute)
    layer.node.input[1] = name
    layer.weight, layer.transposed = name, False


# ---- Q/DQ insertion ----------------------------------------------------------------------------------------------


def quantize_layer_weight(
    graph: ModelGraph,
    layer: Linear,
    scheme: str,
    block_size: int | None,
    searched: QuantizedWeight | None = None,
) -> dict[str, str]:
    """Store the layer's weight quantized and read it through a DequantizeLinear; returns the new tensor names.

    ``searched``: values and scales already chosen (the int4 search); otherwise round-to-nearest when written.

    Per-channel: scale ``[out]``, ``axis=1``. Blocked (int4): scale ``[in / block, out]``, ``axis=0`` with the
    opset-21 ``block_size`` attribute, the layout TensorRT's blocked dequantization takes. Zero points (all zero)
    are written for fp8 and int8, whose Q/DQ type they declare; int4 omits them (symmetric); an asymmetric
    scheme's (uint4) come with ``searched``.
    """
    onnx = require("onnx")
    base = _base_name(layer.weight)
    names = {
        "values": graph.unique_name(f"{base}_quantized"),
        "scale": graph.unique_name(f"{base}_scale"),
    }
    if scheme != "int4":
        names["zero_point"] = graph.unique_name(f"{base}_zero_point")
    scale_dims = (layer.out_features,) if block_size is None else (layer.in_features // block_size, layer.out_features)
    scale_type = graph.data_type(layer.weight)
    scale_dtype = graph.numpy_dtype(layer.weight)
    shapes = {
        names["values"]: ((layer.in_features, layer.out_features), _element_type(scheme)),
        names["scale"]: (scale_dims, scale_type),
    }
    if "zero_point" in names:
        shapes[names["zero_point"]] = (scale_dims, _element_type(scheme))
    source, transposed = layer.weight, layer.transposed

    def compute() -> dict[str, np.ndarray]:
        quantized = searched or quantize_weight(graph.weight_matrix(source, transposed), scheme, scale_dtype, block_size)
        tensors = {names["values"]: quantized.values, names["scale"]: quantized.scale.astype(scale_dtype)}
        if "zero_point" in names:
            zero_point = quantized.zero_point
            tensors[names["zero_point"]] = (
                np.zeros(quantized.scale.shape, dtype=storage_dtype(scheme)) if zero_point is None else zero_point
            )
        return tensors

    graph.add_pending(names["values"], shapes, compute)
    attributes: dict[str, int] = {"axis": 1} if block_size is None else {"axis": 0, "block_size": block_size}
    dequantized = graph.unique_name(f"{base}_dequantized")
    inputs = [names["values"], names["scale"], *([names["zero_point"]] if "zero_point" in names else [])]
    dequantize = onnx.helper.make_node(
        "DequantizeLinear",
        inputs,
        [dequantized],
        name=graph.unique_name(f"{layer.name}_weight_DequantizeLinear"),
        **attributes,
    )
    graph.insert_before(layer.node, [dequantize])
    layer.node.input[1] = dequantized
    return names


def quantize_activation(graph: ModelGraph, layers: list[Linear], scheme: str, amax: float) -> np.ndarray:
    """One per-tensor QuantizeLinear -> DequantizeLinear pair on the input shared by ``layers``; returns the scale."""
    onnx = require("onnx")
    tensor = layers[0].input
    activation_dtype = graph.numpy_dtype(layers[0].weight)
    scale = activation_scale(amax, scheme, activation_dtype)
    scale_name = graph.add_initializer(graph.unique_name(f"{tensor}_scale"), scale)
    zero_point = graph.add_initializer(
        graph.unique_name(f"{tensor}_zero_point"), np.zeros((), dtype=storage_dtype(scheme))
    )
    quantized = graph.unique_name(f"{tensor}_quantized")
    dequantized = graph.unique_name(f"{tensor}_dequantized")
    nodes = [
        onnx.helper.make_node(
            "QuantizeLinear",
            [tensor, scale_name, zero_point],
            [quantized],
            name=graph.unique_name(f"{tensor}_QuantizeLinear"),
        ),
        onnx.helper.make_node(
            "DequantizeLinear",
            [quantized, scale_name, zero_point],
            [dequantized],
            name=graph.unique_name(f"{tensor}_DequantizeLinear"),
        ),
    ]
    graph.insert_before(_first_in_graph_order(graph, [layer.node for layer in layers]), nodes)
    for layer in layers:
        layer.node.input[0] = dequantized
    return scale
