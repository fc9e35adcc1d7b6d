"""Symmetric int4 weight search: block scales, clipping, GPTQ and AWQ, chosen per layer by output error.

Every result is TensorRT's form: values on the int4 grid -8..7, one strictly positive scale per block of input
rows, no zero point. What differs is how the scales and values are picked:

- ``rtn``: each block's range rule ``s = max(-min/8, max/7)`` (the scale that fits the block's most negative value
  at -8 and its most positive at 7), then round to nearest. No calibration.
- ``clip``: the range rule shrunk by a ratio searched per block, minimising the block's error weighted by the
  layer's input energy ``diag(X^T X)`` (clipping a few outliers buys finer steps for the rest).
- ``gptq``: Frantar et al.'s GPTQ on the calibration Hessian ``H = X^T X / n``: rows are quantized one at a time
  and the rounding error is pushed onto the rows not yet quantized through ``H^-1``. In natural order each block's
  scale is searched (as ``clip``) on the already-updated weights when GPTQ reaches the block; with ``act_order``
  rows go in decreasing ``diag(H)`` and the scales are searched up front (blocks stay contiguous in the stored
  layout, which TensorRT needs).
- AWQ (per group of layers sharing an input): ``s = mean|x|^alpha`` moves salience into the weights; alpha is
  searched on the group's output error, then the scaled weights get the methods above. alpha = 0 is "no scaling".

The layer's output error ``||X (W - Q)||^2`` on sampled calibration rows decides between them, so the choice is
never worse than ``rtn`` on those rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mexport.optimize.quantize.numerics import (
    QuantizedWeight,
    column_slices,
    positive_scale,
    range_scale,
    storage_dtype,
)
from mexport.quant_schemes import SCHEMES

INT4 = SCHEMES["int4"]
# per-block shrink ratios of the range scale tried by the clipping search (1.0 = no clipping)
CLIP_RATIOS = tuple(1.0 - 0.025 * step for step in range(21))
AWQ_ALPHAS = tuple(step / 10 for step in range(10))
# GPTQ's damping, as a fraction of the Hessian's mean diagonal (keeps H invertible when channels are dead)
GPTQ_DAMPING = 0.01
GPTQ_BATCH_ROWS = 128
METHODS = ("rtn", "clip", "gptq", "gptq-act-order")


def round_to_grid(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Int4 codes (as float32) of ``values / scale``, ties to even, clipped to -8..7."""
    return np.clip(np.rint(values / scale), INT4.qmin, INT4.qmax)


