"""End-to-end exports of the fixture checkpoints: parity with PyTorch, storage layout, byte-exact weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mexport.errors import MexportError, ValidationFailedError
from mexport.manifest import STAMP_NAME, sha256_file

pytestmark = pytest.mark.slow


def _manifest(export_dir: Path) -> dict:
    return json.loads((export_dir / "mexport.json").read_text())


def _initializers(export_dir: Path) -> list:
    import onnx

    return list(onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph.initializer)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mexport.fixtures.tiny_gemma2 import make_fixture

    return make_fixture(tmp_path_factory.mktemp("ckpt") / "wide-gemma2", name="wide-gemma2")


@pytest.fixture(scope="module")
def wide_export_bf16(tmp_path_factory: pytest.TempPathFactory, wide_checkpoint: Path) -> Path:
    from mexport.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "wide-bf16"
    export_onnx(wide_checkpoint, out, dtype="bf16")
    return out


def test_fp32_export_matches_pytorch_past_the_window(tiny_export_fp32: Path) -> None:
    manifest = _manifest(tiny_export_fp32)
    validation = manifest["validation"]
    assert manifest["status"] == "passed" and manifest["dtype"] == "fp32" and manifest["kind"] == "export"
    assert validation["inputs"]["window_exercised"]
    assert validation["inputs"]["decode_steps"] > validation["inputs"]["sliding_window"]
    assert validation["inputs"]["sequence_length"] > validation["inputs"]["sliding_window"]
    assert set(validation["cases"]) == {"prefill", "decode", "left_padding"}
    for case in validation["cases"].values():
        assert case["max_abs"] <= 1e-4
        assert case["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def window_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mexport.export import export_onnx
    from mexport.fixtures import write_fixture

    checkpoint = write_fixture("window-gemma2", tmp_path_factory.mktemp("ckpt") / "window-gemma2")
    out = tmp_path_factory.mktemp("export") / "window-bf16"
    export_onnx(checkpoint, out, dtype="bf16")
    return checkpoint, out


def test_window_4096_fixture_is_checked_past_its_window(window_export: tuple[Path, Path]) -> None:
    """The 9B's window on a narrow 2-layer model: the export check runs 4,160 tokens (chunked prefill included)."""
    validation = _manifest(window_export[1])["validation"]
    assert validation["status"] == "passed"
    inputs = validation["inputs"]
    assert inputs["window_exercised"] and not inputs["long_check_forced"]
    assert inputs["sliding_window"] == 4096 and inputs["sequence_length"] == 4160
    assert inputs["decode_prompt"] + inputs["decode_steps"] == 4160 and inputs["decode_prompt"] > 4096
    assert inputs["prefill_chunk"] == 1024 and inputs["compared_positions"] == 96
    assert validation["max_abs"] <= validation["tolerance"]["max_abs"] == 1e-4


def test_the_long_check_sees_a_window_off_by_32(window_export: tuple[Path, Path], tmp_path: Path) -> None:
    """A reference whose window is 4064 instead of the graph's 4096 fails the check: a wrong traced sliding mask
    (a transformers upgrade changing the masking code) would be caught the same way."""
    from mexport.export.verify import validate_export

    checkpoint, export = window_export
    shifted = shutil.copytree(checkpoint, tmp_path / "shifted")
    config = json.loads((shifted / "config.json").read_text())
    (shifted / "config.json").write_text(json.dumps({**config, "sliding_window": 4096 - 32}))
    summary = validate_export(shifted, export, "bf16", "cpu")
    assert summary["status"] == "failed" and summary["inputs"]["window_exercised"]
    assert summary["cases"]["prefill"]["max_abs"] > 10 * summary["tolerance"]["max_abs"]


def test_fp32_greedy_generation_equals_pytorch(tiny_checkpoint: Path, tiny_export_fp32: Path) -> None:
    """Independent of the exporter's own validation: same greedy tokens from both runtimes."""
    from mexport.runtime.ort import OrtDecoder
    from mexport.runtime.torch_runtime import TorchDecoder

    prompt = np.array([[2, 17, 301, 45, 999, 12, 7, 88, 4, 600]], dtype=np.int64)
    with TorchDecoder(tiny_checkpoint, dtype="fp32") as reference:
        expected = reference.generate(prompt, 16)
    with OrtDecoder(tiny_export_fp32) as decoder:
        assert decoder.generate(prompt, 16).tolist() == expected.tolist()


def test_export_directory_is_self_contained_and_hashed(tiny_checkpoint: Path, tiny_export_fp32: Path) -> None:
    manifest = _manifest(tiny_export_fp32)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_export_fp32 / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    on_disk = {p.name for p in tiny_export_fp32.iterdir()} - {"mexport.json", STAMP_NAME}  # stamp: see verify_artifact
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (tiny_export_fp32 / name).stat().st_size, "sha256": sha256_file(tiny_export_fp32 / name)}
    source = manifest["source"]["files"]["model.safetensors"]
    assert source["sha256"] == sha256_file(tiny_checkpoint / "model.safetensors")


