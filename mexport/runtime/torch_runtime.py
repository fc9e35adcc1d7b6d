"""PyTorch reference runtime: the Hugging Face checkpoint itself, the baseline every export is compared with.

Loads with ``attn_implementation="eager"`` because Gemma2's attention-logit softcapping is only implemented in the
eager path (SDPA / flash kernels silently skip it). The KV cache is a transformers ``DynamicCache`` built from the
model config, so sliding-window layers keep only their window; step decoding past the window matches the
full-sequence forward (checked in tests/test_runtime_torch.py). :meth:`TorchDecoder.forward` never mutates the
cache it is given (it works on a copy), so one prefilled cache can feed several continuations, like ORT's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from mexport import console
from mexport.errors import MexportError
from mexport.export.checkpoint import read_config, weight_files
from mexport.export.graph import EXPORT_DTYPES as TORCH_DTYPES  # mexport name -> torch / HF config name
from mexport.lazy import require
from mexport.runtime.base import (
    DecoderRuntime,
    DecoderSpec,
    PastKV,
    check_forward_shapes,
    position_ids_from_mask,
)

DEVICES = ("cpu", "cuda")


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The checkpoint's saved float dtype as an mexport name ("bf16", ...); configs spell it dtype or torch_dtype."""
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    by_torch_name = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}
    if saved not in by_torch_name:
        raise MexportError(f"checkpoint dtype {saved!r} is not supported; expected one of {', '.join(by_torch_name)}")
    return by_torch_name[saved]


class TorchDecoder(DecoderRuntime):
    """A Hugging Face causal LM checkpoint run with PyTorch (eager attention, DynamicCache)."""

    name = "torch"

    def __init__(self, checkpoint: Path | str, dtype: str | None = None, device: str = "cpu") -> None:
        self.checkpoint = Path(checkpoint)
        self.config = read_config(self.checkpoint)
        weight_files(self.checkpoint)  # safetensors only: fail here, before any heavy import
        self.dtype = dtype or checkpoint_dtype(self.config)
        if self.dtype not in TORCH_DTYPES:
            raise MexportError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
        if device not in DEVICES:
            raise MexportError(f"unknown torch device {device!r}; expected one of {', '.join(DEVICES)}")
        self.device = device
        self._spec = DecoderSpec.from_model_config(self.config)
        self._model: Any = None

    @property
    def spec(self) -> DecoderSpec:
        return self._spec

    @property
    def precision(self) -> str:
        """How weights and compute are represented, for reports."""
        return f"{self.dtype} weights, {self.dtype} compute (PyTorch {self.device})"

    def activate(self) -> None:
        torch = require("torch", "running the PyTorch reference")
        transformers = require("transformers", "loading the Hugging Face checkpoint")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise MexportError(
                "device 'cuda' requested but torch.cuda.is_available() is False",
                hint="use device 'cpu', or install a CUDA build of torch on a GPU host",
            )
        with console.phase(f"loading {self.checkpoint.name} ({self.dtype}, {self.device})"):
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.checkpoint,
                    dtype=getattr(torch, TORCH_DTYPES[self.dtype]),
                    attn_implementation="eager",
                    use_safetensors=True,
                    local_files_only=True,
                    trust_remote_code=False,
                )
            except (OSError, ValueError, KeyError) as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise MexportError(f"could not load checkpoint {self.checkpoint}: {first_line}") from exc
        self._model = model.to(self.device).eval()

    def deactivate(self) -> None:
        self._model = None

    def _loaded_model(self) -> Any:
        if self._model is None:
            raise RuntimeError("TorchDecoder used outside its context: use `with TorchDecoder(...) as runtime:`")
        return self._model

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV = None
    ) -> tuple[np.ndarray, PastKV]:
        model = self._loaded_model()
        torch = require("torch")
        transformers = require("transformers")
        new_tokens = input_ids.shape[1]
        check_forward_shapes(input_ids, attention_mask, past_length=past.get_seq_length() if past is not None else 0)

        def to_device(array: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)

        with torch.inference_mode():
            # DynamicCache updates in place; copy so the caller's cache stays valid for other continuations
            cache = copy.deepcopy(past) if past is not None else transformers.DynamicCache(config=model.config)
            output = model(
                input_ids=to_device(input_ids),
                attention_mask=to_device(attention_mask),
                position_ids=to_device(position_ids_from_mask(attention_mask, new_tokens)),
                past_key_values=cache,
                use_cache=True,
            )
            logits = output.logits.float().cpu().numpy()
        return logits, output.past_key_values

    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        torch = require("torch")
        with torch.inference_mode():
            repeated = copy.deepcopy(past)
            repeated.batch_repeat_interleave(repeats)
        return repeated
