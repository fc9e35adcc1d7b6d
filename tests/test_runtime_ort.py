"""ONNX Runtime decoder specifics: GQA empty past, parity with PyTorch, bf16 CPU emulation, one-line errors.

The shared decoding contract (step decoding, padding, repeat_past) is in test_runtime_contract.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mexport.errors import MexportError, MissingDependencyError
from mexport.runtime.ort import OrtDecoder
from mexport.runtime.torch_runtime import TorchDecoder

IDS = np.random.default_rng(0).integers(4, 1000, (2, 20)).astype(np.int64)
MASK = np.ones_like(IDS)
HAS_CUDA_PROVIDER = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def torch_logits(tiny_checkpoint: Path) -> dict[str, np.ndarray]:
    """Reference logits of IDS: bf16 weights upcast to fp32 ("fp32"), and native bf16 compute ("bf16")."""
    logits = {}
    for dtype in ("fp32", "bf16"):
        with TorchDecoder(tiny_checkpoint, dtype=dtype) as decoder:
            logits[dtype] = decoder.forward(IDS, MASK)[0]
    return logits


@pytest.mark.parametrize("export", ["tiny_export_fp32", "tiny_export_bf16"])
def test_empty_past_is_sized_by_kv_heads(request: pytest.FixtureRequest, export: str) -> None:
    with OrtDecoder(request.getfixturevalue(export)) as decoder:
        past = decoder.empty_past(3)
        assert len(past) == 2 * decoder.spec.num_layers
        # (batch, num_key_value_heads=2, 0, head_dim): the query-head count (4) would not fit the graph
        assert {tuple(value.shape()) for value in past} == {(3, 2, 0, 32)}
        assert {value.data_type() for value in past} == {"tensor(float)"}  # bf16 runs emulated in fp32 on CPU
        _, present = decoder.forward(IDS[:, :5], MASK[:, :5])
        assert {tuple(value.shape()) for value in present} == {(2, 2, 5, 32)}


def test_fp32_export_matches_pytorch(tiny_export_fp32: Path, torch_logits: dict[str, np.ndarray]) -> None:
    with OrtDecoder(tiny_export_fp32) as decoder:
        assert (decoder.compute_dtype, decoder.emulated) == ("fp32", False)
        logits, _ = decoder.forward(IDS, MASK)
    np.testing.assert_allclose(logits, torch_logits["fp32"], atol=1e-4, rtol=0)


def test_bf16_export_runs_on_cpu_with_fp32_compute(tiny_export_bf16: Path, torch_logits: dict[str, np.ndarray]) -> None:
    with OrtDecoder(tiny_export_bf16) as decoder:
        assert (decoder.dtype, decoder.compute_dtype, decoder.emulated) == ("bf16", "fp32", True)
        assert decoder.precision == "bf16 weights, fp32 compute (CPU emulation, ORT_ENABLE_ALL)"
        logits, _ = decoder.forward(IDS, MASK)
    emulation_error = np.abs(logits - torch_logits["fp32"]).max()
    bf16_rounding = np.abs(torch_logits["bf16"] - torch_logits["fp32"]).max()
    # fp32 compute over the same bf16 weights and fp32 GELU constants (the tiny fixture's embedding scale sqrt(64) is
    # exact in bf16): PyTorch's fp32 upcast up to op ordering, far from bf16 compute
    assert emulation_error < 1e-5
    assert emulation_error < bf16_rounding / 1000


def test_low_memory_session_matches_the_folded_one(
    tiny_export_bf16: Path, torch_logits: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mexport.runtime import upcast

    monkeypatch.setattr(upcast, "DEFAULT_SLICE_BYTES", 16 << 10)  # cut the tiny weights in slices too
    with OrtDecoder(tiny_export_bf16) as folded:
        expected, _ = folded.forward(IDS, MASK)
    with OrtDecoder(tiny_export_bf16, low_memory=True) as decoder:
        assert decoder.low_memory and decoder.precision == "bf16 weights, fp32 compute (CPU emulation, ORT_ENABLE_ALL)"
        logits, past = decoder.forward(IDS, MASK)
    assert {value.data_type() for value in past} == {"tensor(float)"}
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)  # same fp32 values, other kernels / fusions
    np.testing.assert_allclose(logits, torch_logits["fp32"], atol=1e-5, rtol=0)


def test_low_memory_is_chosen_for_large_emulated_weights(
    tiny_export_bf16: Path, tiny_export_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mexport.runtime import ort as ort_runtime

    assert not OrtDecoder(tiny_export_bf16).low_memory  # 0.4 MB of weights: folded casts, fastest
    data_bytes = (tiny_export_bf16 / "model.onnx.data").stat().st_size
    monkeypatch.setattr(ort_runtime, "LOW_MEMORY_MIN_BYTES", data_bytes)
    assert OrtDecoder(tiny_export_bf16).low_memory
    assert not OrtDecoder(tiny_export_bf16, low_memory=False).low_memory
    # only fp32 compute of bf16 / fp16 weights has casts to defer
    assert not OrtDecoder(tiny_export_fp32, low_memory=True).low_memory
    assert not OrtDecoder(tiny_export_bf16, fp32_compute=False, low_memory=True).low_memory


def test_quantized_model_precision_names_its_recipe(tmp_path: Path, tiny_export_bf16: Path) -> None:
    model_dir = tmp_path / "quantized"
    shutil.copytree(tiny_export_bf16, model_dir)
    manifest = json.loads((model_dir / "mexport.json").read_text())
    manifest.update(kind="quantize", recipe={"name": "int8-wo"})
    (model_dir / "mexport.json").write_text(json.dumps(manifest))
    assert OrtDecoder(model_dir).precision == (
        "int8-wo Q/DQ weights over bf16, fp32 compute (CPU emulation, ORT_ENABLE_BASIC, Q/DQ computed as written)"
    )


def test_lean_graph_computes_only_the_rows_logits_indices_names(tiny_export_fp32: Path) -> None:
    from mexport.optimize.quantize.calibration import prefill_feeds

    manifest = json.loads((tiny_export_fp32 / "mexport.json").read_text())
    by_name = {entry["name"]: entry for entry in manifest["io"]["inputs"] + manifest["io"]["outputs"]}
    assert by_name["logits_indices"] == {"name": "logits_indices", "dtype": "int64", "shape": ["logits_length"]}
    assert by_name["logits"]["shape"] == ["batch_size", "logits_length", 1024]
    session = ort.InferenceSession(str(tiny_export_fp32 / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = prefill_feeds(manifest, IDS[:1])
    full = session.run(["logits"], feeds)[0]
    assert full.shape == (1, 20, 1024)  # calibration feeds every position
    for rows in ([19], [3, 10]):
        feeds["logits_indices"] = np.array(rows, dtype=np.int64)
        lean = session.run(["logits"], feeds)[0]
        assert lean.shape == (1, len(rows), 1024)
        np.testing.assert_allclose(lean, full[:, rows], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def quantized_bf16(tmp_path_factory: pytest.TempPathFactory, tiny_export_bf16: Path) -> Path:
    from mexport.optimize.quantize import quantize

    out = tmp_path_factory.mktemp("quantize") / "int8-sq"
    return quantize(tiny_export_bf16, out, "int8-sq", calib_size=4, check_prompts=1, include_lm_head=True).output


def test_quantized_lean_graph_keeps_logits_indices(quantized_bf16: Path) -> None:
    with OrtDecoder(quantized_bf16) as decoder:
        assert decoder.lean_logits
        full, _ = decoder.forward(IDS, MASK)
        last, _ = decoder.forward(IDS, MASK, logits_to_keep=1)
    assert last.shape == (2, 1, 1024)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-4, rtol=0)


def test_bf16_without_fp32_compute_on_cpu_points_to_the_emulation(tiny_export_bf16: Path) -> None:
    decoder = OrtDecoder(tiny_export_bf16, fp32_compute=False)
    try:
        decoder.activate()
    except MexportError as exc:
        assert "NOT_IMPLEMENTED" in exc.message and "\n" not in exc.message
        assert exc.hint == "fp32_compute=True runs this bf16 graph with fp32 compute"
    else:
        pytest.skip("this ONNX Runtime has the bf16 CPU kernels the graph needs")


def test_missing_manifest_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MexportError, match="no mexport.json"):
        OrtDecoder(tmp_path)


def test_missing_graph_is_a_one_line_error(tmp_path: Path, tiny_export_fp32: Path) -> None:
    shutil.copy(tiny_export_fp32 / "mexport.json", tmp_path / "mexport.json")
    with pytest.raises(MexportError, match="no model.onnx"):
        OrtDecoder(tmp_path)


def test_engine_directory_is_refused(tmp_path: Path, tiny_export_fp32: Path) -> None:
    manifest = json.loads((tiny_export_fp32 / "mexport.json").read_text())
    (tmp_path / "mexport.json").write_text(json.dumps({**manifest, "kind": "engine"}))
    with pytest.raises(MexportError, match="kind is 'engine'"):
        OrtDecoder(tmp_path)


def test_corrupt_graph_reports_the_onnxruntime_error(tmp_path: Path, tiny_export_fp32: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_export_fp32, model_dir)
    (model_dir / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(MexportError, match=r"ONNX Runtime could not load .*model.onnx on cpu: \S") as caught:
        OrtDecoder(model_dir).activate()
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(("device", "provider"), [("cuda", "CUDAExecutionProvider"), ("tensorrt", "Tensorrt")])
def test_gpu_device_without_gpu_onnxruntime_says_what_to_install(
    tiny_export_fp32: Path, device: str, provider: str
) -> None:
    if HAS_CUDA_PROVIDER:
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(MissingDependencyError, match=f"has no {provider}") as caught:
        OrtDecoder(tiny_export_fp32, device=device).activate()
    assert caught.value.hint is not None and "pip install onnxruntime-gpu" in caught.value.hint


def test_unknown_device_is_refused(tiny_export_fp32: Path) -> None:
    with pytest.raises(MexportError, match="unknown ONNX Runtime device 'tpu'"):
        OrtDecoder(tiny_export_fp32, device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_PROVIDER, reason="needs onnxruntime-gpu with CUDAExecutionProvider and a GPU")
def test_bf16_export_runs_natively_on_cuda(tiny_export_bf16: Path, torch_logits: dict[str, np.ndarray]) -> None:
    with OrtDecoder(tiny_export_bf16, device="cuda") as decoder:
        assert (decoder.compute_dtype, decoder.emulated) == ("bf16", False)
        logits, past = decoder.forward(IDS, MASK)
        assert {value.data_type() for value in past} == {"tensor(bfloat16)"}
        assert {value.device_name() for value in past} == {"cuda"}
        _, first_row_past = decoder.forward(IDS[:1], MASK[:1])
        same_token = np.array([[7], [7]], dtype=np.int64)
        next_logits, _ = decoder.forward(same_token, np.ones((2, 21), np.int64), decoder.repeat_past(first_row_past, 2))
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(next_logits[0], next_logits[1])
    assert np.abs(logits - torch_logits["fp32"]).max() < 0.25  # bf16 compute: within bf16 rounding of fp32


def test_cuda_refuses_nodes_without_a_cuda_kernel_naming_them(
    quantized_bf16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 Q/DQ has no CUDA kernel: the session is never made (ORT would run those nodes on the CPU)."""
    import mexport.runtime.ort as ort_module

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_module, "ort_session", lambda *args, **kwargs: pytest.fail("session made"))
    with pytest.raises(MexportError) as caught:
        OrtDecoder(quantized_bf16, device="cuda").activate()
    message = caught.value.message
    assert "CUDA provider has no kernel for" in message and "would silently run on the CPU" in message
    assert "MatMul_weight_DequantizeLinear (DequantizeLinear: bfloat16 scales" in message and " more" in message
    assert caught.value.hint is not None
    assert "TensorRT engine" in caught.value.hint and "--backend-device cpu" in caught.value.hint


