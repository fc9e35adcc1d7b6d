"""TensorRT decoder runtime over an ``mexport engine`` directory (needs TensorRT, torch with CUDA and a GPU).

The engine's optimization profiles are read from the engine itself (``get_tensor_profile_shape``): every call is
cut into pieces that one profile accepts (prefill without a past, decode, chunks after a past), the profile is
selected, every input's shape set, torch tensors bound as inputs and outputs, and ``execute_async_v3`` run on a
private stream. The ``present.*`` outputs become the next piece's ``past_key_values.*`` inputs without leaving the
device; callers only see float32 NumPy logits and an opaque :class:`TrtPast`.

A lean-logits engine (graph input ``logits_indices``) computes logits only for the positions a caller keeps; an
engine without it returns every position and the runtime slices. Engines built before chunk profiles run the new
tokens after a past through the decode profile one at a time, which is the same computation.

Where buffers live is a *placement*: :class:`CudaPlacement` (torch CUDA tensors, one CUDA stream) for real engines;
tests register a host placement beside a fake ``tensorrt`` module to run this class on CPU (tests/fake_tensorrt.py).
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mexport import console
from mexport.errors import IntegrityError, MexportError
from mexport.formats import ENGINE_FILE, LOGITS_INDICES, PAST_PREFIX, PRESENT_PREFIX
from mexport.lazy import require
from mexport.manifest import VerifiedFiles, read_manifest, verify_artifact_files
from mexport.runtime.base import (
    DecoderRuntime,
    DecoderSpec,
    PastKV,
    RuntimeLimits,
    check_forward_shapes,
    kept_logits,
    position_ids_from_mask,
)
from mexport.trt_common import (
    AMPERE,
    BATCH,
    LOGITS,
    PAST,
    SEQUENCE,
    EngineLimits,
    require_tensorrt,
    resolve_shape,
    version_tuple,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import tensorrt as trt
    import torch

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


class CudaPlacement:
    """Engine IO as torch CUDA tensors on one device, work ordered on a private CUDA stream."""

    def __init__(self, device: str) -> None:
        torch = require("torch", "running TensorRT engines")
        if not torch.cuda.is_available():
            raise MexportError(
                "no CUDA GPU found: TensorRT is installed but torch.cuda sees no GPU",
                hint="run TensorRT engines on a host with an NVIDIA GPU and a CUDA build of torch",
            )
        self.device = torch.device(device)
        if self.device.index is None:  # "cuda": the current device, named explicitly for set_device and allocations
            self.device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.device)
        self.gpu_name: str = props.name
        self.capability: tuple[int, int] = (props.major, props.minor)
        torch.cuda.set_device(self.device)  # TensorRT deserializes onto, and runs on, the current device
        self.stream = torch.cuda.Stream(device=self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def ordered(self) -> contextlib.AbstractContextManager[Any]:
        """Work queued inside runs on this placement's stream."""
        import torch

        return torch.cuda.stream(self.stream)


# device type -> placement; only CUDA runs real engines (tests add a host placement for a fake tensorrt module)
PLACEMENTS: dict[str, type[CudaPlacement]] = {"cuda": CudaPlacement}


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile as the engine reports it: each input's (min, max) shape."""

    index: int
    bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    def accepts(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            low, high = self.bounds[name]
            if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)):
                return False
        return True

    def most(self, name: str, axis: int) -> int:
        return self.bounds[name][1][axis]


@dataclass
class _Session:
    """TensorRT objects and device resources alive between activate() and deactivate()."""

    logger: trt.Logger
    runtime: trt.Runtime
    engine: trt.ICudaEngine
    context: trt.IExecutionContext
    placement: CudaPlacement
    profiles: list[EngineProfile]
    dtypes: dict[str, torch.dtype]
    empty: torch.Tensor  # bound for zero-sized inputs (the past in prefill)
    profile: int | None = None


@dataclass
class TrtPast:
    """The KV cache on the device: one tensor per ``past_key_values.*`` input, ``length`` cached positions."""

    tensors: dict[str, torch.Tensor]
    length: int
    batch: int


