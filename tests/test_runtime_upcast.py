"""The fp32-compute rewrites of bf16 / fp16 graphs, on small hand-built graphs holding every construct they must handle.

The graph: y = MatMul(DQ(Q(x)), DQ(w_q)) + bias + Constant(0.5) + Cast(ConstantOfShape(0.25) -> low) — Q/DQ with
low-precision scales (as the quantize stage writes), an external-data initializer, Constant / ConstantOfShape
values and a Cast targeting the low type. Values are exactly representable in bf16, so fp32 compute is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mexport.runtime.upcast import (
    BOUNDED_UPCAST_DISABLED_OPTIMIZERS,
    STORED_SUFFIX,
    bound_weight_upcasts,
    cast_outputs_to_float32,
    upcast_to_float32,
)

LOW_TYPES = [TensorProto.BFLOAT16, TensorProto.FLOAT16]
X = np.array([[0.5, -1.0, 2.0, 1.5], [-0.5, 3.0, 0.0, -2.0]], dtype=np.float32)
W_Q = np.array([[1, -2, 3], [4, 0, -1], [-3, 2, 2], [1, 1, -4]], dtype=np.int8)
W_SCALE = np.array([0.5, 0.25, 0.125], dtype=np.float32)
X_SCALE = np.float32(0.5)
BIAS = np.array([1.0, -2.0, 0.75], dtype=np.float32)


def expected_output() -> np.ndarray:
    x_dequantized = np.clip(np.round(X / X_SCALE), -128, 127) * X_SCALE
    return x_dequantized @ (W_Q.astype(np.float32) * W_SCALE) + BIAS + 0.5 + 0.25


def low_tensor(name: str, values: np.ndarray, low: int) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values).astype(helper.tensor_dtype_to_np_dtype(low)), name)


def build_graph(low: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
        helper.make_node("MatMul", ["x_dq", "w"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["biased"]),
        helper.make_node("Constant", [], ["half"], value=low_tensor("half", np.array(0.5), low)),
        helper.make_node("Add", ["biased", "half"], ["shifted"]),
        helper.make_node("Shape", ["shifted"], ["shape"]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["quarters_f32"], value=numpy_helper.from_array(np.array([0.25], np.float32))
        ),
        helper.make_node("Cast", ["quarters_f32"], ["quarters"], to=low),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=low_tensor("zero", np.array([0.0]), low)),
        helper.make_node("Add", ["shifted", "quarters"], ["summed"]),
        helper.make_node("Add", ["summed", "zeros"], ["y"]),
    ]
    initializers = [
        low_tensor("x_scale", np.array(X_SCALE), low),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(W_Q, "w_q"),
        low_tensor("w_scale", W_SCALE, low),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zero"),
        low_tensor("bias", BIAS, low),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_low_precision",
        [helper.make_tensor_value_info("x", low, ["batch", 4])],
        [helper.make_tensor_value_info("y", low, ["batch", 3])],
        initializers,
        value_info=[helper.make_tensor_value_info("product", low, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def session_options(external_data_dir: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about saving optimized graphs
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    return options


def run_on_cpu(model: onnx.ModelProto, external_data_dir: Path | None = None) -> np.ndarray:
    options = session_options(external_data_dir)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": X})[0]


@pytest.mark.parametrize("low", LOW_TYPES, ids=["bf16", "fp16"])
def test_upcast_graph_runs_on_cpu_with_exact_fp32_results(low: int) -> None:
    model = upcast_to_float32(build_graph(low))
    onnx.checker.check_model(model, full_check=True)
    output = run_on_cpu(model)
    assert output.dtype == np.float32
    np.testing.assert_allclose(output, expected_output(), rtol=1e-6)


@pytest.mark.parametrize("low", LOW_TYPES, ids=["bf16", "fp16"])
def test_no_low_precision_type_is_left(low: int) -> None:
    model = upcast_to_float32(build_graph(low))
    graph = model.graph
    types = [value.type.tensor_type.elem_type for value in [*graph.input, *graph.output, *graph.value_info]]
    types += [tensor.data_type for tensor in graph.initializer]
    for node in graph.node:
        types += [attribute.t.data_type for attribute in node.attribute if attribute.type == onnx.AttributeProto.TENSOR]
        types += [attribute.i for attribute in node.attribute if attribute.name == "to"]
    assert low not in types


def test_external_initializers_keep_their_stored_bytes(tmp_path: Path) -> None:
    onnx.save(
        build_graph(TensorProto.BFLOAT16),
        tmp_path / "model.onnx",
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    stored_bytes = (tmp_path / "model.onnx.data").read_bytes()
    model = upcast_to_float32(onnx.load(tmp_path / "model.onnx", load_external_data=False))

    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    assert stored["bias" + STORED_SUFFIX].data_type == TensorProto.BFLOAT16  # still read from the file as bf16
    casts = [node for node in model.graph.node if node.op_type == "Cast" and node.output[0] == "bias"]
    assert len(casts) == 1 and casts[0].input[0] == "bias" + STORED_SUFFIX
    np.testing.assert_allclose(run_on_cpu(model, external_data_dir=tmp_path), expected_output(), rtol=1e-6)
    assert (tmp_path / "model.onnx.data").read_bytes() == stored_bytes


def test_cast_outputs_to_float32_appends_a_final_cast() -> None:
    model = cast_outputs_to_float32(build_graph(TensorProto.FLOAT16), ["y"])
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.node[-1].op_type == "Cast" and model.graph.node[-1].output[0] == "y"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    output = session.run(["y"], {"x": X.astype(np.float16)})[0]
    assert output.dtype == np.float32
    np.testing.assert_allclose(output, expected_output(), rtol=1e-3)


# bound_weight_upcasts: a tied embedding (Gather + Transpose -> MatMul LM head) and a Linear weight, stored as bf16
# external data; slices of at most SLICE_BYTES in fp32 (3 rows of the 12 x 4 table, 3 columns of the 4 x 10 weight)
VOCAB, HIDDEN, OUT = 12, 4, 10
SLICE_BYTES = 3 * HIDDEN * 4
IDS = np.array([[3, 0, 11, 7], [5, 5, 1, 2]], dtype=np.int64)


def bf16_exact(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random float32 values that bf16 represents exactly (so the upcast is exact and results are comparable)."""
    return (np.random.default_rng(seed).integers(-64, 64, shape) / 32).astype(np.float32)


