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

from mexport.errors import MexportError
from mexport.formats import LOGITS_INDICES, LOGITS_LENGTH_AXIS

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
LOGITS = LOGITS_LENGTH_AXIS  # rows of logits a lean graph computes (its logits_indices input)
SYMBOLS = (BATCH, SEQUENCE, PAST, LOGITS)

DEFAULT_MAX_CONTEXT = 4096  # lowered to the model's max_position_embeddings when that is smaller
DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_PREFILL_CHUNK = 256  # keeps the 9B's batch-8 prefill activations near 1.5 GB (docs/engine.md)
DEFAULT_MAX_LOGITS = 64  # positions per call with logits: MCQ continuations and generation need a few


@dataclass(frozen=True)
class EngineLimits:
    """The largest shapes an engine accepts, and the batch it is tuned for."""

    max_batch: int
    max_input_len: int  # longest prompt (new tokens of one forward call), run in chunks of prefill_chunk
    max_context: int
    opt_batch: int = 1
    prefill_chunk: int | None = None  # new tokens per engine call; None (engines before chunking): max_input_len
    max_logits: int = DEFAULT_MAX_LOGITS  # lean-logits graphs: positions with logits per engine call

    @property
    def chunk(self) -> int:
        return self.prefill_chunk or self.max_input_len

    def validate(self, max_position_embeddings: int | None = None) -> None:
        for name in ("max_batch", "max_input_len", "max_context", "opt_batch", "prefill_chunk", "max_logits"):
            if getattr(self, name) is None:
                continue
            if getattr(self, name) < 1:
                raise MexportError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_context < 2:
            raise MexportError(f"--max-context must be at least 2 (prompt and generated token), got {self.max_context}")
        if self.opt_batch > self.max_batch:
            raise MexportError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.max_input_len > self.max_context:
            raise MexportError(
                f"--max-input-len {self.max_input_len} is larger than --max-context {self.max_context} "
                "(the context holds the prompt plus generated tokens)"
            )
        if self.chunk > self.max_input_len:
            raise MexportError(f"--prefill-chunk {self.chunk} is larger than --max-input-len {self.max_input_len}")
        if max_position_embeddings is not None and self.max_context > max_position_embeddings:
            raise MexportError(
                f"--max-context {self.max_context} exceeds the model's max_position_embeddings "
                f"{max_position_embeddings}",
                hint=f"pass --max-context {max_position_embeddings} or less (or leave it out: it defaults to "
                f"min({DEFAULT_MAX_CONTEXT}, max_position_embeddings))",
            )

    def to_dict(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_input_len": self.max_input_len,
            "max_context": self.max_context,
            "opt_batch": self.opt_batch,
            "prefill_chunk": self.chunk,
            "max_logits": self.max_logits,
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