def test_plain_exports_have_every_node_on_cuda(tiny_export_bf16: Path, tiny_export_fp32: Path) -> None:
    import onnx

    from mexport.runtime.cuda_kernels import cuda_unsupported_nodes

    for export in (tiny_export_bf16, tiny_export_fp32):  # the bf16 graph's norms and rotary compute in fp32
        assert cuda_unsupported_nodes(onnx.load(str(export / "model.onnx"), load_external_data=False)) == []


@pytest.mark.parametrize(
    ("op", "quantized", "scale", "opset", "blocked", "expected"),
    [
        ("DequantizeLinear", "float8e4m3fn", "float16", 19, False, None),
        ("DequantizeLinear", "float8e4m3fn", "float32", 18, False, "float8e4m3fn at opset 18"),
        ("DequantizeLinear", "int4", "float16", 21, True, None),
        ("DequantizeLinear", "int8", "float32", 21, True, "blocked int8"),
        ("QuantizeLinear", "int8", "bfloat16", 21, False, "bfloat16 scales"),
    ],
)
def test_qdq_kernel_table(op: str, quantized: str, scale: str, opset: int, blocked: bool, expected: str | None) -> None:
    from mexport.runtime.cuda_kernels import qdq_gap

    gap = qdq_gap(op, quantized, scale, opset, blocked)
    assert gap is None if expected is None else (gap is not None and gap.startswith(expected))


def test_recipes_the_cuda_provider_can_run() -> None:
    from mexport.runtime.cuda_kernels import cuda_supported_recipes

    assert cuda_supported_recipes("fp16") == {"fp8": None, "int8-sq": None, "int8-wo": None, "int4-wo": None}
    assert cuda_supported_recipes("fp32") == cuda_supported_recipes("fp16")
    bf16 = cuda_supported_recipes("bf16")
    assert set(bf16) == {"fp8", "int8-sq", "int8-wo", "int4-wo"}
    assert all(reason is not None and reason.startswith("bfloat16 scales") for reason in bf16.values())
