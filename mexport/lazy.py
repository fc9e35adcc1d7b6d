"""Lazy imports of heavy optional dependencies.

Importing :mod:`mexport` must stay cheap (no torch, onnxruntime or tensorrt), so modules that need them call
:func:`require` at the point of use, which also turns a missing package into an install hint.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mexport.errors import MissingDependencyError

# import name -> what to install to get it
INSTALL_HINTS: dict[str, str] = {
    "torch": "pip install torch==2.13.0",
    "transformers": "pip install 'transformers>=4.57,<4.58'",
    "optimum": "pip install optimum-onnx",
    "optimum.exporters.onnx": "pip install optimum-onnx",
    "onnx": "pip install onnx",
    "typer": "pip install typer",
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu on a CUDA host)",
    "onnxruntime.quantization": "pip install onnxruntime",
    "tensorrt": "pip install 'mexport[gpu]' on a host with an NVIDIA GPU and CUDA (TensorRT wheels are Linux/Windows + CUDA only)",
    "polygraphy": "pip install 'mexport[gpu]' (polygraphy)",
    "datasets": "pip install datasets",
    "tokenizers": "pip install tokenizers",
    "safetensors": "pip install safetensors",
    "matplotlib": "pip install matplotlib",
    "scipy": "pip install scipy",
    "psutil": "pip install psutil",
    "lm_eval": "pip install 'mexport[lmeval]'",
    "onnxruntime_genai": "pip install 'mexport[genai]'",
}


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise a :class:`MissingDependencyError` that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = INSTALL_HINTS.get(module) or INSTALL_HINTS.get(top) or f"pip install {top}"
        needed_for = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"missing optional dependency '{module}'{needed_for}: {exc}", hint=hint
        ) from exc


def is_available(module: str) -> bool:
    """True when ``module`` imports; never raises."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install counts as unavailable (e.g. tensorrt bindings without libs)
        return False
    return True
