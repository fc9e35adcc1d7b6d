"""Calibrated int4: each layer input's statistics and Hessian, gathered pass by pass, and each layer's chosen form.

The Gram matrices ``X^T X`` are what bounds memory (down_proj's is 14336^2: 822 MB in float32 for the 9B), so the
layer inputs are split into runs that fit :func:`~mexport.optimize.quantize.calibration.gram_budget` (a quarter of
the weights' bytes, at least 1 GiB), one calibration pass each; a run's Hessians are dropped once its layers are
quantized. Only the chosen int4 codes
and scales are kept (half a byte per weight in the file, one byte per weight in memory until written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mexport.console import phase
from mexport.errors import MexportError
from mexport.formats import DATA_FILE
from mexport.optimize.quantize.calibration import collect_activation_stats, gram_batches, gram_budget
from mexport.optimize.quantize.graph import Linear, ModelGraph
from mexport.optimize.quantize.int4 import (
    METHODS,
    GroupChoice,
    LayerChoice,
    OutputError,
    asymmetric_uint4,
    quantize_group,
)
from mexport.optimize.quantize.numerics import effective_block_size

# --method: the int4 methods tried per layer, and whether AWQ scaling is searched too
INT4_METHODS: dict[str, tuple[tuple[str, ...], bool]] = {
    "auto": (METHODS, True),
    "gptq": (METHODS, False),
    "awq": (("rtn", "clip"), True),
    "clip": (("rtn", "clip"), False),
}
UNCALIBRATED_METHOD = "rtn"
METHOD_NAMES = (*INT4_METHODS, UNCALIBRATED_METHOD)
# --int8-layers auto: the layers with the largest relative int4 error, up to this share of the linear weights
AUTO_INT8_SHARE = 0.10


@dataclass
class Int4Plan:
    """What the search chose: per shared input, AWQ factors and each layer's weight; per layer, its error."""

    groups: dict[str, GroupChoice]
    relative_error: dict[str, float]  # layer name -> ||X (W - Q)||^2 / ||X W||^2 on calibration rows


def grouped_by_input(layers: list[Linear]) -> dict[str, list[Linear]]:
    groups: dict[str, list[Linear]] = {}
    for layer in layers:
        groups.setdefault(layer.input, []).append(layer)
    return groups


def check_method(method: str) -> None:
    if method not in METHOD_NAMES:
        raise MexportError(f"unknown int4 method {method!r}; valid: {', '.join(METHOD_NAMES)}")


def search_int4(
    graph: ModelGraph,
    manifest: dict[str, Any],
    layers: list[Linear],
    token_ids: list[np.ndarray],
    block_size: int,
    method: str,
    seed: int = 0,
    asymmetric: bool = False,
) -> Int4Plan:
    """Calibrate and pick every layer's int4 weight (``method``: a key of :data:`INT4_METHODS`)."""
    methods, awq = INT4_METHODS[method]
    groups = grouped_by_input(layers)
    choices: dict[str, GroupChoice] = {}
    relative: dict[str, float] = {}
    weight_bytes = (graph.model_dir / DATA_FILE).stat().st_size
    inputs = {tensor: group[0].in_features for tensor, group in groups.items()}
    batches = gram_batches(inputs, gram_budget(weight_bytes))
    for number, batch in enumerate(batches, start=1):
        stats = collect_activation_stats(graph, manifest, batch, token_ids, keep_rows=True, seed=seed, grams=True)
        with phase(f"int4 search ({method}), pass {number}/{len(batches)}: {len(batch)} layer inputs"):
            for tensor in batch:
                group, entry = groups[tensor], stats[tensor]
                weights = [np.asarray(graph.weight_matrix(layer.weight, layer.transposed), np.float32) for layer in group]
                blocks = [effective_block_size(layer.in_features, block_size) for layer in group]
                dtype = graph.numpy_dtype(group[0].weight)
                assert entry.rows is not None
                hessian = entry.take_hessian()
                if asymmetric:
                    choice = _asymmetric_group(weights, hessian, entry.rows, blocks, dtype)
                else:
                    choice = quantize_group(weights, hessian, entry.rows, entry.mean_abs, blocks, dtype, methods, awq)
                del hessian
                energy = OutputError(entry.rows)
                for layer, weight, layer_choice in zip(group, weights, choice.layers, strict=True):
                    relative[layer.name] = layer_choice.loss / max(energy(weight), 1e-30)
                choices[tensor] = choice
        del stats
    return Int4Plan(choices, relative)


def _asymmetric_group(
    weights: list[np.ndarray], hessian: np.ndarray, rows: np.ndarray, blocks: list[int], dtype: np.dtype
) -> GroupChoice:
    output_error = OutputError(rows)
    chosen = []
    for weight, block in zip(weights, blocks, strict=True):
        quantized = asymmetric_uint4(weight, np.diag(hessian), block, dtype)
        loss = output_error(weight - quantized.dequantize())
        chosen.append(LayerChoice(quantized, "asymmetric-clip", {"asymmetric-clip": loss}))
    return GroupChoice(None, 0.0, chosen, sum(choice.loss for choice in chosen))


def parse_int8_layers(value: str | int | None) -> str | int | None:
    """``--int8-layers``: "auto", a count, or a name pattern (None: none)."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value < 0:
            raise MexportError(f"--int8-layers must be auto, a count >= 0 or a pattern, got {value}")
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def ranks_layers(int8_layers: str | int | None) -> bool:
    """Whether ``--int8-layers`` needs each layer's measured error (auto or a count), i.e. calibration."""
    return int8_layers == "auto" or isinstance(int8_layers, int)


def choose_int8_layers(
    layers: list[Linear],
    int8_layers: str | int | None,
    relative_error: dict[str, float],
    matches: Any,
) -> list[str]:
    """Names of the layers kept at int8: the ``N`` layers with the largest relative int4 output error (for "auto",
    as many of them as fit in :data:`AUTO_INT8_SHARE` of the weights), or those whose names match the pattern
    (``matches(pattern, names)``)."""
    if int8_layers is None or int8_layers == 0:
        return []
    if not ranks_layers(int8_layers):
        return [layer.name for layer in layers if matches(str(int8_layers), layer.match_names())]
    ranked = sorted(layers, key=lambda layer: relative_error[layer.name], reverse=True)
    if int8_layers == "auto":
        budget = AUTO_INT8_SHARE * sum(layer.in_features * layer.out_features for layer in layers)
        kept = []
        for layer in ranked:
            budget -= layer.in_features * layer.out_features
            if budget < 0:
                break
            kept.append(layer.name)
        return kept
    return [layer.name for layer in ranked[: int(int8_layers)]]
