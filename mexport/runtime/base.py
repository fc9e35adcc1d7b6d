"""The interface every decoder backend implements (PyTorch, ONNX Runtime, TensorRT).

A runtime is a context manager: heavy setup (loading weights, creating sessions, deserializing engines) happens
in :meth:`DecoderRuntime.activate`, release in :meth:`DecoderRuntime.deactivate`. Arrays crossing the interface are
NumPy (int64 ids/masks, float32 logits); the KV cache is opaque to callers (each backend keeps it in its own form,
e.g. device buffers) and only passed back to the same runtime, expanded with :meth:`repeat_past`.

``forward(..., logits_to_keep=K)`` returns logits for the last K new positions only (0: all), as Hugging Face's
``logits_to_keep`` does: a prefill whose caller needs the next-token distribution asks for 1 and never pays for
``S x vocab`` logits. :attr:`DecoderRuntime.limits` says what one call may hold (a TensorRT engine's profiles, the
model's context); callers split batches and skip prompts to fit, and the runtime splits long inputs itself:
:meth:`DecoderRuntime.forward` runs more new tokens than :attr:`DecoderRuntime.prefill_chunk` as consecutive chunks
through the cache (chunked prefill), so a prompt reaches the context with bounded prefill activations. Backends
implement one call within the limits, :meth:`DecoderRuntime._forward`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np

from mexport.models import family_of

if TYPE_CHECKING:
    from mexport.manifest import VerifiedFiles

T = TypeVar("T")

PastKV = Any  # backend-specific KV cache; None means "no past" (prefill)


@dataclass(frozen=True)
class DecoderSpec:
    """What a caller needs to know about a decoder, read from the manifest or the HF config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int | None = None
    max_context: int | None = None  # max_position_embeddings: the longest past + new tokens the model was made for
    # prompts are scored with the tokenizer's BOS first, as lm-eval does for this family (see models.SpecialTokens)
    scores_with_bos: bool = True

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> DecoderSpec:
        """From a manifest's ``model_config`` or an HF ``config.json`` (they share these key names), with the
        facts its model family derives (head size, window, BOS policy)."""
        family = family_of(config)
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            num_kv_heads=int(config["num_key_value_heads"]),
            head_dim=family.head_dim(config),
            vocab_size=int(config["vocab_size"]),
            sliding_window=family.sliding_window(config),
            max_context=int(config["max_position_embeddings"]) if config.get("max_position_embeddings") else None,
            scores_with_bos=family.adds_bos,
        )


@dataclass(frozen=True)
class RuntimeLimits:
    """The most one :meth:`DecoderRuntime.forward` call may hold; None means no limit beyond memory."""

    max_batch: int | None = None  # rows per call (a TensorRT profile's largest batch)
    max_context: int | None = None  # cached + new tokens per row (the model's or the engine's context)
    max_input_len: int | None = None  # longest input (new tokens) one forward() accepts; None: any, chunked inside

    def to_dict(self) -> dict[str, int | None]:
        return {"max_batch": self.max_batch, "max_context": self.max_context, "max_input_len": self.max_input_len}


def kept_logits(new_tokens: int, logits_to_keep: int) -> int:
    """How many trailing positions a forward returns logits for (``logits_to_keep`` 0 means all of them)."""
    if not 0 <= logits_to_keep <= new_tokens:
        raise ValueError(f"logits_to_keep {logits_to_keep} outside 0..{new_tokens} (the new tokens of this call)")
    return logits_to_keep or new_tokens