def clip_scales(
    weight: np.ndarray, importance: np.ndarray, block_size: int, scale_dtype: np.dtype, search: bool = True
) -> np.ndarray:
    """Block scales ``[in / block, out]`` for an ``[in, out]`` float32 weight: the range rule, and with ``search``
    the per-block shrink ratio that minimises ``sum_rows importance_row * (w - q)^2``."""
    rows, cols = weight.shape
    scales = np.empty((rows // block_size, cols), dtype=scale_dtype)
    weights = np.asarray(importance, np.float32).reshape(rows // block_size, block_size, 1)
    for columns in column_slices(weight.shape):
        blocks = np.asarray(weight[:, columns], np.float32).reshape(rows // block_size, block_size, -1)
        base = range_scale(blocks, "int4", axis=1)
        best = positive_scale(base, scale_dtype)
        if search:
            best_error = np.full(base.shape, np.inf, dtype=np.float32)
            for ratio in CLIP_RATIOS:
                scale = positive_scale(base * ratio, scale_dtype)
                scale32 = scale.astype(np.float32)[:, None, :]
                error = (weights * (blocks - round_to_grid(blocks, scale32) * scale32) ** 2).sum(axis=1)
                better = error < best_error
                best = np.where(better, scale, best)
                best_error = np.where(better, error, best_error)
        scales[:, columns] = best
    return scales


def _codes(weight: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    return round_to_grid(weight, np.repeat(scales.astype(np.float32), block_size, axis=0))


def _upper_inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` with ``H^-1 = U^T U`` (GPTQ's form of the inverse Hessian), computed in place in
    ``hessian`` (float32, symmetric) by LAPACK: Cholesky, inverse from it, Cholesky again."""
    from scipy.linalg import lapack

    matrix = hessian.T  # the Fortran-ordered view of a C-ordered symmetric matrix is the same matrix
    for routine in (lapack.spotrf, lapack.spotri, lapack.spotrf):
        result, info = routine(matrix, lower=0, **{"overwrite_c" if routine is lapack.spotri else "overwrite_a": 1})
        if info != 0:
            raise np.linalg.LinAlgError(f"GPTQ: {routine.__name__} failed (info {info}): Hessian not positive definite")
        matrix = result
    return matrix  # potrf's default ``clean`` zeroed the lower triangle


def gptq(
    weight: np.ndarray, hessian: np.ndarray, block_size: int, scale_dtype: np.dtype, act_order: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of an ``[in, out]`` weight against ``H = X^T X / n`` (``[in, in]``); returns (codes, block scales)."""
    rows = weight.shape[0]
    work = np.array(weight, dtype=np.float32)
    diagonal = np.diag(hessian).astype(np.float32)
    dead = diagonal <= 0
    work[dead] = 0.0
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(rows)
    h = np.array(hessian[np.ix_(order, order)] if act_order else hessian, dtype=np.float32, order="C")  # one copy
    importance = np.where(dead, 1.0, diagonal)[order] + GPTQ_DAMPING * float(np.mean(diagonal))
    h[np.diag_indices(rows)] = importance
    scales = np.empty((rows // block_size, weight.shape[1]), dtype=scale_dtype) if not act_order else clip_scales(
        work, np.where(dead, 0.0, diagonal), block_size, scale_dtype
    )
    work = work[order]
    upper = _upper_inverse_cholesky(h)
    del h
    codes = np.empty_like(work)
    batch = block_size * -(-GPTQ_BATCH_ROWS // block_size)
    for start in range(0, rows, batch):
        stop = min(start + batch, rows)
        chunk = work[start:stop].copy()
        errors = np.empty_like(chunk)
        for offset in range(stop - start):
            row = start + offset
            source = order[row]
            if not act_order and source % block_size == 0:
                block = slice(offset, offset + block_size)
                scales[source // block_size] = clip_scales(
                    chunk[block], importance[start + offset : start + offset + block_size], block_size, scale_dtype
                )[0]
            scale = scales[source // block_size].astype(np.float32)
            code = round_to_grid(chunk[offset], scale)
            error = (chunk[offset] - code * scale) / upper[row, row]
            chunk[offset:] -= np.outer(upper[row, row:stop], error)
            errors[offset] = error
            codes[row] = code
        work[stop:] -= upper[start:stop, stop:].T @ errors
    restored = np.empty_like(codes)
    restored[order] = codes
    return restored, scales


@dataclass
class LayerChoice:
    """The int4 weight picked for one layer and the output error of every method tried."""

    quantized: QuantizedWeight
    method: str
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.losses[self.method]


class OutputError:
    """``||X E||^2 / (n * out)`` for a weight error ``E``, on sampled calibration rows ``X`` (or through
    ``X^T X`` when it is the smaller form)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.asarray(rows, np.float32)
        count, width = self.rows.shape
        self.gram = self.rows.T @ self.rows / count if count > width else None

    def __call__(self, error: np.ndarray) -> float:
        if self.gram is not None:
            return float(np.sum((self.gram @ error) * error)) / error.shape[1]
        return float(np.mean((self.rows @ error) ** 2))

    def scaled(self, factors: np.ndarray) -> OutputError:
        """The same error for inputs divided by ``factors`` per channel (AWQ's ``X / s``)."""
        return OutputError(self.rows / factors[None, :])


def quantize_layer(
    weight: np.ndarray,
    hessian: np.ndarray | None,
    output_error: OutputError,
    block_size: int,
    scale_dtype: np.dtype,
    methods: tuple[str, ...] = METHODS,
    divisor: np.ndarray | None = None,
) -> LayerChoice:
    """Every method in ``methods`` on one ``[in, out]`` float32 weight; keeps the lowest output error.

    ``divisor`` (AWQ): ``weight`` is ``diag(s) W``, its input is ``X / s``; the error is measured on ``W``'s
    output, i.e. with ``output_error`` of ``X`` and the dequantized weight divided back by ``s``.
    """
    importance = np.diag(hessian) if hessian is not None else np.ones(weight.shape[0], np.float32)
    candidates: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "rtn": lambda: _with_codes(weight, clip_scales(weight, importance, block_size, scale_dtype, False), block_size),
        "clip": lambda: _with_codes(weight, clip_scales(weight, importance, block_size, scale_dtype), block_size),
    }
    if hessian is not None:
        candidates["gptq"] = lambda: gptq(weight, hessian, block_size, scale_dtype)
        candidates["gptq-act-order"] = lambda: gptq(weight, hessian, block_size, scale_dtype, act_order=True)
    reference = weight if divisor is None else weight / divisor[:, None]
    best: LayerChoice | None = None
    losses: dict[str, float] = {}
    for method in methods:
        if method not in candidates:
            continue
        codes, scales = candidates[method]()
        dequantized = codes * np.repeat(scales.astype(np.float32), block_size, axis=0)
        if divisor is not None:
            dequantized = dequantized / divisor[:, None]
        losses[method] = output_error(reference - dequantized)
        if best is None or losses[method] < best.loss:
            values = codes.astype(np.int8).astype(storage_dtype("int4"))
            best = LayerChoice(QuantizedWeight(values, scales, "int4", block_size), method, losses)
    assert best is not None, f"no int4 method among {methods}"
    best.losses = losses
    return best


def _with_codes(weight: np.ndarray, scales: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    return _codes(weight, scales, block_size), scales


@dataclass
class GroupChoice:
    """AWQ's factors for a group of layers sharing an input (None: unscaled) and each layer's choice."""

    factors: np.ndarray | None
    alpha: float
    layers: list[LayerChoice]
    unscaled_loss: float  # the group's output error without AWQ scaling


def awq_factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``mean|x|^alpha``, normalised to a geometric mean range around 1."""
    salience = np.maximum(np.asarray(mean_abs, dtype=np.float64), 1e-8) ** alpha
    return (salience / np.sqrt(salience.max() * salience.min())).astype(np.float32)


def search_awq_alpha(
    weights: list[np.ndarray], mean_abs: np.ndarray, output_error: OutputError, block_size: int, scale_dtype: np.dtype
) -> float:
    """The AWQ alpha whose range-rule int4 weights best reproduce the group's float outputs (0: no scaling)."""
    best_alpha, best_loss = 0.0, np.inf
    for alpha in AWQ_ALPHAS:
        factors = awq_factors(mean_abs, alpha)
        loss = 0.0
        for weight in weights:
            scaled = weight * factors[:, None]
            ones = np.ones(weight.shape[0], np.float32)
            codes, scales = _with_codes(scaled, clip_scales(scaled, ones, block_size, scale_dtype, False), block_size)
            dequantized = codes * np.repeat(scales.astype(np.float32), block_size, axis=0) / factors[:, None]
            loss += output_error(weight - dequantized)
        if loss < best_loss:
            best_alpha, best_loss = alpha, loss
    return best_alpha


def quantize_group(
    weights: list[np.ndarray],
    hessian: np.ndarray | None,
    rows: np.ndarray,
    mean_abs: np.ndarray,
    block_sizes: list[int],
    scale_dtype: np.dtype,
    methods: tuple[str, ...] = METHODS,
    awq: bool = True,
) -> GroupChoice:
    """The best int4 form of each layer in a group sharing one input, with or without AWQ scaling."""
    output_error = OutputError(rows)
    plain = [
        quantize_layer(weight, hessian, output_error, block, scale_dtype, methods)
        for weight, block in zip(weights, block_sizes, strict=True)
    ]
    unscaled_loss = sum(choice.loss for choice in plain)
    if not awq or hessian is None and "clip" not in methods:
        return GroupChoice(None, 0.0, plain, unscaled_loss)
    alpha = search_awq_alpha(weights, mean_abs, output_error, min(block_sizes), scale_dtype)
    if alpha == 0.0:
        return GroupChoice(None, 0.0, plain, unscaled_loss)
    factors = awq_factors(mean_abs, alpha)
    scaled_hessian = None if hessian is None else hessian / np.outer(factors, factors)
    scaled = [
        quantize_layer(weight * factors[:, None], scaled_hessian, output_error, block, scale_dtype, methods, factors)
        for weight, block in zip(weights, block_sizes, strict=True)
    ]
    if sum(choice.loss for choice in scaled) < unscaled_loss:
        return GroupChoice(factors, alpha, scaled, unscaled_loss)
    return GroupChoice(None, 0.0, plain, unscaled_loss)


def asymmetric_uint4(weight: np.ndarray, importance: np.ndarray, block_size: int, scale_dtype: np.dtype) -> QuantizedWeight:
    """Asymmetric int4 for ONNX Runtime (not TensorRT): uint4 codes 0..15 with a per-block zero point, the block's
    range shrunk by the ratio that minimises its ``importance``-weighted error."""
    rows, cols = weight.shape
    shape = (rows // block_size, block_size, cols)
    blocks = np.asarray(weight, np.float32).reshape(shape)
    weights = np.asarray(importance, np.float32).reshape(rows // block_size, block_size, 1)
    low, high = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
    levels = SCHEMES["uint4"].qmax
    best_error = np.full(low.shape, np.inf, dtype=np.float32)
    best_scale = best_zero = None
    for ratio in CLIP_RATIOS:
        scale = positive_scale((high - low) * ratio / levels, scale_dtype)
        scale32 = scale.astype(np.float32)
        zero = np.clip(np.rint(-low * ratio / scale32), 0, levels)
        codes = np.clip(np.rint(blocks / scale32[:, None]) + zero[:, None], 0, levels)
        error = (weights * (blocks - (codes - zero[:, None]) * scale32[:, None]) ** 2).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = scale if best_scale is None else np.where(better, scale, best_scale)
        best_zero = zero if best_zero is None else np.where(better, zero, best_zero)
    assert best_scale is not None and best_zero is not None
    codes = np.clip(np.rint(blocks / best_scale.astype(np.float32)[:, None]) + best_zero[:, None], 0, levels)
    uint4 = storage_dtype("uint4")
    return QuantizedWeight(
        codes.reshape(rows, cols).astype(np.uint8).astype(uint4), best_scale, "uint4", block_size,
        best_zero.astype(np.uint8).astype(uint4),
    )