@dataclass(frozen=True)
class _Piece:
    """One engine call: new tokens [start, stop) of the forward call, logits for [keep_from, stop) (may be empty)."""

    start: int
    stop: int
    keep_from: int
    profile: EngineProfile
    shapes: dict[str, tuple[int, ...]]


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (it supports len() and indexing, not iteration, in the stubs)."""
    return tuple(dims[axis] for axis in range(len(dims)))


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
        if device.split(":")[0] not in PLACEMENTS:
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
        self.lean_logits = LOGITS_INDICES in self.input_shapes
        self.spec = DecoderSpec.from_model_config(self.manifest["model_config"])
        self._session: _Session | None = None

    @property
    def precision(self) -> str:
        typing = "strongly typed" if self.engine_info["strongly_typed"] else "weakly typed"
        recipe = (self.manifest.get("recipe") or {}).get("name")
        quantized = f", {recipe}" if recipe else ""
        return f"{self.engine_info['precision']}{quantized} (TensorRT {self.engine_info['tensorrt_version']}, {typing})"

    @property
    def limits(self) -> RuntimeLimits:
        limits = self.engine_limits
        return RuntimeLimits(
            max_batch=limits.max_batch, max_context=limits.max_context, max_input_len=limits.max_input_len
        )

    def verify_files(self) -> VerifiedFiles:
        self.files = verify_artifact_files(self.engine_dir, self.manifest)
        return self.files

    # -- engine ----------------------------------------------------------------------------------------------

    def activate(self) -> None:
        require("torch", "running TensorRT engines")
        tensorrt_version = require_tensorrt()
        import tensorrt as trt
        import torch

        placement = PLACEMENTS[self.device.split(":")[0]](self.device)
        check_engine_compatibility(self.engine_info, tensorrt_version, placement.gpu_name, placement.capability)
        logger = trt.Logger(trt.Logger.VERBOSE if console.is_verbose() else trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.check_files_unchanged()  # what is deserialized now is what verify_files hashed
        with open(self.engine_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            engine = runtime.deserialize_cuda_engine(data)
        self.check_files_unchanged()
        if engine is None:
            raise MexportError(f"TensorRT could not deserialize {self.engine_path} (see the log above)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = sorted(name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
        if engine_inputs != sorted(self.input_shapes):
            raise IntegrityError(f"{self.engine_path}: engine inputs {engine_inputs} do not match the manifest's io")
        profiles = [
            EngineProfile(index, {name: self._profile_bounds(engine, name, index) for name in self.input_shapes})
            for index in range(engine.num_optimization_profiles)
        ]
        if not any(profile.most(self.past_names[0], 2) == 0 for profile in profiles):
            raise MexportError(f"{self.engine_path}: no profile runs a prompt without a past (prefill)")
        names = [*self.input_shapes, *self.output_names]
        dtypes = {name: _torch_dtype(engine.get_tensor_dtype(name)) for name in names}
        self._session = _Session(
            logger=logger,
            runtime=runtime,
            engine=engine,
            context=engine.create_execution_context(),
            placement=placement,
            profiles=profiles,
            dtypes=dtypes,
            empty=torch.empty(EMPTY_BINDING_BYTES, dtype=torch.uint8, device=placement.device),
        )

    @staticmethod
    def _profile_bounds(engine: trt.ICudaEngine, name: str, index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        low, _, high = engine.get_tensor_profile_shape(name, index)
        return _dims(low), _dims(high)

    def deactivate(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            # TensorRT objects go in reverse order of creation: context, engine, runtime
            del session.context, session.engine, session.runtime

    def _active(self) -> _Session:
        return self._activated(self._session)

    # -- decoding --------------------------------------------------------------------------------------------

    def _check_limits(self, batch: int, new_tokens: int, total: int) -> None:
        limits = self.engine_limits
        problems = []
        if batch > limits.max_batch:
            problems.append(f"batch {batch} > --max-batch {limits.max_batch}")
        if new_tokens > limits.max_input_len:
            problems.append(f"input length {new_tokens} > --max-input-len {limits.max_input_len}")
        if total > limits.max_context:
            problems.append(f"context {total} > --max-context {limits.max_context}")
        if problems:
            raise MexportError(
                f"{self.engine_dir}: request outside the engine's limits: {'; '.join(problems)}",
                hint="split the request (runtime.limits says what fits) or rebuild the engine with larger limits",
            )

    def _shapes(self, batch: int, new: int, past: int, logits: int) -> dict[str, tuple[int, ...]]:
        symbols = {BATCH: batch, SEQUENCE: new, PAST: past, LOGITS: logits}
        return {name: resolve_shape(shape, symbols, f"input {name}") for name, shape in self.input_shapes.items()}

    def _pieces(self, batch: int, new_tokens: int, cached: int, keep_from: int) -> Iterator[_Piece]:
        """Engine calls covering the new tokens: per call, the accepting profile that takes the most tokens.

        In a lean engine a call computes at most its profile's ``logits_length`` logits, so past ``keep_from`` a
        call holds no more kept positions than that.
        """
        profiles = self._active().profiles
        start = 0
        while start < new_tokens:
            best: _Piece | None = None
            for profile in profiles:
                stop = min(new_tokens, start + profile.most("input_ids", 1))
                if self.lean_logits:
                    stop = min(stop, max(keep_from, start) + profile.most(LOGITS_INDICES, 0))
                kept = max(0, stop - max(keep_from, start))
                shapes = self._shapes(batch, stop - start, cached + start, max(kept, 1))
                if profile.accepts(shapes) and (best is None or stop > best.stop):
                    best = _Piece(start, stop, max(keep_from, start), profile, shapes)
            if best is None:
                raise MexportError(
                    f"{self.engine_dir}: no optimization profile accepts batch {batch} with {cached + start} cached "
                    f"tokens",
                    hint="rebuild the engine with larger limits",
                )
            yield best
            start = best.stop

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV = None, logits_to_keep: int = 0
    ) -> tuple[np.ndarray, PastKV]:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        batch, new_tokens = input_ids.shape
        cached = 0 if past is None else past.length
        check_forward_shapes(input_ids, attention_mask, cached)
        if past is not None and past.batch != batch:
            raise MexportError(f"past has batch {past.batch} but input_ids has batch {batch}")
        keep_from = new_tokens - kept_logits(new_tokens, logits_to_keep)
        self._check_limits(batch, new_tokens, cached + new_tokens)
        chunks = []
        for piece in self._pieces(batch, new_tokens, cached, keep_from):
            width = cached + piece.stop
            logits, past = self._run(piece, input_ids, attention_mask[:, :width], past)
            if piece.keep_from < piece.stop:
                chunks.append(logits[:, -(piece.stop - piece.keep_from) :])
        return np.concatenate(chunks, axis=1), past

    def _run(
        self, piece: _Piece, input_ids: np.ndarray, attention_mask: np.ndarray, past: TrtPast | None
    ) -> tuple[np.ndarray, TrtPast]:
        """One engine call for ``piece``; returns its logits (kept positions last) and the extended cache."""
        import torch

        session = self._active()
        context, placement, dtypes = session.context, session.placement, session.dtypes
        batch, new_tokens = input_ids.shape[0], piece.stop - piece.start
        cached = 0 if past is None else past.length
        host_inputs = {"input_ids": input_ids[:, piece.start : piece.stop], "attention_mask": attention_mask}
        if "position_ids" in self.input_shapes:
            host_inputs["position_ids"] = position_ids_from_mask(attention_mask, new_tokens)
        if self.lean_logits:
            first = min(piece.keep_from - piece.start, new_tokens - 1)  # no kept position: compute the last one
            host_inputs[LOGITS_INDICES] = np.arange(first, new_tokens, dtype=np.int64)

        with placement.ordered():
            if session.profile != piece.profile.index:
                if not context.set_optimization_profile_async(piece.profile.index, placement.stream_handle):
                    raise MexportError(f"TensorRT refused optimization profile {piece.profile.index}")
                session.profile = piece.profile.index
            inputs: dict[str, torch.Tensor] = {
                name: torch.from_numpy(np.ascontiguousarray(array)).to(device=placement.device, dtype=dtypes[name])
                for name, array in host_inputs.items()
            }
            for name in self.past_names:
                if past is None:
                    inputs[name] = torch.empty(piece.shapes[name], dtype=dtypes[name], device=placement.device)
                else:
                    inputs[name] = past.tensors[name]
            for name, tensor in inputs.items():
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise MexportError(f"TensorRT rejected shape {tuple(tensor.shape)} for input {name}")
                address = tensor.data_ptr() if tensor.numel() else session.empty.data_ptr()
                context.set_tensor_address(name, address)
            outputs: dict[str, torch.Tensor] = {}
            for name in self.output_names:
                shape = _dims(context.get_tensor_shape(name))
                if any(dim < 0 for dim in shape):
                    raise MexportError(f"TensorRT could not infer the shape of output {name}: {shape}")
                outputs[name] = torch.empty(shape, dtype=dtypes[name], device=placement.device)
                context.set_tensor_address(name, outputs[name].data_ptr())
            if not context.execute_async_v3(placement.stream_handle):
                raise MexportError(f"TensorRT execution failed for batch {batch}, past {cached}, new {new_tokens}")
            logits = outputs["logits"].float().cpu()  # waits for the stream
        present = {name: outputs[self.present_names[name]] for name in self.past_names}
        return logits.numpy(), TrtPast(present, cached + new_tokens, batch)

    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        with self._active().placement.ordered():
            tensors = {name: tensor.repeat_interleave(repeats, dim=0) for name, tensor in past.tensors.items()}
        return TrtPast(tensors, past.length, past.batch * repeats)
