"""mexport: medical LLMs (Gemma2, Llama, Qwen2) from PyTorch to ONNX and TensorRT, with proof nothing was lost.

Importing this package is cheap: torch, onnxruntime and tensorrt are imported only by the code that needs them.
"""

__version__ = "0.1.0"
