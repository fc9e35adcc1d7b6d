"""TensorRT decoder runtime over an ``mexport engine`` directory (needs TensorRT, torch with CUDA and a GPU).

The engine holds two optimization profiles: 0 for prefill (no past) and 1 for decode (one new token after a cached
past). A call picks the profile, sets every input's shape, binds torch CUDA tensors as the inputs and outputs, and
runs ``execute_async_v3`` on a private stream. The ``present.*`` outputs become the next call's ``past_key_values.*``
inputs without leaving the GPU; callers only see float32 NumPy logits and an opaque :class:`TrtPast`.

Several new tokens after a cached past (scoring a multi-token answer after a shared prompt) run through the decode
profile one token at a time, which is the same computation as one chunk.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mexport import console
from mexport.errors import MexportError
from mexport.lazy import require
from mexport.manifest import read_manifest
from mexport.optimize.engine.builder import ENGINE_FILE, require_tensorrt
from mexport.optimize.engine.precision import version_tuple
from mexport.optimize.engine.profiles import BATCH, DECODE, PAST, PREFILL, SEQUENCE, EngineLimits, resolve_shape
from mexport.runtime.base import (
    DecoderRuntime,
    DecoderSpec,
    PastKV,
    RuntimeLimits,
    kept_logits,
    position_ids_from_mask,
)

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
AMPERE = (8, 0)
EMPTY_BINDING_BYTES = 256  # an aligned address to bind zero-sized inputs to (torch gives them none)


def parse_capability(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def check_engine_compatibility(
    engine: dict[str, Any], tensorrt_version: str, gpu_name: str, capability: tuple[int, int]
) -> None:
    """Refuse an engine this TensorRT / GPU cannot load, naming what it was built for and what is here.

    Plans are tied to the exact TensorRT release that built them (mexport does not build version-compatible
    engines) and to the build GPU's compute capability unless built with ``--hw-compat ampere+``.
    """
    built_version = str(engine["tensorrt_version"])
    built_capability = parse_capability(str(engine["compute_capability"]))
    compat = engine.get("hardware_compatibility", "none")
    problems = []
    if version_tuple(built_version) != version_tuple(tensorrt_version):
        problems.append(f"it was built with TensorRT {built_version} and TensorRT {tensorrt_version} is installed")
    if compat == "ampere+":
        if capability < AMPERE:
            problems.append(
                f"it was built for Ampere or newer GPUs and {gpu_name} has compute capability "
                f"{capability[0]}.{capability[1]}"
            )
    elif capability != built_capability:
        problems.append(
            f"it was built on {engine.get('gpu', 'a GPU')} (compute capability {engine['compute_capability']}) and "
            f"{gpu_name} has compute capability {capability[0]}.{capability[1]}"
        )
    if problems:
        raise MexportError(
            "this TensorRT engine cannot run here: " + "; ".join(problems),
            hint="rebuild it here with `mexport engine` (add --hw-compat ampere+ for an engine that runs on any "
            f"Ampere or newer GPU), or install tensorrt=={built_version}",
        )


@dataclass
class _Session:
    """TensorRT objects and CUDA resources alive between activate() and deactivate()."""

    logger: trt.Logger
    runtime: trt.Runtime
    engine: trt.ICudaEngine
    context: trt.IExecutionContext
    stream: torch.cuda.Stream
    device: torch.device
    dtypes: dict[str, torch.dtype]
    empty: torch.Tensor  # bound for zero-sized inputs (the past in prefill)
    profile: int | None = None


@dataclass
class TrtPast:
    """The KV cache on the GPU: one tensor per ``past_key_values.*`` input, ``length`` cached positions."""

    tensors: dict[str, torch.Tensor]
    length: int
    batch: int


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt
    import torch

    by_trt = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in by_trt:
        raise MexportError(f"engine IO tensor of TensorRT type {dtype} is not supported by TrtDecoder")
    return by_trt[dtype]


class TrtDecoder(DecoderRuntime):
    """A Gemma2 decoder engine built by ``mexport engine``, run with TensorRT on a CUDA GPU."""

    name = "trt"

    def __init__(self, engine_dir: Path | str, device: str = "cuda") -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir, expected_kind=("engine",))
        if not device.startswith("cuda"):
            raise MexportError(f"TrtDecoder runs on CUDA devices only, not {device!r}")
        self.engine_path = self.engine_dir / ENGINE_FILE
        if not self.engine_path.is_file():
            raise MexportError(f"{self.engine_dir}: no {ENGINE_FILE}", hint="rebuild with `mexport engine`")
        self.device = device
        self.engine_info: dict[str, Any] = self.manifest["engine"]
        self.engine_limits = EngineLimits(**self.engine_info["limits"])
        io = self.manifest["io"]
        self.input_shapes = {entry["name"]: entry["shape"] for entry in io["inputs"]}
        self.output_names = [entry["name"] for entry in io["outputs"]]
        self.past_names = [name for name in self.input_shapes if name.startswith(PAST_PREFIX)]
        self.present_names = {name: PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in self.past_names}
        self.spec = DecoderSpec.from_model_config(self.manifest["model_config"])
        self._session: _Session | None = None

    @property
    def precision(self) -> str:
        typing = "strongly typed" if self.engine_info["strongly_typed"] else "weakly typed"
        recipe = (self.manifest.get("recipe") or {}).get("name")
        quantized = f", {recipe}" if recipe else ""
        return f"{self.engine_info['precision']}{quantized} (TensorRT {self.engine_info['tensorrt_version']}, {typing})"

    # -- engine ----------------------------------------------------------------------------------------------

    def activate(self) -> None:
        require("torch", "running TensorRT engines")
        tensorrt_version = require_tensorrt()
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise MexportError(
                "no CUDA GPU found: TensorRT is installed but torch.cuda sees no GPU",
                hint="run TensorRT engines on a host with an NVIDIA GPU and a CUDA build of torch",
            )
        device = torch.device(self.device)
        if device.index is None:  # "cuda": the current device, named explicitly for set_device and allocations
            device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        check_engine_compatibility(self.engine_info, tensorrt_version, props.name, (props.major, props.minor))
        torch.cuda.set_device(device)  # TensorRT deserializes onto, and runs on, the current device
        logger = trt.Logger(trt.Logger.VERBOSE if console.is_verbose() else trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        with open(self.engine_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise MexportError(f"TensorRT could not deserialize {self.engine_path} (see the log above)")
        engine_inputs = sorted(
            engine.get_tensor_name(i)
            for i in range(engine.num_io_tensors)
            if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT
        )
        if engine_inputs != sorted(self.input_shapes):
            raise MexportError(f"{self.engine_path}: engine inputs {engine_inputs} do not match the manifest's io")
        if engine.num_optimization_profiles != 2:
            raise MexportError(f"{self.engine_path}: expected prefill and decode profiles, found "
                               f"{engine.num_optimization_profiles}")
        dtypes = {
            name: _torch_dtype(engine.get_tensor_dtype(name))
            for name in [*self.input_shapes, *self.output_names]
        }
        self._session = _Session(
            logger=logger,
            runtime=runtime,
            engine=engine,
            context=engine.create_execution_context(),
            stream=torch.cuda.Stream(device=device),
            device=device,
            dtypes=dtypes,
            empty=torch.empty(EMPTY_BINDING_BYTES, dtype=torch.uint8, device=device),
        )

    def deactivate(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            # TensorRT objects go in reverse order of creation: context, engine, runtime
            del session.context, session.engine, session.runtime

    def _active(self) -> _Session:
        return self._activated(self._session)

    # -- decoding --------------------------------------------------------------------------------------------

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV = None, logits_to_keep: int = 0
    ) -> tuple[np.ndarray, PastKV]:
        logits, present = self._forward_all(input_ids, attention_mask, past)
        return logits[:, -kept_logits(input_ids.shape[1], logits_to_keep) :], present

    def _forward_all(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV
    ) -> tuple[np.ndarray, PastKV]:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        batch, new_tokens = input_ids.shape
        cached = 0 if past is None else past.length
        if attention_mask.shape != (batch, cached + new_tokens):
            raise MexportError(
                f"attention_mask shape {attention_mask.shape} != (batch {batch}, past {cached} + new {new_tokens})"
            )
        if past is not None and past.batch != batch:
            raise MexportError(f"past has batch {past.batch} but input_ids has batch {batch}")
        if past is None or new_tokens == 1:
            return self._step(input_ids, attention_mask, past)
        chunks = []
        for offset in range(new_tokens):
            width = cached + offset + 1
            logits, past = self._step(input_ids[:, offset : offset + 1], attention_mask[:, :width], past)
            chunks.append(logits)
        return np.concatenate(chunks, axis=1), past

    @property
    def limits(self) -> RuntimeLimits:
        return RuntimeLimits(max_batch=self.engine_limits.max_batch, max_context=self.engine_limits.max_context)

    def _check_limits(self, batch: int, new_tokens: int, total: int, prefill: bool) -> None:
        limits = self.engine_limits
        problems = []
        if batch > limits.max_batch:
            problems.append(f"batch {batch} > --max-batch {limits.max_batch}")
        if prefill and new_tokens > limits.max_input_len:
            problems.append(f"input length {new_tokens} > --max-input-len {limits.max_input_len}")
        if total > limits.max_context:
            problems.append(f"context {total} > --max-context {limits.max_context}")
        if problems:
            raise MexportError(
                f"{self.engine_dir}: request outside the engine's profiles: {'; '.join(problems)}",
                hint="rebuild the engine with larger limits",
            )

    def _step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: TrtPast | None
    ) -> tuple[np.ndarray, TrtPast]:
        import torch

        session = self._active()
        context, stream, device, dtypes = session.context, session.stream, session.device, session.dtypes
        batch, new_tokens = input_ids.shape
        cached = 0 if past is None else past.length
        self._check_limits(batch, new_tokens, cached + new_tokens, prefill=past is None)
        profile = PREFILL if past is None else DECODE
        symbols = {BATCH: batch, SEQUENCE: new_tokens, PAST: cached}
        host_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in self.input_shapes:
            host_inputs["position_ids"] = position_ids_from_mask(attention_mask, new_tokens)

        with torch.cuda.stream(stream):
            if session.profile != profile:
                context.set_optimization_profile_async(profile, stream.cuda_stream)
                session.profile = profile
            inputs: dict[str, torch.Tensor] = {
                name: torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtypes[name])
                for name, array in host_inputs.items()
            }
            for name in self.past_names:
                if past is None:
                    shape = resolve_shape(self.input_shapes[name], symbols, f"input {name}")
                    inputs[name] = torch.empty(shape, dtype=dtypes[name], device=device)
                else:
                    inputs[name] = past.tensors[name]
            for name, tensor in inputs.items():
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise MexportError(f"TensorRT rejected shape {tuple(tensor.shape)} for input {name}")
                address = tensor.data_ptr() if tensor.numel() else session.empty.data_ptr()
                context.set_tensor_address(name, address)
            outputs: dict[str, torch.Tensor] = {}
            for name in self.output_names:
                dims = context.get_tensor_shape(name)
                shape = tuple(dims[axis] for axis in range(len(dims)))
                if any(dim < 0 for dim in shape):
                    raise MexportError(f"TensorRT could not infer the shape of output {name}: {shape}")
                outputs[name] = torch.empty(shape, dtype=dtypes[name], device=device)
                context.set_tensor_address(name, outputs[name].data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise MexportError(f"TensorRT execution failed for batch {batch}, past {cached}, new {new_tokens}")
            logits = outputs["logits"].float().cpu()  # waits for the stream
        present = {name: outputs[self.present_names[name]] for name in self.past_names}
        return logits.numpy(), TrtPast(present, cached + new_tokens, batch)

    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        import torch

        with torch.cuda.stream(self._active().stream):
            tensors = {name: tensor.repeat_interleave(repeats, dim=0) for name, tensor in past.tensors.items()}
        return TrtPast(tensors, past.length, past.batch * repeats)
