"""Greedy generation from an export directory: a quick end-to-end smoke test of model + tokenizer + KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mexport.errors import MexportError
from mexport.lazy import require


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


def generate_text(model_dir: Path, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> GenerationResult:
    """Greedy continuation of ``prompt`` with ONNX Runtime, using the tokenizer saved beside the model."""
    from mexport.runtime.ort import OrtDecoder

    if max_new_tokens < 1:
        raise MexportError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    transformers = require("transformers", "loading the tokenizer")
    decoder = OrtDecoder(model_dir, device=device)  # validates the directory before the tokenizer is read
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MexportError(f"{model_dir}: no usable tokenizer files ({exc})") from exc
    input_ids = np.array([tokenizer(prompt)["input_ids"]], dtype=np.int64)
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
