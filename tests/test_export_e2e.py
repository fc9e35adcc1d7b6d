"""End-to-end exports of the fixture checkpoints: parity with PyTorch, storage layout, byte-exact weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mexport.errors import MexportError, ValidationFailedError
from mexport.manifest import sha256_file

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
    on_disk = {p.name for p in tiny_export_fp32.iterdir()} - {"mexport.json"}
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
    assert "fp32 compute" in validation["runtime"]
    assert 0 < validation["max_abs"] <= validation["tolerance"]["max_abs"]
    assert validation["top1_agreement"] >= validation["tolerance"]["min_top1"]


def test_wide_bf16_stores_the_embedding_once_in_one_file(wide_checkpoint: Path, wide_export_bf16: Path) -> None:
    import onnx

    manifest = _manifest(wide_export_bf16)
    assert manifest["status"] == "passed"
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
    assert list(tmp_path.iterdir()) == []


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
