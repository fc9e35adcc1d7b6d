"""Real TensorRT engines from the tiny export, checked against ONNX Runtime (needs TensorRT, Polygraphy, a CUDA GPU).

Skipped with the reason on machines without them; nothing here is simulated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mexport.errors import MexportError
from mexport.optimize.engine import EngineSettings, build_engine
from mexport.runtime.base import DecoderRuntime
from mexport.runtime.trt import TrtDecoder

LIMITS = {"max_batch": 4, "max_input_len": 32, "max_context": 64, "opt_batch": 2, "prefill_chunk": 8}  # prompts > 8: chunks
FP32_ATOL = 2e-3  # TensorRT fp32 without TF32 vs ONNX Runtime fp32: kernel sum order only


def _missing() -> str | None:
    """Why this machine cannot build engines, or None."""
    from mexport.errors import MissingDependencyError
    from mexport.lazy import is_available
    from mexport.optimize.engine import detect_gpus, require_tensorrt

    try:
        require_tensorrt()
    except MissingDependencyError as exc:
        return exc.message
    if not is_available("polygraphy"):
        return "polygraphy is not installed (pip install 'mexport[gpu]')"
    if not detect_gpus():
        return "no CUDA GPU found"
    return None


# decided at collection, before any fixture (the session's tiny exports) is set up
MISSING = _missing()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT and a CUDA GPU: {MISSING}"),
]


@pytest.fixture(scope="module")
def fp32_engine(tiny_export_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "tiny-fp32"
    build_engine(tiny_export_fp32, out, EngineSettings(precision="fp32", **LIMITS))
    return out


@pytest.fixture(scope="module")
def decoders(fp32_engine: Path, tiny_export_fp32: Path) -> Iterator[tuple[DecoderRuntime, DecoderRuntime]]:
    from mexport.runtime.ort import OrtDecoder

    with TrtDecoder(fp32_engine) as trt_decoder, OrtDecoder(tiny_export_fp32) as ort_decoder:
        yield trt_decoder, ort_decoder


def ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 1000, (batch, length)).astype(np.int64)


def test_engine_directory_is_self_contained(fp32_engine: Path) -> None:
    import tensorrt
    import torch

    names = {path.name for path in fp32_engine.iterdir()}
    assert {"model.engine", "timing.cache", "plan.json", "mexport.json", "config.json", "tokenizer.json"} <= names
    assert not any(name.endswith((".onnx", ".onnx.data")) for name in names)
    manifest = json.loads((fp32_engine / "mexport.json").read_text())
    engine = manifest["engine"]
    major, minor = torch.cuda.get_device_capability(0)
    assert (engine["compute_capability"], engine["tensorrt_version"]) == (f"{major}.{minor}", tensorrt.__version__)
    assert engine["strongly_typed"] is True and engine["builder_flags"] == []
    assert manifest["files"]["model.engine"]["bytes"] == (fp32_engine / "model.engine").stat().st_size > 0
    assert manifest["parent"]["kind"] == "export"


def test_prefill_and_decode_match_onnx_runtime(decoders: tuple[DecoderRuntime, DecoderRuntime]) -> None:
    trt_decoder, ort_decoder = decoders
    prompt = ids(2, 12, 0)
    mask = np.ones_like(prompt)
    mask[1, :4] = 0  # left padding on the second row
    trt_logits, trt_past = trt_decoder.forward(prompt, mask)
    ort_logits, ort_past = ort_decoder.forward(prompt, mask)
    assert trt_logits.dtype == np.float32 and trt_logits.shape == (2, 12, 1024)
    np.testing.assert_allclose(trt_logits[0], ort_logits[0], atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(trt_logits[1, 4:], ort_logits[1, 4:], atol=FP32_ATOL, rtol=0)
    for step in range(6):  # decode profile, past beyond the sliding window (8)
        token = trt_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        trt_logits, trt_past = trt_decoder.forward(token, mask, trt_past)
        ort_logits, ort_past = ort_decoder.forward(token, mask, ort_past)
        np.testing.assert_allclose(trt_logits, ort_logits, atol=FP32_ATOL, rtol=0, err_msg=f"decode step {step}")


def test_continuations_after_a_shared_prompt(decoders: tuple[DecoderRuntime, DecoderRuntime]) -> None:
    """The MCQ scoring pattern: one prompt, its cache repeated, several multi-token answers scored after it."""
    trt_decoder, ort_decoder = decoders
    prompt, answers = ids(1, 10, 1), ids(3, 5, 2)
    mask = np.ones((3, 15), dtype=np.int64)
    results = []
    for decoder in (trt_decoder, ort_decoder):
        _, past = decoder.forward(prompt, mask[:1, :10])
        past = decoder.repeat_past(past, 3)
        results.append(decoder.forward(answers, mask, past)[0])
    assert results[0].shape == (3, 5, 1024)
    np.testing.assert_allclose(results[0], results[1], atol=FP32_ATOL, rtol=0)


def test_requests_outside_the_profiles_are_refused(decoders: tuple[DecoderRuntime, DecoderRuntime]) -> None:
    trt_decoder, _ = decoders
    with pytest.raises(MexportError, match="batch 5 > --max-batch 4"):
        trt_decoder.forward(ids(5, 4, 3), np.ones((5, 4), dtype=np.int64))
    with pytest.raises(MexportError, match="input length 33 > --max-input-len 32"):
        trt_decoder.forward(ids(1, 33, 3), np.ones((1, 33), dtype=np.int64))


def test_bf16_engine_tracks_the_fp32_reference(tiny_export_bf16: Path, tmp_path: Path) -> None:
    from mexport.runtime.ort import OrtDecoder

    out = tmp_path / "tiny-bf16"
    result = build_engine(tiny_export_bf16, out, EngineSettings(precision="bf16", **LIMITS))
    assert result.plan.mode.strongly_typed and result.engine_bytes > 0
    prompt = ids(1, 16, 4)
    mask = np.ones_like(prompt)
    with TrtDecoder(out) as trt_decoder, OrtDecoder(tiny_export_bf16) as ort_decoder:  # ORT: fp32 compute on CPU
        trt_logits, _ = trt_decoder.forward(prompt, mask)
        ort_logits, _ = ort_decoder.forward(prompt, mask)
    assert np.isfinite(trt_logits).all()
    assert np.abs(trt_logits - ort_logits).max() < 0.5  # bf16 rounding on logits softcapped to +-30
    assert (trt_logits.argmax(-1) == ort_logits.argmax(-1)).mean() >= 0.9


def test_rebuild_reuses_the_timing_cache(fp32_engine: Path, tiny_export_fp32: Path) -> None:
    cache = fp32_engine / "timing.cache"
    before = cache.stat().st_size
    assert before > 0
    build_engine(tiny_export_fp32, fp32_engine, EngineSettings(precision="fp32", **LIMITS), overwrite=True)
    assert (fp32_engine / "timing.cache").stat().st_size >= before


QUANTIZED_RECIPES = ("fp8", "int8-sq", "int8-wo", "int4-wo")


@pytest.mark.parametrize("recipe", QUANTIZED_RECIPES)
def test_quantized_engine_matches_onnx_runtime_on_the_same_graph(
    recipe: str, tiny_export_bf16: Path, tmp_path: Path
) -> None:
    """Each recipe's Q/DQ graph built strongly typed; TensorRT's quantized kernels vs ONNX Runtime's dequantized
    reference on the same inputs (ORT runs the same graph on the CPU)."""
    import torch

    from mexport.optimize import quantize
    from mexport.optimize.quantize.recipes import RECIPES
    from mexport.runtime.ort import OrtDecoder

    if torch.cuda.get_device_capability(0) < RECIPES[recipe].min_capability:
        pytest.skip(f"{recipe} needs compute capability {RECIPES[recipe].min_capability}")
    quantized = quantize(tiny_export_bf16, tmp_path / recipe, recipe, calib_size=16, check_prompts=1).output
    out = tmp_path / f"engine-{recipe}"
    result = build_engine(quantized, out, EngineSettings(**LIMITS))
    assert result.plan.mode.strongly_typed and result.plan.mode.builder_flags == ()
    prompt = ids(2, 16, 5)
    mask = np.ones_like(prompt)
    with TrtDecoder(out) as trt_decoder, OrtDecoder(quantized) as ort_decoder:
        trt_logits, trt_past = trt_decoder.forward(prompt, mask)
        ort_logits, ort_past = ort_decoder.forward(prompt, mask)
        token = ort_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        trt_step, _ = trt_decoder.forward(token, mask, trt_past)
        ort_step, _ = ort_decoder.forward(token, mask, ort_past)
    assert np.isfinite(trt_logits).all() and np.isfinite(trt_step).all()
    assert np.abs(trt_logits - ort_logits).max() < 1.0  # quantized kernels and bf16 accumulation order differ
    assert (trt_logits.argmax(-1) == ort_logits.argmax(-1)).mean() >= 0.8
    assert np.abs(trt_step - ort_step).max() < 1.0
