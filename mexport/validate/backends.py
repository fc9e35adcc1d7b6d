"""Open any model artifact as a :class:`DecoderRuntime` plus its tokenizer, whatever stage produced it.

A Hugging Face checkpoint (directory with ``config.json`` and no ``mexport.json``, or a hub id) runs with PyTorch;
an export or quantize directory (``mexport.json`` kind export / quantize) with ONNX Runtime, and so does an ONNX
decoder another tool wrote (a directory with one ``.onnx`` graph and no ``mexport.json``, or the ``.onnx`` file
itself: :mod:`mexport.runtime.onnx_graph`); an engine directory with TensorRT. A backend this host cannot run (no
TensorRT, no GPU, no CUDA provider) raises :class:`BackendUnavailable`, which validation reports as a skipped row instead of failing the run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mexport import hub
from mexport.checkpoint import load_tokenizer
from mexport.errors import MexportError
from mexport.hardware import probe
from mexport.lazy import require
from mexport.manifest import MANIFEST_NAME, read_manifest
from mexport.runtime.base import DecoderRuntime
from mexport.runtime.onnx_graph import GRAPH_SUFFIX
from mexport.runtime.ort import OrtDecoder
from mexport.runtime.torch_runtime import TorchDecoder
from mexport.runtime.trt import TrtDecoder

KINDS = ("torch", "ort", "trt")
DEVICES_BY_KIND = {"torch": ("cpu", "cuda"), "ort": ("cpu", "cuda", "tensorrt"), "trt": ("cpu", "cuda")}
ORT_PROVIDER_BY_DEVICE = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
KIND_BY_MANIFEST = {"export": "ort", "quantize": "ort", "engine": "trt"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# encoded to fingerprint tokenizers: covers normalisation, pre-tokenisation and whether BOS is prepended
FINGERPRINT_PROBE = "Question: Which vitamin?\nA. B1\nAnswer: A  maybe\n\n"


class BackendUnavailable(MexportError):
    """This host cannot run the requested backend (TensorRT missing, no GPU, no CUDA provider)."""


def detect_kind(path: Path | str) -> str:
    """ "torch", "ort" or "trt" for a model location, from its manifest (or its absence)."""
    location = Path(path)
    if location.is_file() and location.suffix == GRAPH_SUFFIX:
        return "ort"
    if (location / MANIFEST_NAME).is_file():
        manifest_kind = read_manifest(location).get("kind")
        if manifest_kind not in KIND_BY_MANIFEST:
            raise MexportError(
                f"{location}: manifest kind {manifest_kind!r} is not a model "
                f"(expected one of {', '.join(KIND_BY_MANIFEST)})"
            )
        return KIND_BY_MANIFEST[manifest_kind]
    if location.is_dir() and any(location.glob(f"*{GRAPH_SUFFIX}")):
        return "ort"
    if (location / "config.json").is_file() or (not location.exists() and HUB_ID.match(str(path))):
        return "torch"
    raise MexportError(
        f"{location}: not a model (no {MANIFEST_NAME}, no ONNX graph and no config.json)",
        hint="pass a Hugging Face checkpoint directory or hub id, an mexport export / quantize / engine directory, "
        "or a directory holding an ONNX decoder with its config.json and tokenizer",
    )


def _local_checkpoint(path: Path | str) -> Path:
    """A local directory for a checkpoint path or hub id (hub ids resolve through the Hugging Face cache)."""
    location = Path(path)
    if location.exists():
        return location
    if not HUB_ID.match(str(path)):
        raise MexportError(f"{path}: no such checkpoint directory (and not a hub id like org/name)")
    return hub.snapshot(str(path), ["*.json", "*.safetensors", "*.model", "*.txt"])


def _ort_runtime(path: Path, device: str) -> DecoderRuntime:
    if device in ORT_PROVIDER_BY_DEVICE:
        require("onnxruntime", "running ONNX models")
        provider = ORT_PROVIDER_BY_DEVICE[device]
        available = probe().ort_providers
        if provider not in available:
            raise BackendUnavailable(
                f"ONNX Runtime here has no {provider} (available: {', '.join(available)})",
                hint="install onnxruntime-gpu on a CUDA host (uninstall the CPU onnxruntime first)",
            )

    return OrtDecoder(path, device=device)


def _trt_runtime(path: Path) -> DecoderRuntime:
    problem = probe().engine_problem()
    if problem is not None:
        raise BackendUnavailable(f"TensorRT engine cannot run here: {problem.message}", hint=problem.hint)
    return TrtDecoder(path)


def _torch_runtime(path: Path, device: str) -> DecoderRuntime:
    if device == "cuda":
        torch = require("torch", "running the PyTorch reference")
        if not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA GPU", hint="use device cpu, or a CUDA build of torch")

    return TorchDecoder(path, device=device)


def open_backend(path: Path | str, kind: str | None = None, device: str = "cpu") -> tuple[DecoderRuntime, str, Any]:
    """(runtime, kind, tokenizer) for a checkpoint, export, quantized model or engine; ``kind`` auto-detected.

    The runtime is not activated yet: use it as a context manager. Every file it will read is hashed here (an
    artifact's against its manifest) into ``runtime.files``, and activating it refuses any that changed since.
    ``device``: cpu | cuda for torch, cpu | cuda | tensorrt (ORT execution provider) for ort; TensorRT engines
    always run on the GPU.
    """
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise MexportError(f"unknown backend kind {kind!r}; expected one of {', '.join(KINDS)}")
    if device not in DEVICES_BY_KIND[kind]:
        raise MexportError(
            f"device {device!r} is not valid for {kind}; expected one of {', '.join(DEVICES_BY_KIND[kind])}"
        )
    if kind == "torch":
        location = _local_checkpoint(path)
        runtime = _torch_runtime(location, device)
    else:
        location = Path(path)
        runtime = _ort_runtime(location, device) if kind == "ort" else _trt_runtime(location)
    runtime.verify_files()
    return runtime, kind, load_tokenizer(location.parent if location.is_file() else location)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: vocabulary, special tokens and how a probe text is encoded.

    Two backends are only comparable question by question when this matches (an export that shipped another
    tokenizer would score different token sequences).
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id],
        "probe": list(tokenizer.encode(FINGERPRINT_PROBE, add_special_tokens=True)),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]
