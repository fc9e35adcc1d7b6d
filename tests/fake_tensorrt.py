"""A fake ``tensorrt`` module: the API subset ``TrtDecoder`` and ``build_engine`` use, executed on the CPU.

It exists so the real :class:`mexport.runtime.trt.TrtDecoder` (profile selection, shape setting, buffer binding by
address, KV-cache hand-over, limits) and the real ``build_engine`` staging run in CI. Its "engine" is a JSON file
naming an ONNX export, its IO signature and the plan's profiles; ``execute_async_v3`` reads the bound input
buffers by address, runs the ONNX graph with ONNX Runtime and writes the outputs into the bound output buffers.
It checks what TensorRT checks at those calls: every shape inside the selected profile, every tensor bound.
No TensorRT numerics are simulated: its logits are ONNX Runtime's.

Install with :func:`install` (a pytest monkeypatch): ``sys.modules["tensorrt"]``, a host placement for
TrtDecoder's "cuda" device, and ``build_engine``'s Polygraphy step and GPU detection.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__version__ = "10.13.0.35"
FAKE_GPU = ("NVIDIA H100 80GB HBM3", (9, 0))


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT64 = "int64"
    INT32 = "int32"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class Logger:
    VERBOSE = 0
    WARNING = 2

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity


class Builder:  # present so require_tensorrt() sees bindings, not stubs; the fake never builds
    pass


def _resolve(shape: list[int | str], symbols: dict[str, int]) -> tuple[int, ...]:
    """A manifest shape with symbols (and sums of them) evaluated."""
    def value(dim: int | str) -> int:
        terms = [] if isinstance(dim, int) else [term.strip() for term in dim.split("+")]
        return dim if isinstance(dim, int) else sum(symbols[t] if t in symbols else int(t) for t in terms)

    return tuple(value(dim) for dim in shape)


def _host_array(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A NumPy view of ``shape`` elements at host ``address`` (what a bound torch CPU tensor's data_ptr holds)."""
    count = int(np.prod(shape))
    if count == 0:
        return np.empty(shape, dtype)
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class ICudaEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import onnxruntime

        self.spec = spec
        self.inputs = {entry["name"]: entry for entry in spec["io"]["inputs"]}
        self.outputs = {entry["name"]: entry for entry in spec["io"]["outputs"]}
        self.names = [*self.inputs, *self.outputs]
        self.session = onnxruntime.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.spec["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType({**self.inputs, **self.outputs}[name]["dtype"])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        return self.spec["profiles"][profile][name]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.calls: list[tuple[int, dict[str, tuple[int, ...]]]] = []  # (profile, input shapes) per execution

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile, self.shapes = index, {}
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.profile is None or name not in self.engine.inputs:
            return False
        low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def _symbols(self) -> dict[str, int]:
        symbols = {}
        for name, entry in self.engine.inputs.items():
            for dim, value in zip(entry["shape"], self.shapes[name], strict=True):
                if isinstance(dim, str) and "+" not in dim:
                    symbols[dim] = value
        return symbols

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes.get(name, (-1,))
        if set(self.shapes) != set(self.engine.inputs):
            return (-1,)
        return _resolve(self.engine.outputs[name]["shape"], self._symbols())

    def execute_async_v3(self, stream: int) -> bool:
        missing = [name for name in self.engine.names if name not in self.addresses]
        if self.profile is None or missing or set(self.shapes) != set(self.engine.inputs):
            return False
        feed = {
            name: _host_array(self.addresses[name], shape, np.dtype(self.engine.inputs[name]["dtype"])).copy()
            for name, shape in self.shapes.items()
        }
        results = self.engine.session.run(list(self.engine.outputs), feed)
        for name, value in zip(self.engine.outputs, results, strict=True):
            target = _host_array(self.addresses[name], self.get_tensor_shape(name), np.dtype(value.dtype))
            if target.shape != value.shape:
                return False
            np.copyto(target, value)
        self.calls.append((self.profile, dict(self.shapes)))
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.engines: list[ICudaEngine] = []

    def deserialize_cuda_engine(self, data: Any) -> ICudaEngine | None:
        try:
            spec = json.loads(bytes(data))
        except ValueError:
            return None
        engine = ICudaEngine(spec)
        self.engines.append(engine)
        return engine


class HostPlacement:
    """TrtDecoder's buffers as torch CPU tensors (the fake engine reads and writes them by address)."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device("cpu")
        self.gpu_name, self.capability = FAKE_GPU
        self.stream_handle = 0

    def ordered(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


def serialize(onnx_path: Path, plan: Any, timing_cache: Path) -> bytes:
    """What build_engine's Polygraphy step returns: here, the fake engine's JSON."""
    from mexport.optimize.engine.plan import read_source_manifest

    profiles = [
        {name: [list(shape.min), list(shape.opt), list(shape.max)] for name, shape in profile.shapes.items()}
        for profile in plan.profiles
    ]
    io = read_source_manifest(plan.model_dir)["io"]
    return json.dumps({"onnx": str(Path(onnx_path).resolve()), "io": io, "profiles": profiles}).encode()


def fake_gpu() -> Any:
    """The GPU the fake engines are built for."""
    from mexport.hardware import GpuInfo

    return GpuInfo(FAKE_GPU[0], 81559 << 20, FAKE_GPU[1])


def install(monkeypatch: Any) -> None:
    """Make ``import tensorrt``, TrtDecoder's "cuda" device and build_engine's TensorRT step use this fake."""
    from mexport.optimize.engine import builder
    from mexport.runtime import trt

    monkeypatch.setitem(sys.modules, "tensorrt", sys.modules[__name__])
    monkeypatch.setitem(trt.PLACEMENTS, "cuda", HostPlacement)
    monkeypatch.setattr(builder, "_polygraphy_build", serialize)
    monkeypatch.setattr(builder, "require_cuda_gpu", fake_gpu)
