"""The DecoderRuntime contract, checked identically on every CPU backend.

Backends: PyTorch fp32 (an fp32 copy of the weights, or the bf16 weights upcast at run time); ORT fp32; ORT bf16 with
fp32 compute (CPU emulation: casts folded at load, or the low-memory session casting weights per node); ORT fp16 with
native fp16 compute, which takes the code path GPUs take (low-precision cache OrtValues, logits cast to float32 in
the graph); ORT fp32 of a ``--full-logits`` export (no ``logits_indices`` input: the runtime slices). The run-time upcasts use slices small enough that the tiny fixture's weights are cut in several. The
tiny fixture's sliding window is 8, so every sequence here runs past it: cache handling of sliding-window layers is
exercised in step decoding, padding and cache repetition.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from mexport.runtime.base import DecoderRuntime

RUNTIMES = [
    "torch-fp32", "torch-fp32-upcast", "ort-fp32", "ort-bf16", "ort-bf16-low-memory", "ort-fp16-native",
    "ort-fp32-full-logits",
]
# different chunkings / batchings only reorder sums: tiny differences in fp32, fp16 rounding in fp16
ATOL = {runtime: 2e-2 if runtime == "ort-fp16-native" else 1e-4 for runtime in RUNTIMES}
SLICE_BYTES = 16 << 10  # 16 slices of the 1024 x 64 embedding in fp32


@pytest.fixture(scope="module")
def tiny_export_fp16(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    from mexport.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "tiny-fp16"
    export_onnx(tiny_checkpoint, out, dtype="fp16", validate=False)
    return out


@pytest.fixture(scope="module")
def tiny_export_full_logits(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    from mexport.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "tiny-fp32-full-logits"
    export_onnx(tiny_checkpoint, out, dtype="fp32", full_logits=True, validate=False)
    return out


class Backend(NamedTuple):
    runtime: DecoderRuntime
    atol: float


@pytest.fixture(scope="module", params=RUNTIMES)
def backend(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> Iterator[Backend]:
    from mexport.runtime import torch_runtime, upcast
    from mexport.runtime.ort import OrtDecoder
    from mexport.runtime.torch_runtime import TorchDecoder

    if request.param.startswith("torch"):
        upcast_at_run_time = request.param.endswith("upcast")
        decoder: DecoderRuntime = TorchDecoder(tiny_checkpoint, dtype="fp32", upcast_at_run_time=upcast_at_run_time)
    elif request.param == "ort-fp16-native":
        decoder = OrtDecoder(request.getfixturevalue("tiny_export_fp16"), fp32_compute=False)
    elif request.param == "ort-fp32-full-logits":
        decoder = OrtDecoder(request.getfixturevalue("tiny_export_full_logits"))
    else:
        export = request.getfixturevalue(f"tiny_export_{request.param.split('-')[1]}")
        decoder = OrtDecoder(export, low_memory=request.param.endswith("low-memory"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_runtime, "UPCAST_SLICE_BYTES", SLICE_BYTES)
        patch.setattr(upcast, "DEFAULT_SLICE_BYTES", SLICE_BYTES)
        with decoder:
            yield Backend(decoder, ATOL[request.param])


def token_ids(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 1000, (1, length)).astype(np.int64)


def decode_in_chunks(runtime: DecoderRuntime, ids: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Logits for ``ids`` fed as a prefill then further chunks, each step reusing the previous cache."""
    logits, past, fed = [], None, 0
    for size in chunks:
        mask = np.ones((ids.shape[0], fed + size), dtype=np.int64)
        step_logits, past = runtime.forward(ids[:, fed : fed + size], mask, past)
        logits.append(step_logits)
        fed += size
    return np.concatenate(logits, axis=1)


def test_logits_are_float32_with_vocab_width(backend: Backend) -> None:
    runtime = backend.runtime
    logits, _ = runtime.forward(token_ids(6, 0), np.ones((1, 6), dtype=np.int64))
    assert logits.dtype == np.float32
    assert logits.shape == (1, 6, runtime.spec.vocab_size)
    assert np.isfinite(logits).all()


def test_step_decoding_past_the_sliding_window_matches_full_forward(backend: Backend) -> None:
    runtime = backend.runtime
    ids = token_ids(20, 1)
    assert runtime.spec.sliding_window is not None and ids.shape[1] > 2 * runtime.spec.sliding_window
    full, _ = runtime.forward(ids, np.ones_like(ids))
    stepped = decode_in_chunks(runtime, ids, [5, 3, 3, 1, 1, 1, 6])
    np.testing.assert_allclose(stepped, full, atol=backend.atol, rtol=0)


@pytest.mark.parametrize("keep", [1, 3, 20])
def test_logits_to_keep_returns_the_trailing_rows_of_the_full_forward(backend: Backend, keep: int) -> None:
    runtime = backend.runtime
    ids = token_ids(20, 2)
    full, full_past = runtime.forward(ids, np.ones_like(ids))
    lean, lean_past = runtime.forward(ids, np.ones_like(ids), logits_to_keep=keep)
    assert lean.shape == (1, keep, runtime.spec.vocab_size)
    np.testing.assert_allclose(lean, full[:, -keep:], atol=backend.atol, rtol=0)
    step = np.array([[5]], dtype=np.int64)
    mask = np.ones((1, 21), dtype=np.int64)  # the cache is the same whatever logits were kept
    np.testing.assert_allclose(
        runtime.forward(step, mask, lean_past)[0], runtime.forward(step, mask, full_past)[0], atol=backend.atol, rtol=0
    )


