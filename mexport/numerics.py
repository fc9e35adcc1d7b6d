"""Shared NumPy numerics (one definition of each, used by scoring, the quantize report and the statistics)."""

from __future__ import annotations

import numpy as np


def log_softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Log-softmax along ``axis`` in float64, shifted by the max so large logits never overflow."""
    values = np.asarray(values, dtype=np.float64)
    shifted = values - values.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
