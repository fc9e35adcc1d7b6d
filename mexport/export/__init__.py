"""PyTorch checkpoint -> ONNX: ``export_onnx`` (the ``mexport onnx`` command) and ``generate_text``."""

from mexport.export.exporter import ExportResult, export_onnx
from mexport.export.generate import GenerationResult, generate_text

__all__ = ["ExportResult", "GenerationResult", "export_onnx", "generate_text"]