def test_bf16_export_keeps_bf16_and_reports_validation(tiny_export_bf16: Path) -> None:
    manifest = _manifest(tiny_export_bf16)
    assert manifest["status"] == "passed" and manifest["dtype"] == "bf16"
    dtypes = {entry["name"]: entry["dtype"] for entry in manifest["io"]["inputs"] + manifest["io"]["outputs"]}
    assert dtypes["past_key_values.0.key"] == dtypes["logits"] == "bfloat16"
    assert {t["dtype"] for t in manifest["weights"]["map"].values()} == {"bf16"}
    validation = manifest["validation"]
    assert validation["runtime"] == "bf16 weights, fp32 compute (CPU emulation, ORT_ENABLE_ALL)"
    assert validation["reference"] == "bf16 weights, fp32 compute (PyTorch cpu)"  # no fp32 copy of the checkpoint
    # sqrt(hidden 64) = 8 is exact in bf16 and the GELU is traced in fp32: fp32 compute matches fp32 PyTorch tightly
    assert validation["tolerance"]["max_abs"] == 1e-4
    assert 0 < validation["max_abs"] < 1e-5
    assert validation["top1_agreement"] == 1.0


def test_bf16_gelu_is_traced_in_fp32_as_pytorch_computes_it(tiny_export_bf16: Path, tiny_export_fp32: Path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    def activation(export_dir: Path) -> list:
        graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
        return [node for node in graph.node if node.name.startswith("/model/layers.0/mlp/act_fn/")]

    nodes = activation(tiny_export_bf16)
    casts = [next(a.i for a in node.attribute if a.name == "to") for node in nodes if node.op_type == "Cast"]
    assert casts == [TensorProto.FLOAT, TensorProto.BFLOAT16] and nodes[-1].op_type == "Cast"
    constants = [node.attribute[0].t for node in nodes if node.op_type == "Constant"]
    assert {tensor.data_type for tensor in constants} == {TensorProto.FLOAT}
    values = sorted(float(numpy_helper.to_array(tensor)) for tensor in constants)
    np.testing.assert_allclose(values, [0.044715, 0.5, np.sqrt(2 / np.pi), 1.0], rtol=1e-7)  # not 0.0447, 0.797
    assert "Cast" not in {node.op_type for node in activation(tiny_export_fp32)}  # fp32 traces are left as they were


def test_bf16_attention_scale_is_an_fp32_multiply(tiny_export_bf16: Path) -> None:
    """query_pre_attn_scalar 28 (not head_dim 32): 28**-0.5 is not exact in bf16, so it must stay fp32 in the graph."""
    import onnx
    from onnx import TensorProto, numpy_helper

    graph = onnx.load(str(tiny_export_bf16 / "model.onnx"), load_external_data=False).graph
    constants = {node.output[0]: node.attribute[0].t for node in graph.node if node.op_type == "Constant"}
    scales = [
        constants[name] for node in graph.node if node.op_type == "Mul" and "self_attn" in node.name
        for name in node.input if name in constants and constants[name].dims == []
        and abs(float(numpy_helper.to_array(constants[name])) - 28**-0.5) < 1e-3
    ]
    assert len(scales) == 4  # one per layer
    assert {tensor.data_type for tensor in scales} == {TensorProto.FLOAT}
    np.testing.assert_allclose([float(numpy_helper.to_array(t)) for t in scales], 28**-0.5, rtol=1e-7)


def test_wide_bf16_stores_the_embedding_once_in_one_file(wide_checkpoint: Path, wide_export_bf16: Path) -> None:
    import onnx

    manifest = _manifest(wide_export_bf16)
    assert manifest["status"] == "passed"
    # sqrt(hidden 512) rounds in bf16, in PyTorch and in the graph alike, but not in the fp32 reference
    assert manifest["validation"]["tolerance"]["basis"].endswith("embedding scale rounded to the dtype")
    assert manifest["validation"]["max_abs"] < 1e-3
    files = sorted(p.name for p in wide_export_bf16.iterdir() if "onnx" in p.name)
    assert files == ["model.onnx", "model.onnx.data"]
    initializers = _initializers(wide_export_bf16)
    external = {e.value for t in initializers for e in t.external_data if e.key == "location"}
    assert external == {"model.onnx.data"}
    table_shape = [32000, 512]
    assert sum(list(t.dims) in (table_shape, table_shape[::-1]) for t in initializers) == 1
    checkpoint_bytes = (wide_checkpoint / "model.safetensors").stat().st_size
    assert abs((wide_export_bf16 / "model.onnx.data").stat().st_size / checkpoint_bytes - 1) < 0.05
    # Linear weights are read by MatMul directly; only the tied LM head keeps a Transpose
    graph = onnx.load(str(wide_export_bf16 / "model.onnx"), load_external_data=False).graph
    transposed_params = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in {t.name for t in initializers}]
    assert [n.input[0] for n in transposed_params] == ["model.embed_tokens.weight"]
    onnx.checker.check_model(str(wide_export_bf16 / "model.onnx"))


