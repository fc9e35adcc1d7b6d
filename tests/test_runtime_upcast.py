"""The fp32-compute rewrite of bf16 / fp16 graphs, on small hand-built graphs holding every construct it must handle.

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

from mexport.runtime.upcast import STORED_SUFFIX, cast_outputs_to_float32, upcast_to_float32

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


def run_on_cpu(model: onnx.ModelProto, external_data_dir: Path | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
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
