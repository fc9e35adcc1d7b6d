"""The interface every decoder backend implements (PyTorch, ONNX Runtime, TensorRT).

A runtime is a context manager: heavy setup (loading weights, creating sessions, deserializing engines) happens
in :meth:`DecoderRuntime.activate`, release in :meth:`DecoderRuntime.deactivate`. Arrays crossing the interface are
NumPy (int64 ids/masks, float32 logits); the KV cache is opaque to callers (each backend keeps it in its own form,
e.g. device buffers) and only passed back to the same runtime, expanded with :meth:`repeat_past`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import numpy as np

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

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> DecoderSpec:
        """From a manifest's ``model_config`` or an HF ``config.json`` (they share these key names)."""
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            num_kv_heads=int(config["num_key_value_heads"]),
            head_dim=int(config["head_dim"]),
            vocab_size=int(config["vocab_size"]),
            sliding_window=config.get("sliding_window"),
        )


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

    def _activated(self, state: T | None) -> T:
        """``state`` made by :meth:`activate`, or a clear error when the runtime is used outside its ``with``."""
        if state is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} used outside its context: use `with {name}(...) as runtime:`")
        return state

    @abc.abstractmethod
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV = None
    ) -> tuple[np.ndarray, PastKV]:
        """Run ``input_ids`` (B, S) with ``attention_mask`` (B, P+S) after ``past`` (P cached positions).

        Returns float32 logits (B, S, V) and the cache extended to P+S positions. Position ids are derived from
        the mask with :func:`position_ids_from_mask`.
        """

    @abc.abstractmethod
    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        """A cache of batch ``repeats`` from a batch-1 cache (one prompt shared by several continuations)."""

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding of a single unpadded prompt (1, S) with the KV cache; returns the new token ids."""
        mask = np.ones_like(input_ids, dtype=np.int64)
        logits, past = self.forward(input_ids.astype(np.int64), mask, None)
        new_tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            new_tokens.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(np.array([[token]], dtype=np.int64), mask, past)
        return np.array(new_tokens, dtype=np.int64)
