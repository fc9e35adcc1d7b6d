"""Quantization arithmetic, recipe table and calibration-file parsing: fast checks with no model."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mexport.errors import MexportError
from mexport.optimize.quantize.calibration import load_calibration, read_text_file
from mexport.optimize.quantize.numerics import (
    activation_scale,
    effective_block_size,
    quantize_weight,
    smoothquant_factors,
)
from mexport.optimize.quantize.recipes import RECIPES, get_recipe
from mexport.quant_schemes import FP8_E4M3_MAX

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(256, 48)).astype(np.float32)
    values[:, 3] *= 40  # an outlier column must not degrade the others' scales
    values[:, 7] = 0  # an all-zero column still gets a finite, positive scale
    return values


@pytest.mark.parametrize(("scheme", "block_size"), [("int8", None), ("int4", None), ("int4", 64), ("fp8", None)])
@pytest.mark.parametrize("scale_dtype", [np.dtype(np.float32), BF16], ids=["fp32", "bf16"])
def test_weight_round_trip_is_within_the_scheme_step(weight, scheme, block_size, scale_dtype) -> None:
    quantized = quantize_weight(weight, scheme, scale_dtype, block_size)
    assert quantized.values.shape == weight.shape
    assert quantized.scale.dtype == scale_dtype
    assert (quantized.scale.astype(np.float32) > 0).all(), "TensorRT needs strictly positive scales"
    scale = quantized.scale.astype(np.float32)
    scale = scale[None, :] if block_size is None else np.repeat(scale, block_size, axis=0)
    error = np.abs(quantized.dequantize() - weight)
    if scheme == "fp8":  # 3 mantissa bits: relative error <= 2^-4 of the value, or half the smallest subnormal step
        assert (error <= np.maximum(np.abs(weight) * 2.0**-4, scale * 2.0**-10) + 1e-7).all()
    else:
        assert (error <= scale / 2 + 1e-6).all()
    assert np.all(quantized.dequantize()[:, 7] == 0)


def test_int4_range_rule_uses_the_whole_grid_and_blocks_follow_the_input_dimension(weight) -> None:
    quantized = quantize_weight(weight, "int4", np.dtype(np.float32), 64)
    values = quantized.values.astype(np.int8)
    assert values.min() >= -8 and values.max() <= 7
    assert quantized.scale.shape == (256 // 64, 48)
    blocks = weight.reshape(4, 64, 48)
    expected = np.maximum(-blocks.min(axis=1) / 8, blocks.max(axis=1) / 7)
    live = [c for c in range(48) if c != 7]
    np.testing.assert_allclose(quantized.scale[:, live], expected[:, live], rtol=1e-6)
    codes = values.reshape(4, 64, 48)[:, :, live]
    # each block reaches -8 (its minimum sets the scale) or 7 (its maximum does)
    assert np.all((codes.min(axis=1) == -8) | (codes.max(axis=1) == 7))


def test_fp8_saturates_instead_of_overflowing_to_nan() -> None:
    scale = activation_scale(1.0, "fp8", np.dtype(np.float32))
    assert scale == pytest.approx(1.0 / FP8_E4M3_MAX)
    quantized = quantize_weight(np.array([[1.0, -1.0], [1000.0, 0.5]], np.float32), "fp8", np.dtype(np.float32))
    assert np.isfinite(quantized.dequantize()).all()


def test_smoothquant_factors_follow_the_formula_and_skip_dead_channels() -> None:
    activation = np.array([8.0, 1.0, 0.0, 4.0])
    weights = np.array([2.0, 1.0, 3.0, 0.0])
    factors = smoothquant_factors(activation, weights, alpha=0.5)
    np.testing.assert_allclose(factors, [np.sqrt(8) / np.sqrt(2), 1.0, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize(("features", "requested", "used"), [(3584, 128, 128), (64, 128, 64), (96, 64, 32)])
def test_block_size_is_clamped_to_whole_blocks(features: int, requested: int, used: int) -> None:
    assert effective_block_size(features, requested) == used


def test_recipe_table_and_unknown_recipe() -> None:
    assert set(RECIPES) == {"fp8", "int8-sq", "int8-wo", "int4-wo"}
    assert get_recipe("fp8").needs_calibration() and get_recipe("int8-sq").needs_calibration()
    assert not get_recipe("int8-wo").needs_calibration()
    assert get_recipe("int4-wo").needs_calibration() and not get_recipe("int4-wo").needs_calibration("rtn")
    with pytest.raises(MexportError, match="valid recipes: fp8, int8-sq, int8-wo, int4-wo"):
        get_recipe("int3")


# ---- calibration data ------------------------------------------------------------------------------------------


def test_jsonl_uses_text_field_else_first_string(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    rows = [{"text": "first sample"}, {"id": 3, "body": "second sample", "other": "x"}, {}]
    path.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n\n")
    assert read_text_file(path) == ["first sample", "second sample"]
    path.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(MexportError, match='calib.jsonl:1: no "text" field'):
        read_text_file(path)


def test_plain_text_splits_paragraphs_or_lines(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("para one\nstill one\n\npara two\n")
    assert read_text_file(path) == ["para one\nstill one", "para two"]
    path.write_text("line one\nline two\n\n")
    assert read_text_file(path) == ["line one", "line two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n \n", "has no text samples"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', r"bad.jsonl:2: malformed JSON"),
    ],
)
def test_bad_calibration_files_are_refused(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MexportError, match=message):
        load_calibration(path, 8, 0)


def test_default_calibration_is_seeded_medical_text() -> None:
    first = load_calibration(None, 16, seed=3)
    again = load_calibration(None, 16, seed=3)
    other = load_calibration(None, 16, seed=4)
    assert len(first.texts) == 16 and first.texts == again.texts and first.sha256 == again.sha256
    assert other.sha256 != first.sha256
    assert first.describe() == {"source": first.source, "sha256": first.sha256, "n": 16, "seed": 3}
    task = load_calibration("medmcqa", 200, seed=0)
    assert 0 < len(task.texts) < 200 and task.source == "medmcqa sample"


def test_missing_default_samples_need_calib(monkeypatch: pytest.MonkeyPatch) -> None:
    from mexport.optimize.quantize import calibration  # `mexport.optimize.quantize` is also the function

    def unavailable() -> list[str]:
        raise MexportError("sample file missing")

    monkeypatch.setattr(calibration, "default_texts", unavailable)
    with pytest.raises(MexportError, match="needs calibration data and the default samples are unavailable"):
        load_calibration(None, 8, 0)
    with pytest.raises(MexportError, match="not a task name"):
        load_calibration("no-such-file.jsonl", 8, 0)


def test_large_weights_are_quantized_in_column_slices_with_the_same_result(
    weight: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mexport.optimize.quantize import numerics

    whole = quantize_weight(weight.astype(BF16), "int4", BF16, 64)
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 256 * 5)  # 5 columns per slice, last slice partial
    assert len(numerics.column_slices(weight.shape)) == 10
    sliced = quantize_weight(weight.astype(BF16), "int4", BF16, 64)
    np.testing.assert_array_equal(sliced.values.astype(np.int8), whole.values.astype(np.int8))
    np.testing.assert_array_equal(sliced.scale.astype(np.float32), whole.scale.astype(np.float32))
    np.testing.assert_array_equal(numerics.input_channel_absmax(weight), np.abs(weight).max(axis=1))
