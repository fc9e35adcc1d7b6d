"""The static TensorRT compatibility check: one crafted graph per rule is refused, every real output passes.

Crafted graphs are a few nodes around a MatMul with Q/DQ, built with onnx.helper; the real outputs are the tiny
model's exports in every dtype and its four quantized recipes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import MexportError
from mexport.manifest import file_records, read_manifest, write_manifest
from mexport.optimize.engine import EngineSettings, plan_engine
from mexport.optimize.engine.compat import OPS, RULES, SOURCES, check_graph, require_compatible

F32, BF16, I8, I4, FP8 = (TensorProto.FLOAT, TensorProto.BFLOAT16, TensorProto.INT8, TensorProto.INT4,
                          TensorProto.FLOAT8E4M3FN)


def tensor(name: str, values: Any, elem_type: int = F32) -> TensorProto:
    values = np.asarray(values)
    if elem_type in (I4, FP8, BF16):  # onnx.helper packs these from float / int values
        return helper.make_tensor(name, elem_type, values.shape, values.reshape(-1).tolist())
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(elem_type)), name)


def save(directory: Path, nodes: list[Any], inputs: list[Any], initializers: list[Any], opset: int = 21,
         outputs: list[Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    outputs = outputs or [helper.make_tensor_value_info("Y", F32, None)]
    graph = helper.make_graph(nodes, "crafted", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(directory / "model.onnx"))
    return directory


def qdq_matmul(directory: Path, *, act_scale: Any = 0.05, weight: Any = None, weight_type: int = I8,
               weight_scale: Any = None, weight_zero: Any = None, axis: int | None = 1, block: int | None = None,
               scale_type: int = F32, opset: int = 21) -> Path:
    """Y = DQ(Q(X)) @ DQ(W): a per-tensor activation and a per-channel (or blocked) weight, as mexport writes."""
    weight = np.ones((64, 32)) if weight is None else np.asarray(weight)
    weight_scale = np.full(32, 0.01) if weight_scale is None else np.asarray(weight_scale)
    initializers = [
        tensor("s_x", act_scale, scale_type), tensor("z_x", np.zeros(np.shape(act_scale)), I8),
        tensor("W", weight, weight_type), tensor("s_w", weight_scale, scale_type),
    ]
    weight_inputs = ["W", "s_w"]
    if weight_zero is not None:
        initializers.append(tensor("z_w", weight_zero, weight_type))
        weight_inputs.append("z_w")
    attributes: dict[str, int] = {} if axis is None else {"axis": axis}
    if block is not None:
        attributes["block_size"] = block
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "s_x", "z_x"], ["Xq"], name="act_q", axis=1),
        helper.make_node("DequantizeLinear", ["Xq", "s_x", "z_x"], ["Xd"], name="act_dq", axis=1),
        helper.make_node("DequantizeLinear", weight_inputs, ["Wd"], name="weight_dq", **attributes),
        helper.make_node("MatMul", ["Xd", "Wd"], ["Y"], name="matmul"),
    ]
    x_type = BF16 if scale_type == BF16 else F32
    inputs = [helper.make_tensor_value_info("X", x_type, [2, weight.shape[0]])]
    return save(directory, nodes, inputs, initializers, opset=opset,
                outputs=[helper.make_tensor_value_info("Y", x_type, None)])


def rules_of(directory: Path, version: str = "10.15") -> set[tuple[str, str, str]]:
    return {(violation.node, violation.rule, violation.tensorrt) for violation in check_graph(directory, version)}


def test_the_crafted_baseline_passes(tmp_path: Path) -> None:
    assert check_graph(qdq_matmul(tmp_path / "ok"), "10.15") == []
    assert check_graph(qdq_matmul(tmp_path / "int4", weight_type=I4, weight_scale=np.full((1, 32), 0.01), axis=0,
                                  block=64), "10.15") == []


CRAFTED: dict[str, tuple[dict[str, Any], tuple[str, str]]] = {
    "scale-positive": ({"weight_scale": np.r_[-0.01, np.full(31, 0.01)]}, ("weight_dq", "scale-positive")),
    "zero-point-zero": ({"weight_zero": np.r_[3, np.zeros(31)]}, ("weight_dq", "zero-point-zero")),
    "activation-per-tensor": ({"act_scale": np.full(64, 0.05)}, ("act_q", "activation-per-tensor")),
    "per-channel size": ({"weight_scale": np.full(16, 0.01)}, ("weight_dq", "scale-rank")),
    "scale rank 3": ({"weight_scale": np.full((1, 1, 32), 0.01), "axis": None}, ("weight_dq", "scale-rank")),
    "blocked fp8 on 10.x": ({"weight_type": FP8, "weight_scale": np.full((1, 32), 0.01), "axis": 0, "block": 64},
                            ("weight_dq", "blocked")),
    "int4 block size": ({"weight_type": I4, "weight_scale": np.full((2, 32), 0.01), "axis": 0, "block": 32},
                        ("weight_dq", "block-size")),
    "int4 odd elements": ({"weight": np.ones((63, 1)), "weight_type": I4, "weight_scale": 0.01, "axis": None},
                          ("weight_dq", "int4-even")),
    "dq output dtype": ({}, ("weight_dq", "dq-output-dtype")),  # built below: a bf16 weight scale
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_each_qdq_rule_refuses_its_crafted_graph(case: str, tmp_path: Path) -> None:
    options, (node, rule) = CRAFTED[case]
    if case == "dq output dtype":  # the weight's scale in bf16, the activation in fp32: a bf16 Wd meets an fp32 Xd
        directory = qdq_matmul(tmp_path / "g")
        model = onnx.load(str(directory / "model.onnx"))
        scale = next(t for t in model.graph.initializer if t.name == "s_w")
        scale.CopyFrom(tensor("s_w", np.full(32, 0.01), BF16))
        onnx.save(model, str(directory / "model.onnx"))
    else:
        directory = qdq_matmul(tmp_path / "g", **options)
    assert (node, rule, "10.15") in rules_of(directory)


def test_blocked_fp8_is_allowed_from_tensorrt_11(tmp_path: Path) -> None:
    options = CRAFTED["blocked fp8 on 10.x"][0]
    assert not any(rule == "blocked" for _, rule, _ in rules_of(qdq_matmul(tmp_path / "g", **options), "11.4"))


def test_q_scale_dtype_must_match_its_input(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "s", "z"], ["Xq"], name="q"),
        helper.make_node("DequantizeLinear", ["Xq", "s32", "z"], ["Y"], name="dq"),
    ]
    initializers = [tensor("s", 0.05, BF16), tensor("s32", 0.05), tensor("z", 0, I8)]
    directory = save(tmp_path / "g", nodes, [helper.make_tensor_value_info("X", F32, [2, 4])], initializers)
    assert ("q", "q-scale-dtype", "10.15") in rules_of(directory)


def _single(directory: Path, node: Any, inputs: list[Any], initializers: list[Any] = (), opset: int = 21) -> Path:
    return save(directory, [node], inputs, list(initializers), opset=opset)


def test_op_table_rules(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("X", F32, [2, 4])
    det = _single(tmp_path / "det", helper.make_node("Det", ["X"], ["Y"], name="det"),
                  [helper.make_tensor_value_info("X", F32, [4, 4])])
    assert ("det", "op-supported", "10.15") in rules_of(det)
    double = save(tmp_path / "double", [helper.make_node("Cast", ["X"], ["D"], name="to_double", to=TensorProto.DOUBLE),
                                        helper.make_node("Sqrt", ["D"], ["Y"], name="sqrt")], [x], [])
    assert {("to_double", "op-dtype", "10.15"), ("sqrt", "op-dtype", "10.15")} <= rules_of(double)
    axes = _single(tmp_path / "axes", helper.make_node("ReduceMean", ["X", "A"], ["Y"], name="mean"),
                   [x, helper.make_tensor_value_info("A", TensorProto.INT64, [1])])
    assert ("mean", "constant-axes", "10.15") in rules_of(axes)
    topk = save(tmp_path / "topk", [helper.make_node("TopK", ["X", "K"], ["Y", "I"], name="topk")],
                [helper.make_tensor_value_info("X", F32, [2, 5000])], [tensor("K", [4000], TensorProto.INT64)])
    assert ("topk", "topk-k", "10.15") in rules_of(topk)
    rms = _single(tmp_path / "rms", helper.make_node("RMSNormalization", ["X", "G"], ["Y"], name="rms"), [x],
                  [tensor("G", np.ones(4))], opset=23)
    assert ("rms", "op-supported", "10.14") in rules_of(rms, "10.14")  # parsed from 10.15
    assert check_graph(rms, "10.15") == []


def test_opset_range_follows_the_version(tmp_path: Path) -> None:
    directory = qdq_matmul(tmp_path / "g")  # opset 21: documented from TensorRT 10.15
    assert ("<model>", "opset", "10.13") in rules_of(directory, "10.13")
    with pytest.raises(MexportError) as error:
        require_compatible(directory, "10.13")
    message = error.value.message
    assert "TensorRT 10.13's ONNX parser would refuse this graph (1 violation(s))" in message
    assert "node '<model>' (opset_import): opset 21 needs TensorRT 10.15 [rule opset:" in message


def test_rule_table_cites_its_sources() -> None:
    assert all(rule.source in SOURCES for rule in RULES.values())
    assert {"DequantizeLinear", "QuantizeLinear", "MatMul", "Softmax", "Gather"} <= set(OPS)


# -- real outputs ----------------------------------------------------------------------------------------------

RECIPES = ("fp8", "int8-sq", "int8-wo", "int4-wo")


@pytest.fixture(scope="module")
def quantized(tiny_export_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mexport.optimize import quantize

    root = tmp_path_factory.mktemp("compat-quantized")
    return {
        recipe: quantize(tiny_export_bf16, root / recipe, recipe, calib_size=4, check_prompts=1).output
        for recipe in RECIPES
    }


@pytest.mark.slow
@pytest.mark.parametrize("version", ["10.15", "11.4"])
def test_every_export_dtype_and_recipe_output_passes(
    version: str, tiny_export_fp32: Path, tiny_export_bf16: Path, quantized: dict[str, Path]
) -> None:
    for directory in (tiny_export_fp32, tiny_export_bf16, *quantized.values()):
        assert check_graph(directory, version) == [], directory
    plan = plan_engine(quantized["int4-wo"], EngineSettings(max_context=256, tensorrt_version=version))
    assert plan.compatibility == {"checked": True, "rules": len(RULES), "tensorrt": version}


@pytest.mark.slow
def test_plan_refuses_a_quantized_model_with_one_negative_scale(quantized: dict[str, Path], tmp_path: Path) -> None:
    """The parser refuses a negative DequantizeLinear scale, and so does the plan (exit 2)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(quantized["int8-wo"], broken)
    model = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    dq = next(node for node in model.graph.node if node.op_type == "DequantizeLinear")
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    values = numpy_helper.to_array(scale, base_dir=str(broken)).astype(np.float32)
    values.reshape(-1)[0] = -values.reshape(-1)[0]
    scale.CopyFrom(tensor(scale.name, values, scale.data_type))
    onnx.save(model, str(broken / "model.onnx"))
    manifest = read_manifest(broken)
    manifest["files"] = file_records(broken)  # a quantizer bug, not tampering: the manifest describes the files
    write_manifest(broken, manifest)
    result = CliRunner().invoke(app, ["engine", str(broken), "-o", str(tmp_path / "plan"), "--plan",
                                      "--max-context", "256", "--tensorrt-version", "10.15", "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]["message"]
    assert f"node '{dq.name}' (DequantizeLinear)" in error and "non-positive" in error
    assert "rule scale-positive" in error and "TensorRT 10.15" in error
