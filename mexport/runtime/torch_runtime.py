"""PyTorch reference runtime: the Hugging Face checkpoint itself, the baseline every export is compared with.

Loads with ``attn_implementation="eager"`` because Gemma2's attention-logit softcapping is only implemented in the
eager path (SDPA / flash kernels silently skip it). The KV cache is a transformers ``DynamicCache`` built from the
model config, so sliding-window layers keep only their window; step decoding past the window matches the
full-sequence forward (checked in tests/test_runtime_torch.py). :meth:`TorchDecoder.forward` never mutates the
cache it is given (it works on a copy), so one prefilled cache can feed several continuations, like ORT's.

``upcast_at_run_time=True`` computes in a dtype wider than the checkpoint's (fp32 over bf16 weights) without an
fp32 copy of the model: the weights stay as loaded (memory-mapped from the safetensors files), each Linear casts its
weight slice by slice as it runs and each Embedding casts the rows it gathered, so activations flow in fp32 exactly
as in a model upcast whole (Gemma2's embedding scale, attention mask and rotary cast by the activations' dtype;
its RMSNorm upcasts its own weight). Peak memory is the checkpoint plus one weight slice instead of 2x the checkpoint.
"""

from __future__ import annotations

import copy
import functools
import gc
from pathlib import Path
from typing import Any

import numpy as np

from mexport import console
from mexport.checkpoint import INDEX_FILE, SIDE_FILES, incomplete_checkpoint, read_config, weight_files
from mexport.errors import MexportError, first_line
from mexport.formats import EXPORT_DTYPES as TORCH_DTYPES  # mexport name -> torch / HF config name
from mexport.lazy import require
from mexport.manifest import VerifiedFiles, hash_files
from mexport.runtime.base import (
    DecoderRuntime,
    DecoderSpec,
    PastKV,
    check_forward_shapes,
    kept_logits,
    position_ids_from_mask,
)

DEVICES = ("cpu", "cuda")
# the largest fp32 copy of a weight slice a Linear materializes with upcast_at_run_time (Gemma's LM head is 3.7 GB)
UPCAST_SLICE_BYTES = 16 << 20


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The checkpoint's saved float dtype as an mexport name ("bf16", ...); configs spell it dtype or torch_dtype."""
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    by_torch_name = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}
    if saved not in by_torch_name:
        raise MexportError(f"checkpoint dtype {saved!r} is not supported; expected one of {', '.join(by_torch_name)}")
    return by_torch_name[saved]


