"""PyTorch reference runtime specifics: dtype selection, bf16 behaviour, one-line errors (contract: test_runtime_contract)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mexport.errors import MexportError
from mexport.runtime.base import DecoderSpec
from mexport.runtime.torch_runtime import TorchDecoder


def test_dtype_defaults_to_the_checkpoint_dtype(tiny_checkpoint: Path) -> None:
    decoder = TorchDecoder(tiny_checkpoint)
    assert decoder.dtype == "bf16"
    assert decoder.precision == "bf16 weights, bf16 compute (PyTorch cpu)"
    assert TorchDecoder(tiny_checkpoint, dtype="fp32").dtype == "fp32"


def test_spec_comes_from_the_config(tiny_checkpoint: Path) -> None:
    spec = TorchDecoder(tiny_checkpoint).spec
    assert spec == DecoderSpec(
        num_layers=4, num_kv_heads=2, head_dim=32, vocab_size=1024, sliding_window=8, max_context=512
    )


def test_bf16_computes_in_bf16_close_to_fp32(tiny_checkpoint: Path) -> None:
    ids = np.random.default_rng(0).integers(4, 1000, (1, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    with TorchDecoder(tiny_checkpoint, dtype="fp32") as fp32:
        reference, _ = fp32.forward(ids, mask)
    with TorchDecoder(tiny_checkpoint) as bf16:
        logits, past = bf16.forward(ids, mask)
    difference = np.abs(logits - reference).max()
    assert 0 < difference < 0.25  # bf16 rounding is visible, and small against logits of magnitude ~4
    assert str(past.layers[0].keys.dtype) == "torch.bfloat16"


def test_upcast_at_run_time_computes_fp32_over_the_stored_bf16_weights(tiny_checkpoint: Path) -> None:
    ids = np.random.default_rng(2).integers(4, 1000, (2, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    step_mask = np.ones((2, 21), np.int64)
    step_mask[1, :6] = 0
    with TorchDecoder(tiny_checkpoint, dtype="fp32") as fp32_copy:
        expected, past = fp32_copy.forward(ids, mask)
        expected_step, _ = fp32_copy.forward(ids[:, :1], step_mask, past)
    # upcast_slice_bytes: the tied LM head in 16 slices
    with TorchDecoder(tiny_checkpoint, dtype="fp32", upcast_at_run_time=True, upcast_slice_bytes=16 << 10) as decoder:
        assert decoder.precision == "bf16 weights, fp32 compute (PyTorch cpu)"
        model = decoder._loaded_model()
        assert {str(p.dtype) for p in model.parameters()} == {"torch.bfloat16"}
        logits, past = decoder.forward(ids, mask)
        step, _ = decoder.forward(ids[:, :1], step_mask, past)
    assert str(past.layers[0].keys.dtype) == "torch.float32"
    # the same fp32 arithmetic; slicing the LM head may only change how BLAS blocks its sums
    np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(step, expected_step, atol=1e-6, rtol=0)


def test_upcast_at_run_time_only_widens(tiny_checkpoint: Path) -> None:
    decoder = TorchDecoder(tiny_checkpoint, upcast_at_run_time=True)
    assert (decoder.dtype, decoder.weights_dtype) == ("bf16", "bf16")
    decoder = TorchDecoder(tiny_checkpoint, dtype="fp16", upcast_at_run_time=True)
    assert (decoder.dtype, decoder.weights_dtype) == ("fp16", "fp16")  # bf16 -> fp16 is a conversion, not an upcast


def test_sliding_window_layers_keep_only_their_window(tiny_checkpoint: Path) -> None:
    ids = np.random.default_rng(1).integers(4, 1000, (1, 20)).astype(np.int64)
    with TorchDecoder(tiny_checkpoint, dtype="fp32") as decoder:
        _, past = decoder.forward(ids, np.ones_like(ids))
    window = decoder.spec.sliding_window
    assert window == 8
    # layers alternate sliding / global, as in Gemma2; a sliding layer keeps window - 1 positions
    assert [layer.keys.shape[2] for layer in past.layers] == [window - 1, 20, window - 1, 20]


def test_not_a_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MexportError, match="no config.json"):
        TorchDecoder(tmp_path)


def test_checkpoint_without_safetensors_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(MexportError, match="not a safetensors checkpoint"):
        TorchDecoder(tmp_path)


@pytest.mark.parametrize(("option", "value"), [("dtype", "int8"), ("device", "tpu")])
def test_unknown_options_are_refused(tiny_checkpoint: Path, option: str, value: str) -> None:
    with pytest.raises(MexportError, match=f"unknown .*{value}"):
        TorchDecoder(tiny_checkpoint, **{option: value})


def test_cuda_without_a_gpu_says_so(tiny_checkpoint: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(MexportError, match="cuda.*is_available"):
        TorchDecoder(tiny_checkpoint, device="cuda").activate()


def test_forward_outside_the_context_is_a_programming_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(RuntimeError, match="outside its context"):
        TorchDecoder(tiny_checkpoint).forward(np.ones((1, 2), np.int64), np.ones((1, 2), np.int64))