def test_low_memory_validation_agrees_with_the_folded_one(
    wide_checkpoint: Path, wide_export_bf16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session large exports get (weights cast per node, LM head in slices) gives the same verdict and figures."""
    from mexport.export.verify import validate_export
    from mexport.runtime import ort as ort_runtime
    from mexport.runtime import upcast

    bounded = []

    def bound_weight_upcasts(model: object) -> object:
        bounded.append(model)
        return upcast.bound_weight_upcasts(model)

    monkeypatch.setattr(ort_runtime, "LOW_MEMORY_MIN_BYTES", 0)
    monkeypatch.setattr(upcast, "DEFAULT_SLICE_BYTES", 1 << 20)  # the 32000 x 512 tied embedding in 63 slices
    monkeypatch.setattr(ort_runtime, "bound_weight_upcasts", bound_weight_upcasts)
    summary = validate_export(wide_checkpoint, wide_export_bf16, "bf16", "cpu")
    assert len(bounded) == 1 and summary["status"] == "passed"
    lm_head_slices = [node for node in bounded[0].graph.node if node.input[:1] == ["model.embed_tokens.weight__stored"]]
    assert len(lm_head_slices) == 1 + 63  # the embedding's Gather and the LM head's slices
    folded = _manifest(wide_export_bf16)["validation"]
    for name, case in summary["cases"].items():
        assert case["max_abs"] == pytest.approx(folded["cases"][name]["max_abs"], abs=1e-4)
        assert case["top1_agreement"] == folded["cases"][name]["top1_agreement"] == 1.0


def test_wide_weights_are_byte_exact_copies_of_the_checkpoint(wide_checkpoint: Path, wide_export_bf16: Path) -> None:
    import torch
    from safetensors import safe_open

    weights = _manifest(wide_export_bf16)["weights"]
    data = (wide_export_bf16 / weights["file"]).read_bytes()
    assert len(data) == weights["bytes"]
    initializers = {t.name: t for t in _initializers(wide_export_bf16)}
    assert set(initializers) == set(weights["map"])
    with safe_open(str(wide_checkpoint / "model.safetensors"), framework="pt") as checkpoint:
        assert {entry["source"] for entry in weights["map"].values()} == set(checkpoint.keys())
        for name, entry in weights["map"].items():
            expected = checkpoint.get_tensor(entry["source"])
            if entry["transform"] == "transpose":
                expected = expected.t().contiguous()
            assert list(expected.shape) == entry["shape"] == list(initializers[name].dims)
            stored = data[entry["offset"] : entry["offset"] + entry["bytes"]]
            assert stored == expected.view(torch.uint8).numpy().tobytes(), name


def test_untied_export_stores_a_transposed_lm_head(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from mexport.export import export_onnx

    result = export_onnx(tiny_checkpoint, tmp_path / "untied", dtype="bf16", untie_embeddings=True)
    assert result.status == "passed" and result.validation["max_abs"] <= result.validation["tolerance"]["max_abs"]
    sources = [(k, v["transform"]) for k, v in result.manifest["weights"]["map"].items()
               if v["source"] == "model.embed_tokens.weight"]
    assert sorted(sources) == [
        ("model.embed_tokens.weight", "none"), ("model.embed_tokens.weight_transposed", "transpose")
    ]


def test_failed_validation_keeps_files_and_marks_the_manifest(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mexport.export import export_onnx, verify

    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(1e-12, 1.0, "impossible"))
    with pytest.raises(ValidationFailedError, match="prefill max-abs"):
        export_onnx(tiny_checkpoint, tmp_path / "out", dtype="fp32")
    manifest = _manifest(tmp_path / "out")
    assert manifest["status"] == "failed"
    assert manifest["validation"]["failure"].startswith("prefill max-abs")
    assert (tmp_path / "out" / "model.onnx.data").is_file()


def test_interrupted_export_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mexport.export import exporter

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_onnx(tiny_checkpoint, tmp_path / "out", validate=False)
    assert [path.name for path in tmp_path.iterdir()] == [".out.lock"]  # only the released output lock


def test_fp16_overflow_is_refused_before_writing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mexport.export import export_onnx

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "hot"))
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 3e4  # x sqrt(64) > 65504
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MexportError, match="fp16 overflows"):
        export_onnx(checkpoint, tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()