@pytest.mark.parametrize(("chunk", "keep"), [(4, 0), (4, 1), (6, 9), (7, 20)])
def test_chunked_prefill_matches_one_shot_prefill(backend: Backend, chunk: int, keep: int) -> None:
    """More new tokens than prefill_chunk run as chunks through the cache, with the same logits and cache; any length
    is still accepted (limits.max_input_len stays None)."""
    runtime = backend.runtime
    ids = token_ids(20, 8)
    one_shot, one_shot_past = runtime.forward(ids, np.ones_like(ids), logits_to_keep=keep)
    runtime.prefill_chunk = chunk
    try:
        assert runtime.limits.max_input_len is None
        chunked, chunked_past = runtime.forward(ids, np.ones_like(ids), logits_to_keep=keep)
    finally:
        runtime.prefill_chunk = None
    assert chunked.shape == one_shot.shape == (1, keep or 20, runtime.spec.vocab_size)
    np.testing.assert_allclose(chunked, one_shot, atol=backend.atol, rtol=0)
    step, mask = np.array([[9]], dtype=np.int64), np.ones((1, 21), dtype=np.int64)
    np.testing.assert_allclose(
        runtime.forward(step, mask, chunked_past)[0], runtime.forward(step, mask, one_shot_past)[0],
        atol=backend.atol, rtol=0,
    )


def test_left_padded_rows_match_unpadded_singles(backend: Backend) -> None:
    runtime = backend.runtime
    lengths = [14, 20, 9]
    prompts = [token_ids(length, seed) for seed, length in enumerate(lengths, start=10)]
    width = max(lengths)
    batch = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    continuation = np.array([[7], [8], [9]], dtype=np.int64)

    batch_logits, batch_past = runtime.forward(batch, mask)
    mask = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=1)
    batch_next, _ = runtime.forward(continuation, mask, batch_past)

    for row, prompt in enumerate(prompts):
        length = prompt.shape[1]
        single_logits, single_past = runtime.forward(prompt, np.ones_like(prompt))
        single_next, _ = runtime.forward(continuation[row : row + 1], np.ones((1, length + 1), np.int64), single_past)
        np.testing.assert_allclose(batch_logits[row, width - length :], single_logits[0], atol=backend.atol, rtol=0)
        np.testing.assert_allclose(batch_next[row], single_next[0], atol=backend.atol, rtol=0)


def test_repeat_past_shares_one_prompt_between_continuations(backend: Backend) -> None:
    runtime = backend.runtime
    prompt = token_ids(12, 3)
    _, past = runtime.forward(prompt, np.ones_like(prompt))
    options = np.array([[11, 12], [13, 14], [15, 16]], dtype=np.int64)
    mask = np.ones((3, prompt.shape[1] + 2), dtype=np.int64)
    repeated, _ = runtime.forward(options, mask, runtime.repeat_past(past, 3))
    for row in range(3):
        # the batch-1 cache is reused for every option: forward must not have consumed or grown it
        single, _ = runtime.forward(options[row : row + 1], mask[:1], past)
        np.testing.assert_allclose(repeated[row], single[0], atol=backend.atol, rtol=0)


def test_a_mask_not_covering_the_cache_is_refused(backend: Backend) -> None:
    runtime = backend.runtime
    _, past = runtime.forward(token_ids(4, 6), np.ones((1, 4), np.int64))
    with pytest.raises(ValueError, match=r"past 4 \+ new 1"):
        runtime.forward(token_ids(1, 7), np.ones((1, 1), np.int64), past)


def test_greedy_generate_matches_full_forward_argmax(backend: Backend) -> None:
    runtime = backend.runtime
    prompt = token_ids(6, 4)
    generated = runtime.generate(prompt, max_new_tokens=5)
    assert generated.shape == (5,)
    full, _ = runtime.forward(np.concatenate([prompt, generated[None, :-1]], axis=1), np.ones((1, 10), np.int64))
    np.testing.assert_array_equal(full[0, 5:].argmax(-1), generated)


def test_native_fp16_keeps_the_cache_in_fp16(tiny_export_fp16: Path) -> None:
    from mexport.runtime.ort import OrtDecoder

    with OrtDecoder(tiny_export_fp16, fp32_compute=False) as decoder:
        assert decoder.precision == "fp16 weights, fp16 compute (ONNX Runtime CPU, ORT_ENABLE_ALL)"
        _, past = decoder.forward(token_ids(5, 5), np.ones((1, 5), np.int64))
        repeated = decoder.repeat_past(past, 2)
    assert {value.data_type() for value in [*past, *repeated]} == {"tensor(float16)"}
    assert {tuple(value.shape()) for value in repeated} == {(2, 2, 5, 32)}
