"""TensorRT optimization profiles derived from the manifest's IO signature and the user's limits.

Every dynamic dimension in the exported graph is one of three symbols (or a sum of them): ``batch_size``,
``sequence_length`` (new tokens this step) and ``past_sequence_length`` (cached tokens). A profile gives each symbol
a (min, opt, max) range and every input's shape follows by evaluating its dimensions, so the ranges of all inputs
are consistent with each other by construction (attention_mask's ``past + sequence`` cannot disagree with the KV
inputs). Unknown symbols are an error, never a guess.

Two profiles live in one engine: 0 = prefill (no past, up to ``max_input_len`` new tokens) and 1 = decode (one new
token after up to ``max_context - 1`` cached ones). TensorRT needs min <= opt <= max per dimension, and a past of
length 0 must be allowed in prefill, so prefill pins the past to exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mexport.errors import MexportError
from mexport.formats import LOGITS_LENGTH_AXIS

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
LOGITS = LOGITS_LENGTH_AXIS  # rows of logits a lean graph computes (its logits_indices input)
SYMBOLS = (BATCH, SEQUENCE, PAST, LOGITS)

PREFILL = 0
DECODE = 1


@dataclass(frozen=True)
class EngineLimits:
    """The largest shapes an engine accepts, and the batch it is tuned for."""

    max_batch: int
    max_input_len: int
    max_context: int
    opt_batch: int = 1

    def validate(self, max_position_embeddings: int | None = None) -> None:
        for name in ("max_batch", "max_input_len", "max_context", "opt_batch"):
            if getattr(self, name) < 1:
                raise MexportError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.opt_batch > self.max_batch:
            raise MexportError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.max_input_len > self.max_context:
            raise MexportError(
                f"--max-input-len {self.max_input_len} is larger than --max-context {self.max_context} "
                "(the context holds the prompt plus generated tokens)"
            )
        if max_position_embeddings is not None and self.max_context > max_position_embeddings:
            raise MexportError(
                f"--max-context {self.max_context} exceeds the model's max_position_embeddings "
                f"{max_position_embeddings}"
            )

    def to_dict(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_input_len": self.max_input_len,
            "max_context": self.max_context,
            "opt_batch": self.opt_batch,
        }


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


def dimension_value(dim: int | str, values: Mapping[str, int], where: str) -> int:
    """An int dimension as is; a symbolic one (``"past_sequence_length + sequence_length"``) evaluated."""
    if isinstance(dim, int):
        return dim
    total = 0
    for term in dim.split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in values:
            total += values[term]
        else:
            raise MexportError(
                f"{where}: dimension {dim!r} uses {term!r}, which is none of {', '.join(SYMBOLS)}",
                hint="engines are built from mexport exports, whose manifest io uses these names",
            )
    return total


def resolve_shape(shape: Sequence[int | str], values: Mapping[str, int], where: str) -> tuple[int, ...]:
    """A concrete shape from a manifest shape and symbol values."""
    return tuple(dimension_value(dim, values, where) for dim in shape)


def symbol_ranges(limits: EngineLimits) -> list[tuple[str, dict[str, tuple[int, int, int]]]]:
    """(profile name, {symbol: (min, opt, max)}) for prefill and decode."""
    batch = (1, limits.opt_batch, limits.max_batch)
    longest_past = limits.max_context - 1
    prefill = {
        BATCH: batch, SEQUENCE: (1, max(1, limits.max_input_len // 2), limits.max_input_len), PAST: (0, 0, 0),
        LOGITS: (1, 1, limits.max_input_len),  # a prefill usually needs the next token only
    }
    decode = {
        BATCH: batch, SEQUENCE: (1, 1, 1), PAST: (0, min(limits.max_context // 2, longest_past), longest_past),
        LOGITS: (1, 1, 1),
    }
    return [("prefill", prefill), ("decode", decode)]


def derive_profiles(inputs: Sequence[Mapping[str, Any]], limits: EngineLimits) -> list[OptimizationProfile]:
    """The prefill and decode profiles for a manifest's ``io["inputs"]``."""
    profiles = []
    for index, (name, symbols) in enumerate(symbol_ranges(limits)):
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
