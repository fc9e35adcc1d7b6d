"""The int4 weight search on small random matrices: range rule, clipping, GPTQ, AWQ, asymmetric, and the
per-layer choice and int8 selection built on them."""

from __future__ import annotations

import numpy as np
import pytest

from mexport.optimize.quantize import int4
from mexport.optimize.quantize.calibration import gram_batches
from mexport.optimize.quantize.numerics import quantize_weight
from mexport.optimize.quantize.weight_search import choose_int8_layers, parse_int8_layers
from mexport.quant_schemes import SCHEMES, get_scheme
from mexport.runtime.cuda_kernels import BLOCKED_TYPES, QDQ_MIN_OPSET

F32 = np.dtype(np.float32)


@pytest.fixture(scope="module")
def layer() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows X [512, 128], Hessian X^T X / n, weight [128, 64]): correlated inputs with a few salient channels."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(128, 128)).astype(np.float32) * 0.3 + np.eye(128, dtype=np.float32)
    rows = rng.normal(size=(512, 128)).astype(np.float32) @ mixing
    rows[:, :4] *= 8
    weight = rng.standard_t(df=4, size=(128, 64)).astype(np.float32) * 0.05
    return rows, rows.T @ rows / len(rows), weight


def _loss(rows: np.ndarray, weight: np.ndarray, dequantized: np.ndarray) -> float:
    return float(np.mean((rows @ (weight - dequantized)) ** 2))


def test_clipping_search_never_loses_to_the_range_rule(layer) -> None:
    _, hessian, weight = layer
    importance = np.diag(hessian)
    plain = int4.clip_scales(weight, importance, 32, F32, search=False)
    clipped = int4.clip_scales(weight, importance, 32, F32)
    assert (clipped > 0).all() and (clipped <= plain).all()

    def weighted(scales: np.ndarray) -> np.ndarray:
        step = np.repeat(scales, 32, axis=0)
        error = importance[:, None] * (weight - int4.round_to_grid(weight, step) * step) ** 2
        return error.reshape(4, 32, 64).sum(axis=1)

    assert (weighted(clipped) <= weighted(plain) + 1e-12).all()
    assert weighted(clipped).sum() < 0.95 * weighted(plain).sum()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_are_int4_and_beat_clipping_on_correlated_inputs(layer, act_order: bool) -> None:
    rows, hessian, weight = layer
    codes, scales = int4.gptq(weight, hessian, 32, F32, act_order=act_order)
    assert codes.min() >= -8 and codes.max() <= 7 and np.all(codes == np.rint(codes))
    assert scales.shape == (4, 64) and (scales > 0).all()
    dequantized = codes * np.repeat(scales, 32, axis=0)
    clip_scales = int4.clip_scales(weight, np.diag(hessian), 32, F32)
    clipped = int4.round_to_grid(weight, np.repeat(clip_scales, 32, axis=0)) * np.repeat(clip_scales, 32, axis=0)
    assert _loss(rows, weight, dequantized) < 0.9 * _loss(rows, weight, clipped)


def test_gptq_survives_dead_input_channels(layer) -> None:
    rows, _, weight = layer
    dead = rows.copy()
    dead[:, 5] = 0
    codes, scales = int4.gptq(weight, dead.T @ dead / len(dead), 32, F32)
    assert np.isfinite(scales).all() and np.all(codes[5] == 0)


def test_layer_choice_keeps_the_lowest_output_error_and_records_every_method(layer) -> None:
    rows, hessian, weight = layer
    choice = int4.quantize_layer(weight, hessian, int4.OutputError(rows), 32, F32)
    assert set(choice.losses) == set(int4.METHODS)
    assert choice.loss == min(choice.losses.values()) <= choice.losses["rtn"]
    assert choice.loss == pytest.approx(_loss(rows, weight, choice.quantized.dequantize()), rel=1e-4)
    assert choice.quantized.values.dtype == np.dtype(SCHEMES["int4"].storage)


