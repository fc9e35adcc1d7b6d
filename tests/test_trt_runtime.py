"""The real TrtDecoder and build_engine on CPU, against a fake ``tensorrt`` module (tests/fake_tensorrt.py).

The fake engine runs the tiny export with ONNX Runtime, so TrtDecoder's logits must equal OrtDecoder's on the same
inputs: what is tested is TrtDecoder's own work (profile selection, chunking, shapes, buffers bound by address,
the KV cache handed from one call to the next, lean-logits indices, limits), not TensorRT.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_tensorrt
import numpy as np
import pytest

from mexport.errors import MexportError
from mexport.manifest import file_records, read_manifest, write_manifest
from mexport.optimize.engine import EngineSettings, build_engine
from mexport.runtime.base import RuntimeLimits
from mexport.runtime.trt import TrtDecoder

# max_logits = prefill_chunk: a lean export (logits_indices) and a full-logits one are cut into the same pieces
LIMITS = {"max_batch": 2, "max_input_len": 32, "max_context": 64, "prefill_chunk": 8, "max_logits": 8}
ATOL = 1e-4  # same ONNX Runtime graph; chunked attention sums in another order
PREFILL, DECODE, CHUNK = 0, 1, 2


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt.install(monkeypatch)


def _build(source: Path, out: Path, **limits: Any) -> Path:
    build_engine(source, out, EngineSettings(precision="fp32", **{**LIMITS, **limits}))
    return out


def ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 1000, (batch, length)).astype(np.int64)


def calls(decoder: TrtDecoder) -> list[int]:
    """Profiles of the engine calls so far (and forget them)."""
    context = decoder._active().context
    profiles = [profile for profile, _ in context.calls]
    context.calls.clear()
    return profiles


@pytest.fixture
def decoders(fake_trt: None, tiny_export_fp32: Path, tmp_path: Path) -> Iterator[tuple[TrtDecoder, Any]]:
    from mexport.runtime.ort import OrtDecoder

    engine = _build(tiny_export_fp32, tmp_path / "engine")
    with TrtDecoder(engine) as trt_decoder, OrtDecoder(tiny_export_fp32) as ort_decoder:
        yield trt_decoder, ort_decoder


def test_fake_build_writes_a_real_engine_directory(fake_trt: None, tiny_export_fp32: Path, tmp_path: Path) -> None:
    out = _build(tiny_export_fp32, tmp_path / "engine")
    manifest = read_manifest(out, expected_kind=("engine",))
    engine = manifest["engine"]
    assert engine["tensorrt_version"] == fake_tensorrt.__version__ and engine["compute_capability"] == "9.0"
    assert [profile["name"] for profile in engine["profiles"]] == ["prefill", "decode", "chunk"]
    assert engine["limits"]["prefill_chunk"] == 8
    assert not any(name.endswith((".onnx", ".onnx.data")) for name in manifest["files"])


@pytest.mark.slow
def test_long_prompt_runs_in_chunks_and_matches_onnx_runtime(decoders: tuple[TrtDecoder, Any]) -> None:
    trt_decoder, ort_decoder = decoders
    prompt = ids(2, 20, 0)
    mask = np.ones_like(prompt)
    mask[1, :3] = 0  # left padding on the second row
    trt_logits, trt_past = trt_decoder.forward(prompt, mask)
    ort_logits, ort_past = ort_decoder.forward(prompt, mask)
    assert calls(trt_decoder) == [PREFILL, CHUNK, CHUNK]  # 8 + 8 + 4 tokens
    assert trt_logits.shape == (2, 20, 1024) and trt_past.length == 20
    np.testing.assert_allclose(trt_logits[0], ort_logits[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(trt_logits[1, 3:], ort_logits[1, 3:], atol=ATOL, rtol=0)
    for step in range(3):  # decode profile, past beyond the sliding window (8)
        token = trt_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        trt_logits, trt_past = trt_decoder.forward(token, mask, trt_past, logits_to_keep=1)
        ort_logits, ort_past = ort_decoder.forward(token, mask, ort_past, logits_to_keep=1)
        np.testing.assert_allclose(trt_logits, ort_logits, atol=ATOL, rtol=0, err_msg=f"decode step {step}")
    assert calls(trt_decoder) == [DECODE] * 3


@pytest.mark.slow
def test_continuations_after_a_shared_prompt_run_in_one_chunk(decoders: tuple[TrtDecoder, Any]) -> None:
    """The MCQ scoring pattern: one prompt, its cache repeated, multi-token answers scored in one chunk call."""
    trt_decoder, ort_decoder = decoders
    prompt, answers = ids(1, 6, 1), ids(2, 5, 2)
    mask = np.ones((2, 11), dtype=np.int64)
    results = []
    for decoder in (trt_decoder, ort_decoder):
        logits, past = decoder.forward(prompt, mask[:1, :6], logits_to_keep=1)
        assert logits.shape == (1, 1, 1024)
        past = decoder.repeat_past(past, 2)
        results.append(decoder.forward(answers, mask, past)[0])
    assert calls(trt_decoder) == [PREFILL, CHUNK]
    np.testing.assert_allclose(results[0], results[1], atol=ATOL, rtol=0)


def test_limits_are_exposed_and_enforced(decoders: tuple[TrtDecoder, Any]) -> None:
    trt_decoder, _ = decoders
    assert trt_decoder.limits == RuntimeLimits(max_batch=2, max_context=64, max_input_len=32)
    with pytest.raises(MexportError, match="batch 3 > --max-batch 2"):
        trt_decoder.forward(ids(3, 4, 3), np.ones((3, 4), dtype=np.int64))
    with pytest.raises(MexportError, match="input length 33 > --max-input-len 32"):
        trt_decoder.forward(ids(1, 33, 3), np.ones((1, 33), dtype=np.int64))
    _, past = trt_decoder.forward(ids(1, 32, 4), np.ones((1, 32), dtype=np.int64))
    _, past = trt_decoder.forward(ids(1, 32, 5), np.ones((1, 64), dtype=np.int64), past)  # exactly the context
    with pytest.raises(MexportError, match="context 65 > --max-context 64"):
        trt_decoder.forward(ids(1, 1, 6), np.ones((1, 65), dtype=np.int64), past)
    assert calls(trt_decoder) == [PREFILL] + [CHUNK] * 7


@pytest.mark.slow
def test_engine_without_chunk_profile_decodes_token_by_token(
    fake_trt: None, tiny_export_fp32: Path, tmp_path: Path
) -> None:
    """Engines built before chunk profiles (prefill + decode only) still run several tokens after a past."""
    from mexport.runtime.ort import OrtDecoder

    out = _build(tiny_export_fp32, tmp_path / "engine", prefill_chunk=32)
    spec = json.loads((out / "model.engine").read_text())
    spec["profiles"] = spec["profiles"][:2]
    (out / "model.engine").write_text(json.dumps(spec))
    prompt, more = ids(1, 10, 7), ids(1, 3, 8)
    mask = np.ones((1, 13), dtype=np.int64)
    results = []
    with TrtDecoder(out) as trt_decoder, OrtDecoder(tiny_export_fp32) as ort_decoder:
        for decoder in (trt_decoder, ort_decoder):
            _, past = decoder.forward(prompt, mask[:, :10], logits_to_keep=1)
            results.append(decoder.forward(more, mask, past)[0])
        assert calls(trt_decoder) == [PREFILL, DECODE, DECODE, DECODE]
    np.testing.assert_allclose(results[0], results[1], atol=ATOL, rtol=0)


def _lean(export: Path, out: Path) -> Path:
    """The export if it has the ``logits_indices`` input (lean logits), else a copy given one: a Gather
    of the logits rows."""
    import onnx
    from onnx import TensorProto, helper

    if any(entry["name"] == "logits_indices" for entry in read_manifest(export)["io"]["inputs"]):
        return export
    shutil.copytree(export, out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits_all" if name == "logits" else name for name in node.output]
    graph.input.append(helper.make_tensor_value_info("logits_indices", TensorProto.INT64, ["logits_length"]))
    graph.node.append(helper.make_node("Gather", ["logits_all", "logits_indices"], ["logits"], axis=1))
    logits = next(output for output in graph.output if output.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    onnx.save(model, str(out / "model.onnx"))
    manifest = read_manifest(out)
    manifest["io"]["inputs"].append({"name": "logits_indices", "dtype": "int64", "shape": ["logits_length"]})
    entry = next(entry for entry in manifest["io"]["outputs"] if entry["name"] == "logits")
    entry["shape"][1] = "logits_length"
    manifest["files"] = file_records(out)
    write_manifest(out, manifest)
    return out


@pytest.mark.slow
def test_lean_engine_binds_logits_indices(fake_trt: None, tiny_export_fp32: Path, tmp_path: Path) -> None:
    from mexport.runtime.ort import OrtDecoder

    lean = _lean(tiny_export_fp32, tmp_path / "lean")
    out = _build(lean, tmp_path / "engine", max_logits=4)
    profiles = read_manifest(out)["engine"]["profiles"]
    assert profiles[0]["inputs"]["logits_indices"] == {"min": [1], "opt": [1], "max": [4]}
    prompt = ids(1, 20, 9)
    mask = np.ones_like(prompt)
    with TrtDecoder(out) as trt_decoder, OrtDecoder(tiny_export_fp32) as ort_decoder:
        reference, _ = ort_decoder.forward(prompt, mask)
        last, _ = trt_decoder.forward(prompt, mask, logits_to_keep=1)
        context = trt_decoder._active().context
        assert [shapes["logits_indices"] for _, shapes in context.calls] == [(1,), (1,), (1,)]
        assert calls(trt_decoder) == [PREFILL, CHUNK, CHUNK]
        np.testing.assert_allclose(last, reference[:, -1:], atol=ATOL, rtol=0)
        every, _ = trt_decoder.forward(prompt, mask)  # all 20 positions, at most 4 logits per call
        assert calls(trt_decoder) == [PREFILL] + [CHUNK] * 4  # 4 + 4 x 4 tokens
        np.testing.assert_allclose(every, reference, atol=ATOL, rtol=0)


# A whole validate run through the real TrtDecoder on a batch-1, short-input engine: the scorer splits validate's
# batch of 8 into engine calls of 1 and skips (counts, with the reason) prompts longer than the engine's input.
@pytest.mark.slow
def test_whole_validate_run_on_a_batch_1_short_input_engine(
    fake_trt: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mexport import doctor
    from mexport.export import export_onnx
    from mexport.fixtures.learned import make_learned_fixture
    from mexport.validate import validate

    learned = make_learned_fixture(tmp_path / "learned")
    export = tmp_path / "export"
    export_onnx(learned, export, dtype="fp32")
    engine = _build(export, tmp_path / "engine", max_batch=1, max_input_len=96, max_context=128, prefill_chunk=32,
                    max_logits=8)
    # the fake engine runs on the host: the backend's GPU probe must see "a GPU"
    monkeypatch.setattr(doctor, "check_cuda_devices", lambda: [doctor.Check("cuda:0", doctor.OK, "fake")])
    executed_batches: list[int] = []
    execute = fake_tensorrt.IExecutionContext.execute_async_v3

    def recording_execute(context: fake_tensorrt.IExecutionContext, stream: int) -> bool:
        executed_batches.append(context.shapes["input_ids"][0])
        return execute(context, stream)

    monkeypatch.setattr(fake_tensorrt.IExecutionContext, "execute_async_v3", recording_execute)
    report = validate(learned, [engine], ["medmcqa"], data={"medmcqa": "sample"}, output=tmp_path / "report",
                      batch_size=8, limit=16)
    result = next(result for result in report.to_dict()["results"] if result["candidate"] == "engine")
    # 16 questions; the one whose prompt exceeds the engine's 96-token input is counted, not fatal
    assert result["skipped_questions"] == {"prompt longer than the input limit (96 tokens)": 1}
    assert result["metrics"]["acc"]["n"] == 15 and result["metrics"]["acc"]["agreement"] == 1.0
    assert result["verdict"] == "inconclusive"  # 15 questions cannot resolve a 1-point margin
    assert executed_batches and set(executed_batches) == {1}  # validate's batch 8 ran as engine calls of 1


def test_engine_without_a_prefill_profile_is_refused(fake_trt: None, tiny_export_fp32: Path, tmp_path: Path) -> None:
    out = _build(tiny_export_fp32, tmp_path / "engine")
    spec = json.loads((out / "model.engine").read_text())
    spec["profiles"] = spec["profiles"][1:]  # decode and chunk only
    (out / "model.engine").write_text(json.dumps(spec))
    with pytest.raises(MexportError, match="no profile runs a prompt without a past"):
        TrtDecoder(out).activate()


def test_doctor_reports_the_bindings_version(fake_trt: None) -> None:
    from mexport.doctor import check_tensorrt

    tensorrt = next(check for check in check_tensorrt() if check.name == "tensorrt")
    assert (tensorrt.status, tensorrt.detail) == ("ok", fake_tensorrt.__version__)
