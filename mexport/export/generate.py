"""Greedy generation from an export directory: a quick end-to-end smoke test of model + tokenizer + KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mexport.checkpoint import load_tokenizer
from mexport.console import warn
from mexport.errors import MexportError
from mexport.manifest import read_manifest
from mexport.runtime.ort import OrtDecoder


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    text: str  # the continuation only
    prompt_tokens: int
    new_tokens: int
    seconds: float  # prefill + decode, session creation excluded
    precision: str

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def _fit_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """New tokens that fit beside the prompt in ``context``; an error when the prompt alone fills it."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    if prompt_tokens >= context:
        raise MexportError(f"the prompt is {prompt_tokens} tokens; the model's context is {context}")
    warn(
        f"--max-new-tokens {max_new_tokens} capped to {context - prompt_tokens}: the prompt ({prompt_tokens} tokens) "
        f"plus new tokens must fit the model's context of {context}"
    )
    return context - prompt_tokens


def generate_text(model_dir: Path, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> GenerationResult:
    """Greedy continuation of ``prompt`` with ONNX Runtime, using the tokenizer saved beside the model.

    The directory is verified against its manifest first; ``max_new_tokens`` is capped (with a warning) so the
    prompt plus the new tokens fit the model's context."""
    if max_new_tokens < 1:
        raise MexportError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    read_manifest(model_dir, expected_kind=("export", "quantize"), verify=True)
    decoder = OrtDecoder(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir)
    input_ids = np.array([tokenizer(prompt)["input_ids"]], dtype=np.int64)
    max_new_tokens = _fit_context(int(input_ids.shape[1]), max_new_tokens, decoder.limits.max_context)
    with decoder:
        started = time.perf_counter()
        new_ids = decoder.generate(input_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - started
    return GenerationResult(
        prompt=prompt,
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=len(new_ids),
        seconds=seconds,
        precision=decoder.precision,
    )
