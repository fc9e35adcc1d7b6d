"""Optimization stages: quantization (Q/DQ ONNX) and TensorRT engines."""

from mexport.optimize.quantize import QuantizeResult, quantize

__all__ = ["QuantizeResult", "quantize"]