def _upcast_linear_forward(torch: Any, linear: Any, compute_dtype: Any, slice_bytes: int, hidden: Any) -> Any:
    """``linear(hidden)`` in ``compute_dtype`` with the weight cast one slice of output rows at a time.

    The slices share one buffer: a fresh 16 MiB block per slice left glibc's heap fragmented, so that in about half
    of identical runs the LM head kept one fp32 copy of Gemma's embedding allocated (2-layer full width: a
    reference forward peaking at 6.6 GB instead of 3.1 GB)."""
    weight, bias = linear.weight, linear.bias
    rows = min(weight.shape[0], max(1, slice_bytes // (weight.shape[1] * torch.finfo(compute_dtype).bits // 8)))
    buffer = torch.empty((rows, weight.shape[1]), dtype=compute_dtype, device=weight.device)
    output = torch.empty((*hidden.shape[:-1], weight.shape[0]), dtype=compute_dtype, device=hidden.device)
    for start in range(0, weight.shape[0], rows):
        stop = min(start + rows, weight.shape[0])
        piece = buffer[: stop - start]
        piece.copy_(weight[start:stop])
        output[..., start:stop] = torch.nn.functional.linear(
            hidden, piece, None if bias is None else bias[start:stop].to(compute_dtype)
        )
    return output


def _upcast_at_run_time(torch: Any, model: Any, compute_dtype: Any, slice_bytes: int) -> None:
    """Make ``model`` compute in ``compute_dtype`` while its weights keep their stored dtype (see module doc)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = functools.partial(_upcast_linear_forward, torch, module, compute_dtype, slice_bytes)
        elif isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(lambda _module, _inputs, rows: rows.to(compute_dtype))


def _is_narrower(dtype: str, than: str) -> bool:
    return dtype in ("bf16", "fp16") and than == "fp32"


class TorchDecoder(DecoderRuntime):
    """A Hugging Face causal LM checkpoint run with PyTorch (eager attention, DynamicCache)."""

    name = "torch"

    def __init__(
        self,
        checkpoint: Path | str,
        dtype: str | None = None,
        device: str = "cpu",
        upcast_at_run_time: bool = False,
        upcast_slice_bytes: int = UPCAST_SLICE_BYTES,
    ) -> None:
        """``upcast_at_run_time``: when ``dtype`` is wider than the checkpoint's, keep the stored weights and cast them
        as each module runs (see module doc) instead of loading an upcast copy, ``upcast_slice_bytes`` of fp32
        weight at a time."""
        self.checkpoint = Path(checkpoint)
        self.config = read_config(self.checkpoint)
        weight_files(self.checkpoint)  # safetensors only: fail here, before any heavy import
        stored_dtype = checkpoint_dtype(self.config)
        self.dtype = dtype or stored_dtype
        if self.dtype not in TORCH_DTYPES:
            raise MexportError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
        upcast = upcast_at_run_time and _is_narrower(stored_dtype, self.dtype)
        self.weights_dtype = stored_dtype if upcast else self.dtype
        if device not in DEVICES:
            raise MexportError(f"unknown torch device {device!r}; expected one of {', '.join(DEVICES)}")
        self.device = device
        self.upcast_slice_bytes = upcast_slice_bytes
        self.spec = DecoderSpec.from_model_config(self.config)
        self._model: Any = None

    @property
    def precision(self) -> str:
        """How weights and compute are represented, for reports."""
        return f"{self.weights_dtype} weights, {self.dtype} compute (PyTorch {self.device})"

    def activate(self) -> None:
        torch = require("torch", "running the PyTorch reference")
        transformers = require("transformers", "loading the Hugging Face checkpoint")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise MexportError(
                "device 'cuda' requested but torch.cuda.is_available() is False",
                hint="use device 'cpu', or install a CUDA build of torch on a GPU host",
            )
        self.check_files_unchanged()  # what is loaded now is what verify_files hashed
        with console.phase(f"loading {self.checkpoint.name} ({self.weights_dtype}, {self.device})"):
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # missing weights are refused below, in one line
            try:
                model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                    self.checkpoint,
                    dtype=getattr(torch, TORCH_DTYPES[self.weights_dtype]),
                    attn_implementation="eager",
                    use_safetensors=True,
                    local_files_only=True,
                    trust_remote_code=False,
                    output_loading_info=True,
                )
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                mismatch = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("size mismatch")]
                if isinstance(exc, RuntimeError) and not mismatch:
                    raise  # not the checkpoint's fault (out of memory, a bug)
                reason = mismatch[0] if mismatch else first_line(exc)
                raise MexportError(f"could not load checkpoint {self.checkpoint}: {reason}") from exc
            finally:
                transformers.logging.set_verbosity(verbosity)
        # transformers initialises a weight it does not find at random: never score such a model
        if loading["missing_keys"]:
            raise incomplete_checkpoint(self.checkpoint, sorted(loading["missing_keys"]))
        self.check_files_unchanged()
        if self.weights_dtype != self.dtype:
            _upcast_at_run_time(torch, model, getattr(torch, TORCH_DTYPES[self.dtype]), self.upcast_slice_bytes)
        self._model = model.to(self.device).eval()

    def verify_files(self) -> VerifiedFiles:
        """Hash what loading the checkpoint reads: config, generation config and tokenizer files, the weights."""
        present = [name for name in (*SIDE_FILES, INDEX_FILE) if (self.checkpoint / name).is_file()]
        weights = [path.name for path in weight_files(self.checkpoint)]
        self.files = hash_files(self.checkpoint, [*present, *weights])
        return self.files

    def deactivate(self) -> None:
        self._model = None
        gc.collect()  # the run-time upcast forwards refer to their modules (cycles): free the weights now

    def _loaded_model(self) -> Any:
        return self._activated(self._model)

    def _forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV, logits_to_keep: int
    ) -> tuple[np.ndarray, PastKV]:
        model = self._loaded_model()
        torch = require("torch")
        transformers = require("transformers")
        new_tokens = input_ids.shape[1]
        kept_logits(new_tokens, logits_to_keep)
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
                logits_to_keep=logits_to_keep,
            )
            logits = output.logits.float().cpu().numpy()
        return logits, output.past_key_values

    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        torch = require("torch")
        with torch.inference_mode():
            repeated = copy.deepcopy(past)
            repeated.batch_repeat_interleave(repeats)
        return repeated
