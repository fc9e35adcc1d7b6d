"""Shared NumPy numerics (one definition of each, used by scoring, the quantize report and the statistics)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def log_softmax(values: npt.ArrayLike, axis: int = -1) -> np.ndarray:
    """Log-softmax along ``axis`` in float64, shifted by the max so large logits never overflow."""
    array = np.asarray(values, dtype=np.float64)
    shifted = array - array.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
