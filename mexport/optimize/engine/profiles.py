"""TensorRT optimization profiles derived from the manifest's IO signature and the user's limits.

Every dynamic dimension in the exported graph is one of four symbols (or a sum of them): ``batch_size``,
``sequence_length`` (new tokens this call), ``past_sequence_length`` (cached tokens) and, in lean-logits graphs,
``logits_length`` (positions whose logits the call asks for, the ``logits_indices`` input). A profile gives each
symbol a (min, opt, max) range and every input's shape follows by evaluating its dimensions, so the ranges of all
inputs are consistent with each other by construction (attention_mask's ``past + sequence`` cannot disagree with
the KV inputs). Unknown symbols are an error, never a guess.

Three profiles live in one engine: 0 = prefill (no past, up to ``prefill_chunk`` new tokens), 1 = decode (one new
token after up to ``max_context - 1`` cached ones) and 2 = chunk (up to ``prefill_chunk`` new tokens after a past).
A prompt longer than the prefill profile runs as a prefill chunk then chunks with a past, so the engine reaches
``max_context`` without an activation-sized prefill profile; the chunk profile also scores multi-token answers
after a shared prompt in one call. TensorRT needs min <= opt <= max per dimension; prefill pins the past to 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mexport.formats import LOGITS_INDICES
from mexport.trt_common import BATCH, LOGITS, PAST, SEQUENCE, EngineLimits, resolve_shape


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes in one profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class OptimizationProfile:
    """A named profile: every graph input's (min, opt, max) shapes, in graph input order."""

    index: int
    name: str
    symbols: dict[str, tuple[int, int, int]]
    shapes: dict[str, ShapeRange]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "symbols": {name: list(values) for name, values in self.symbols.items()},
            "inputs": {name: shape.to_dict() for name, shape in self.shapes.items()},
        }


def symbol_ranges(limits: EngineLimits, lean: bool) -> list[tuple[str, dict[str, tuple[int, int, int]]]]:
    """(profile name, {symbol: (min, opt, max)}) for prefill, decode and chunk; ``lean`` adds logits_length."""
    batch = (1, limits.opt_batch, limits.max_batch)
    chunk = min(limits.chunk, limits.max_context)
    longest_past = limits.max_context - 1
    half_chunk = max(1, chunk // 2)
    prefill = {BATCH: batch, SEQUENCE: (1, half_chunk, chunk), PAST: (0, 0, 0)}
    decode = {BATCH: batch, SEQUENCE: (1, 1, 1), PAST: (0, min(limits.max_context // 2, longest_past), longest_past)}
    after = {BATCH: batch, SEQUENCE: (1, half_chunk, chunk), PAST: (1, max(1, limits.max_context // 2), longest_past)}
    profiles = [("prefill", prefill), ("decode", decode), ("chunk", after)]
    if lean:
        logits = min(limits.max_logits, chunk)
        for name, symbols in profiles:
            symbols[LOGITS] = (1, 1, 1) if name == "decode" else (1, 1, logits)
    return profiles


def derive_profiles(inputs: Sequence[Mapping[str, Any]], limits: EngineLimits) -> list[OptimizationProfile]:
    """The prefill, decode and chunk profiles for a manifest's ``io["inputs"]``."""
    lean = any(entry["name"] == LOGITS_INDICES for entry in inputs)
    profiles = []
    for index, (name, symbols) in enumerate(symbol_ranges(limits, lean)):
        # symbol values at the min, opt and max corner of the profile
        corners = [{symbol: bounds[corner] for symbol, bounds in symbols.items()} for corner in range(3)]
        shapes = {
            entry["name"]: ShapeRange(
                *(resolve_shape(entry["shape"], values, f"input {entry['name']}") for values in corners)
            )
            for entry in inputs
        }
        profiles.append(OptimizationProfile(index, name, symbols, shapes))
    return profiles
