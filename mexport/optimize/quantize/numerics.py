"""The arithmetic of each quantization scheme, on NumPy arrays (no graph, no I/O).

Weights are linear-layer matrices laid out as the exporter stores them for ``MatMul``: ``[in_features,
out_features]``. All schemes are symmetric with strictly positive scales and no zero offset, the only form
TensorRT's Q/DQ layers accept; rounding is to nearest, ties to even (``np.rint``), as ONNX and TensorRT specify.
Scales are rounded to the model's float dtype *before* the values are computed from them, so what a
DequantizeLinear reconstructs is exactly what was measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mexport.lazy import require
from mexport.quant_schemes import SCHEMES

# floor for activation ranges: a channel that never fired still gets a usable, finite scale
MIN_ACTIVATION_AMAX = 1e-6
# float32 elements converted at once when quantizing a large weight (64 MB)
CHUNK_ELEMENTS = 1 << 24


def float_dtype(name: str) -> np.dtype:
    """NumPy dtype for a manifest dtype name ("float32", "bfloat16", "float16")."""
    if name == "bfloat16":
        return np.dtype(require("ml_dtypes").bfloat16)
    return np.dtype(name)


def storage_dtype(scheme: str) -> np.dtype:
    storage = SCHEMES[scheme].storage
    return np.dtype(getattr(np, storage, None) or getattr(require("ml_dtypes", "low-precision NumPy types"), storage))


def make_scale(amax: np.ndarray, scheme: str, scale_dtype: np.dtype) -> np.ndarray:
    """``amax / qmax`` rounded to ``scale_dtype``, never zero (a zero scale would divide by zero in Q)."""
    return positive_scale(np.asarray(amax, dtype=np.float32) / SCHEMES[scheme].qmax, scale_dtype)


def positive_scale(scale: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
    """``scale`` rounded to ``scale_dtype``, zeros (all-zero channels or blocks) raised to its smallest normal."""
    rounded = np.asarray(scale).astype(scale_dtype)
    tiny = np.array(require("ml_dtypes").finfo(scale_dtype).tiny, dtype=scale_dtype)  # np.finfo has no bfloat16
    return np.where(rounded.astype(np.float32) > 0, rounded, tiny)


def range_scale(values: np.ndarray, scheme: str, axis: int) -> np.ndarray:
    """``max(min / qmin, max / qmax)`` along ``axis``: the smallest positive scale that represents both ends of
    the range on the scheme's grid (``amax / qmax`` for the grids symmetric about 0; int4's -8..7 gains the -8)."""
    scheme_spec = SCHEMES[scheme]
    return np.maximum(values.min(axis=axis) / scheme_spec.qmin, values.max(axis=axis) / scheme_spec.qmax)


def quantize_values(values: np.ndarray, scale: np.ndarray, scheme: str) -> np.ndarray:
    """``values / scale`` clipped to the scheme's range and rounded into its storage type."""
    scaled = np.clip(values.astype(np.float32) / scale.astype(np.float32), SCHEMES[scheme].qmin, SCHEMES[scheme].qmax)
    if scheme == "fp8":
        return scaled.astype(storage_dtype("fp8"))  # round-to-nearest-even cast, in range after the clip
    return np.rint(scaled).astype(np.int8).astype(storage_dtype(scheme))


@dataclass
class QuantizedWeight:
    """A quantized ``[in, out]`` weight and how to dequantize it (the attributes of its DequantizeLinear)."""

    values: np.ndarray  # [in, out], storage dtype of the scheme
    scale: np.ndarray  # [out] per channel, or [in / block_size, out] per block
    scheme: str
    block_size: int | None = None  # None: per output channel (axis 1)
    zero_point: np.ndarray | None = None  # asymmetric schemes only (shape of scale, storage dtype)

    @property
    def granularity(self) -> str:
        return "per-channel" if self.block_size is None else f"block-{self.block_size}"

    def dequantize(self) -> np.ndarray:
        scale = self.scale.astype(np.float32)
        if self.block_size is not None:
            scale = np.repeat(scale, self.block_size, axis=0)
        values = self.values.astype(np.float32)
        if self.zero_point is not None:
            zero_point = self.zero_point.astype(np.float32)
            values = values - (np.repeat(zero_point, self.block_size, axis=0) if self.block_size else zero_point)
        return values * scale


def column_slices(shape: tuple[int, ...]) -> list[slice]:
    """Output-column ranges of an ``[in, out]`` weight small enough to convert to float32 one at a time."""
    rows, cols = shape
    width = max(1, CHUNK_ELEMENTS // max(rows, 1))
    return [slice(start, min(start + width, cols)) for start in range(0, cols, width)]


def quantize_weight(
    weight: np.ndarray, scheme: str, scale_dtype: np.dtype, block_size: int | None = None
) -> QuantizedWeight:
    """Symmetric round-to-nearest of an ``[in, out]`` weight: one range-rule scale per output column, or per block
    of ``block_size`` input rows within each column (``in`` must be a multiple of ``block_size``).

    ``weight`` may be a memory-mapped view in its stored dtype: it is read and converted a slice of columns at a
    time, so a tied 256000-row embedding never exists in float32 as a whole.
    """
    rows, cols = weight.shape
    values = np.empty((rows, cols), dtype=storage_dtype(scheme))
    scale = np.empty((cols,) if block_size is None else (rows // block_size, cols), dtype=scale_dtype)
    for columns in column_slices(weight.shape):
        chunk = np.asarray(weight[:, columns], dtype=np.float32)
        if block_size is None:
            scale[columns] = positive_scale(range_scale(chunk, scheme, axis=0), scale_dtype)
            values[:, columns] = quantize_values(chunk, scale[None, columns], scheme)
        else:
            blocks = chunk.reshape(rows // block_size, block_size, chunk.shape[1])
            scale[:, columns] = positive_scale(range_scale(blocks, scheme, axis=1), scale_dtype)
            values[:, columns] = quantize_values(blocks, scale[:, None, columns], scheme).reshape(chunk.shape)
    return QuantizedWeight(values, scale, scheme, block_size)


def input_channel_absmax(weight: np.ndarray) -> np.ndarray:
    """``max_k |W[j, k]|`` for each input row j of an ``[in, out]`` weight (read a slice of columns at a time)."""
    absmax = np.zeros(weight.shape[0], dtype=np.float32)
    for columns in column_slices(weight.shape):
        np.maximum(absmax, np.abs(np.asarray(weight[:, columns], dtype=np.float32)).max(axis=1), out=absmax)
    return absmax


def effective_block_size(in_features: int, block_size: int) -> int:
    """The block size used for a layer: ``block_size`` when it divides ``in_features``, else the largest
    common divisor (TensorRT's blocked dequantization needs whole blocks)."""
    return int(np.gcd(in_features, block_size))


def activation_scale(amax: float, scheme: str, scale_dtype: np.dtype) -> np.ndarray:
    """Per-tensor activation scale from a calibrated absolute maximum."""
    return make_scale(np.array(max(float(amax), MIN_ACTIVATION_AMAX)), scheme, scale_dtype)


def smoothquant_factors(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.

    ``weight_absmax`` is the largest magnitude of input row j over every layer reading the same activation.
    Channels that are zero on either side keep ``s_j = 1`` (nothing to migrate).
    """
    x = np.asarray(activation_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    valid = (x > 0) & (w > 0)
    factors = np.ones_like(x)
    factors[valid] = x[valid] ** alpha / w[valid] ** (1.0 - alpha)
    return factors.astype(np.float32)