def position_ids_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last ``new_tokens`` columns, counting only attended tokens (left padding aware).

    Matches Hugging Face's generate(): position = cumsum(mask) - 1, with padded slots set to 1.
    """
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:].astype(np.int64)


def check_forward_shapes(input_ids: np.ndarray, attention_mask: np.ndarray, past_length: int) -> None:
    """A mask must cover the cached positions plus the new ones; backends fail cryptically (or silently) otherwise."""
    batch, new_tokens = input_ids.shape
    if attention_mask.shape != (batch, past_length + new_tokens):
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != (batch {batch}, past {past_length} + new {new_tokens})"
        )


class DecoderRuntime(abc.ABC):
    """Causal LM decoder with an explicit KV cache."""

    name: str = "decoder"

    def __enter__(self) -> Self:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load heavy state; called once on ``__enter__``."""

    def deactivate(self) -> None:
        """Release heavy state; called on ``__exit__``."""

    spec: DecoderSpec  # set by each backend's __init__ from its manifest or config
    # True when forward computes logits only at the kept positions (PyTorch, lean graphs); False when the graph computes
    # every position's logits and the runtime slices them (older and --full-logits exports): callers size batches by it
    lean_logits: bool = True
    # new tokens per backend call (None: all at once); set it to bound the prefill's activations (attention is S x S)
    prefill_chunk: int | None = None
    # what verify_files() hashed: from then on, activate() and check_files_unchanged() refuse any of them changed
    files: VerifiedFiles | None = None

    def verify_files(self) -> VerifiedFiles:
        """Hash every file this runtime reads (against its manifest, where it has one) and keep the result in
        :attr:`files`, so a caller can name exactly what it scores; the bytes read later must be these."""
        raise NotImplementedError(f"{type(self).__name__} does not say which files it reads")

    def check_files_unchanged(self) -> None:
        """Refuse (IntegrityError) when a file :meth:`verify_files` hashed has been replaced or written since."""
        if self.files is not None:
            self.files.check_unchanged()

    @property
    def limits(self) -> RuntimeLimits:
        """What one forward call may hold: by default the model's context, any batch, any input length."""
        return RuntimeLimits(max_batch=None, max_context=self.spec.max_context)

    def _activated(self, state: T | None) -> T:
        """``state`` made by :meth:`activate`, or a clear error when the runtime is used outside its ``with``."""
        if state is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} used outside its context: use `with {name}(...) as runtime:`")
        return state

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV = None, logits_to_keep: int = 0
    ) -> tuple[np.ndarray, PastKV]:
        """Run ``input_ids`` (B, S) with ``attention_mask`` (B, P+S) after ``past`` (P cached positions).

        Returns float32 logits (B, K, V) of the last K = ``logits_to_keep`` new positions (all S when 0, see
        :func:`kept_logits`) and the cache extended to P+S positions. Position ids are derived from the mask with
        :func:`position_ids_from_mask`. More than :attr:`prefill_chunk` new tokens run as chunks, each after the
        cache of the previous one; a chunk before the kept tail computes one logits row, dropped.
        """
        new_tokens = input_ids.shape[1]
        kept = kept_logits(new_tokens, logits_to_keep)
        chunk = self.prefill_chunk
        if chunk is None or new_tokens <= chunk:
            return self._forward(input_ids, attention_mask, past, logits_to_keep)
        past_length = attention_mask.shape[1] - new_tokens
        pieces = []
        for start in range(0, new_tokens, chunk):
            stop = min(start + chunk, new_tokens)
            wanted = stop - max(start, new_tokens - kept)  # rows of this chunk inside the kept tail
            logits, past = self._forward(
                input_ids[:, start:stop], attention_mask[:, : past_length + stop], past, max(wanted, 1)
            )
            if wanted > 0:
                pieces.append(logits)
        return np.concatenate(pieces, axis=1), past

    def _forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV, logits_to_keep: int
    ) -> tuple[np.ndarray, PastKV]:
        """One backend call of :meth:`forward` (same arguments and result), its new tokens within the limits.

        Not abstract only so that a runtime overriding :meth:`forward` itself (test doubles) needs no stub."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _forward nor forward")

    @abc.abstractmethod
    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        """A cache of batch ``repeats`` from a batch-1 cache (one prompt shared by several continuations)."""

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding of a single unpadded prompt (1, S) with the KV cache; returns the new token ids."""
        mask = np.ones_like(input_ids, dtype=np.int64)
        logits, past = self.forward(input_ids.astype(np.int64), mask, None, logits_to_keep=1)
        new_tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            new_tokens.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(np.array([[token]], dtype=np.int64), mask, past, logits_to_keep=1)
        return np.array(new_tokens, dtype=np.int64)