def test_awq_group_is_never_worse_than_unscaled_and_scales_salient_channels(layer) -> None:
    rows, hessian, weight = layer
    group = int4.quantize_group([weight], hessian, rows, np.abs(rows).mean(axis=0), [32], F32, ("rtn", "clip"))
    assert sum(choice.loss for choice in group.layers) <= group.unscaled_loss
    if group.factors is not None:
        assert group.alpha > 0 and group.factors[:4].mean() > group.factors[4:].mean()
        dequantized = group.layers[0].quantized.dequantize() / group.factors[:, None]
        assert group.layers[0].loss == pytest.approx(_loss(rows, weight, dequantized), rel=1e-4)


def test_asymmetric_uint4_has_zero_points_and_reconstructs_within_a_step(layer) -> None:
    _, _, weight = layer
    quantized = int4.asymmetric_uint4(weight, np.ones(128, np.float32), 32, F32)
    assert quantized.scheme == "uint4" and quantized.zero_point is not None
    codes = quantized.values.astype(np.int16)
    assert codes.min() >= 0 and codes.max() <= 15 and quantized.zero_point.shape == (4, 64)
    symmetric = quantize_weight(weight, "int4", F32, 32).dequantize()
    assert np.abs(quantized.dequantize() - weight).mean() < np.abs(symmetric - weight).mean()


def test_gram_batches_respect_the_budget_and_keep_order() -> None:
    tensors = {"a": 100, "b": 100, "c": 300, "d": 10}
    batches = gram_batches(tensors, budget_bytes=8 * 100 * 100 * 2)
    assert [list(batch) for batch in batches] == [["a", "b"], ["c"], ["d"]]


def test_int8_layer_selection_by_count_auto_and_pattern() -> None:
    class Layer:
        def __init__(self, name: str, size: int) -> None:
            self.name, self.in_features, self.out_features = name, size, size

        def match_names(self) -> tuple[str, ...]:
            return (self.name,)

    layers = [Layer(f"/layers.{i}/mlp/down_proj", 10) for i in range(20)]
    errors = {layer.name: float(i) for i, layer in enumerate(layers)}
    assert choose_int8_layers(layers, 2, errors, None) == ["/layers.19/mlp/down_proj", "/layers.18/mlp/down_proj"]
    assert len(choose_int8_layers(layers, "auto", errors, None)) == 2  # 10% of the weights
    assert choose_int8_layers(layers, None, errors, None) == []
    picked = choose_int8_layers(layers, "layers.1/", errors, lambda pattern, names: any(pattern in n for n in names))
    assert picked == ["/layers.1/mlp/down_proj"]
    assert parse_int8_layers("3") == 3 and parse_int8_layers("auto") == "auto"


def test_scheme_table_is_what_the_cuda_check_and_recipes_read() -> None:
    assert (get_scheme("int4").qmin, get_scheme("int4").qmax, get_scheme("int4").levels) == (-8, 7, 16)
    assert get_scheme("uint4").symmetric is False and "zero points" in (get_scheme("uint4").tensorrt or "")
    assert QDQ_MIN_OPSET["int4"] == 21 and QDQ_MIN_OPSET["float8e4m3fn"] == 19 and QDQ_MIN_OPSET["int8"] == 10
    assert set(BLOCKED_TYPES) == {"int4", "uint4"}
    assert get_scheme("int4").element_bytes == 0.5


def test_gram_sums_in_place_give_the_full_symmetric_hessian(monkeypatch: pytest.MonkeyPatch) -> None:
    from mexport.optimize.quantize import calibration

    monkeypatch.setattr(calibration, "SYMMETRIZE_ROWS", 16)  # several bands on a small matrix
    rows = np.random.default_rng(3).normal(size=(300, 64)).astype(np.float32)
    gram = None
    for start in range(0, 300, 100):
        gram = calibration._add_gram(gram, rows[start : start + 100])
    stats = calibration.ActivationStats(np.zeros(64), np.zeros(64), 300, gram_sum=gram)
    np.testing.assert_allclose(stats.take_hessian(), rows.T @ rows / 300, atol=1e-5)
    assert stats.gram_sum is None
