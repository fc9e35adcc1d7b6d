"""Decoder runtimes: one small interface over PyTorch, ONNX Runtime and TensorRT."""