TABLE, WEIGHT = bf16_exact((VOCAB, HIDDEN), 1), bf16_exact((HIDDEN, OUT), 2)


def save_tied_graph(directory: Path) -> Path:
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "weight"], ["projected"]),
        helper.make_node("Transpose", ["table"], ["head"], perm=[1, 0]),
        helper.make_node("MatMul", ["hidden", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info("projected", TensorProto.BFLOAT16, ["batch", "sequence", OUT]),
            helper.make_tensor_value_info("logits", TensorProto.BFLOAT16, ["batch", "sequence", VOCAB]),
        ],
        [low_tensor("table", TABLE, TensorProto.BFLOAT16), low_tensor("weight", WEIGHT, TensorProto.BFLOAT16)],
    )
    path = directory / "model.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def bounded_session(path: Path, disabled_optimizers: list[str], optimized: Path | None = None) -> ort.InferenceSession:
    model = bound_weight_upcasts(upcast_to_float32(onnx.load(path, load_external_data=False)), SLICE_BYTES)
    options = session_options(path.parent)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled_optimizers
    )


def test_bounded_upcasts_compute_exactly_what_the_upcast_graph_does(tmp_path: Path) -> None:
    path = save_tied_graph(tmp_path)
    projected, logits = bounded_session(path, BOUNDED_UPCAST_DISABLED_OPTIMIZERS).run(None, {"ids": IDS})
    hidden = TABLE[IDS]
    np.testing.assert_array_equal(projected, hidden @ WEIGHT)
    np.testing.assert_array_equal(logits, hidden @ TABLE.T)
    folded = ort.InferenceSession(  # ORT's default optimizations: casts folded into fp32 weights at load
        upcast_to_float32(onnx.load(path, load_external_data=False)).SerializeToString(),
        session_options(tmp_path),
        providers=["CPUExecutionProvider"],
    )
    for bounded, expected in zip((projected, logits), folded.run(None, {"ids": IDS}), strict=True):
        np.testing.assert_array_equal(bounded, expected)


def test_no_whole_fp32_copy_of_a_large_weight_is_left(tmp_path: Path) -> None:
    model = upcast_to_float32(onnx.load(save_tied_graph(tmp_path), load_external_data=False))
    graph = bound_weight_upcasts(model, SLICE_BYTES).graph
    stored = {"table" + STORED_SUFFIX, "weight" + STORED_SUFFIX}
    readers = [node for node in graph.node if stored & set(node.input)]
    assert {node.op_type for node in readers} == {"Gather", "Slice"}  # no Cast / Transpose of a whole weight
    gather = next(node for node in readers if node.op_type == "Gather")
    assert gather.input[:] == ["table" + STORED_SUFFIX, "ids"]
    bounds = {t.name: int(numpy_helper.to_array(t)[0]) for t in graph.initializer if t.data_type == TensorProto.INT64}
    widths: dict[str, list[int]] = {}
    for node in readers:
        if node.op_type == "Slice":
            widths.setdefault(node.input[0], []).append(bounds[node.input[2]] - bounds[node.input[1]])
    # 3 rows of the table (transposed in the graph), 3 columns of the weight: 3 x 4 fp32 values per slice
    assert widths == {"table" + STORED_SUFFIX: [3, 3, 3, 3], "weight" + STORED_SUFFIX: [3, 3, 3, 1]}


@pytest.mark.parametrize(
    ("disabled", "undone_by"),
    [(BOUNDED_UPCAST_DISABLED_OPTIMIZERS, None), (["ConstantFolding"], "Split"), ([], "fp32 initializers")],
    ids=["bounded", "split-fusion-left", "default-optimizers"],
)
def test_onnxruntime_runs_the_bounded_casts_only_without_those_optimizers(
    tmp_path: Path, disabled: list[str], undone_by: str | None
) -> None:
    """What ORT actually runs (its optimized graph): with BOUNDED_UPCAST_DISABLED_OPTIMIZERS the stored weights are
    read slice by slice; each of those optimizers left on undoes it (fp32 initializers, or one Split of all slices)."""
    optimized = tmp_path / "optimized.onnx"
    bounded_session(save_tied_graph(tmp_path), disabled, optimized)
    graph = onnx.load(optimized, load_external_data=False).graph
    undone = []
    if any(tensor.data_type == TensorProto.FLOAT for tensor in graph.initializer):
        undone.append("fp32 initializers")
    if any(node.op_type == "Split" for node in graph.node):
        undone.append("Split")
    assert undone == ([undone_by] if undone_by else [])
