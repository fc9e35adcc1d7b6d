"""Building a TensorRT engine from an mexport model directory (needs TensorRT, Polygraphy and a CUDA GPU).

The ONNX graph is parsed from its path, so the parser resolves ``model.onnx.data`` next to it; the network, builder
config (profiles, precision flags or strong typing, workspace pool, timing cache, hardware compatibility) and build
go through Polygraphy's loaders. The output directory is staged: ``model.engine``, the timing cache, ``plan.json``,
the tokenizer / config files and a ``mexport.json`` of kind "engine" that carries everything the runtime needs
(IO signature, model config, profiles, TensorRT version, GPU compute capability) appear together or not at all.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport import console
from mexport.errors import MexportError
from mexport.formats import ENGINE_FILE
from mexport.formats import GRAPH_FILE as ONNX_FILE
from mexport.fsutil import locks_output
from mexport.lazy import require
from mexport.manifest import (
    MANIFEST_NAME,
    STAMP_NAME,
    file_records,
    new_manifest,
    verified_input,
)
from mexport.optimize.engine.gpus import GpuInfo, require_cuda_gpu
from mexport.optimize.engine.plan import (
    PLAN_FILE,
    EnginePlan,
    EngineSettings,
    plan_engine,
    read_source_manifest,
    write_plan,
)
from mexport.stage import write_artifact
from mexport.trt_common import require_tensorrt

TIMING_CACHE_FILE = "timing.cache"
NOT_COPIED_SUFFIXES = (".onnx", ".data")  # the graph and its weights live in the engine
@dataclass(frozen=True)
class EngineResult:
    """A finished engine directory."""

    out_dir: Path
    engine_bytes: int
    build_seconds: float
    gpu: GpuInfo
    tensorrt_version: str
    plan: EnginePlan

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "engine": str(self.out_dir / ENGINE_FILE),
            "engine_bytes": self.engine_bytes,
            "build_seconds": round(self.build_seconds, 1),
            "gpu": self.gpu.name,
            "compute_capability": self.gpu.capability_text,
            "tensorrt_version": self.tensorrt_version,
            "precision": self.plan.mode.precision,
            "strongly_typed": self.plan.mode.strongly_typed,
        }


def _polygraphy_build(onnx_path: Path, plan: EnginePlan, timing_cache: Path) -> Any:
    """Parse, configure and build; returns TensorRT's serialized engine (an IHostMemory buffer)."""
    require("polygraphy", "building TensorRT engines")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    profiles = []
    for profile in plan.profiles:
        trt_profile = Profile()
        for name, shapes in profile.shapes.items():
            trt_profile.add(name, min=shapes.min, opt=shapes.opt, max=shapes.max)
        profiles.append(trt_profile)
    # precision flags only when the plan asks (TensorRT 10 weak typing): 11.x has no BF16 / FP16 flags, and
    # Polygraphy refuses bf16= / fp16= there as "unavailable"
    precision_flags = {flag.lower(): True for flag in plan.mode.builder_flags}
    compat = plan.settings.hw_compat == "ampere+"
    config = CreateConfig(
        tf32=False,
        profiles=profiles,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.settings.workspace_bytes},
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if compat else None,
        **precision_flags,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan.mode.strongly_typed)
    build = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))
    severity = G_LOGGER.EXTRA_VERBOSE if console.is_verbose() else G_LOGGER.WARNING  # TRT VERBOSE / WARNING
    # Polygraphy logs to stdout; keep stdout for --json
    with contextlib.redirect_stdout(sys.stderr), G_LOGGER.verbosity(severity):
        try:
            return build()
        except PolygraphyException as exc:
            raise MexportError(
                f"TensorRT could not build {onnx_path}: {exc}", hint="rerun with -v for TensorRT's full log"
            ) from exc


def _side_files(model_dir: Path) -> list[Path]:
    """Tokenizer, config and generation files to ship beside the engine."""
    return sorted(
        path
        for path in model_dir.iterdir()
        if path.is_file()
        and path.name not in (MANIFEST_NAME, PLAN_FILE, STAMP_NAME)
        and not path.name.endswith(NOT_COPIED_SUFFIXES)
    )


def engine_manifest(
    plan: EnginePlan,
    source: dict[str, Any],
    gpu: GpuInfo,
    tensorrt_version: str,
    build_seconds: float,
    files: dict[str, dict[str, Any]],
    timing_cache: Path,
) -> dict[str, Any]:
    """The engine directory's manifest: what the runtime needs to load and drive the engine, plus lineage."""
    return new_manifest(
        "engine",
        status="not_validated",
        dtype=plan.mode.precision,
        opset=source["opset"],
        model_config=source["model_config"],
        io=source["io"],
        recipe=source.get("recipe"),
        source=str(plan.model_dir.resolve()),
        parent=source,
        files=files,
        settings=plan.settings.to_dict(),
        engine={
            "file": ENGINE_FILE,
            "engine_bytes": files[ENGINE_FILE]["bytes"],
            "tensorrt_version": tensorrt_version,
            "gpu": gpu.name,
            "compute_capability": gpu.capability_text,
            "gpu_memory_bytes": gpu.memory_bytes,
            "hardware_compatibility": plan.settings.hw_compat,
            "precision": plan.mode.precision,
            "strongly_typed": plan.mode.strongly_typed,
            "builder_flags": list(plan.mode.builder_flags),
            "profiles": [profile.to_dict() for profile in plan.profiles],
            "limits": plan.settings.limits.to_dict(),
            "workspace_bytes": plan.settings.workspace_bytes,
            "timing_cache": str(timing_cache),
            "build_seconds": round(build_seconds, 1),
        },
        plan=plan.to_dict(),
    )


def _holds_only_plan(out: Path) -> bool:
    """An OUT written by ``--plan`` alone may be built into: its plan.json is rewritten with the engine."""
    return out.is_dir() and [path.name for path in out.iterdir()] == [PLAN_FILE]


@locks_output("out")
def build_engine(model_dir: Path, out: Path, settings: EngineSettings, overwrite: bool = False) -> EngineResult:
    """Build a TensorRT engine directory ``out`` from the export / quantize directory ``model_dir``."""
    model_dir, out = Path(model_dir), Path(out)
    source = read_source_manifest(model_dir, verify=True)
    onnx_path = model_dir / ONNX_FILE
    if not onnx_path.is_file():
        raise MexportError(f"{model_dir}: no {ONNX_FILE}", hint="export the model first with `mexport onnx`")
    tensorrt_version = require_tensorrt()
    if settings.tensorrt_version is not None and settings.tensorrt_version != tensorrt_version:
        raise MexportError(
            f"--tensorrt-version {settings.tensorrt_version} is for planning: this build uses the installed "
            f"TensorRT {tensorrt_version}",
            hint="drop --tensorrt-version, or install that TensorRT release",
        )
    gpu = require_cuda_gpu()
    plan = plan_engine(model_dir, settings, local_gpu=gpu)
    for warning in plan.warnings:
        console.warn(warning)
    planned = plan.gpu  # a --target may name another GPU than the one building
    other_gpu = planned is not None and planned.compute_capability not in (None, gpu.compute_capability)
    if planned is not None and other_gpu and settings.hw_compat == "none":
        console.warn(
            f"building on {gpu.name} (compute capability {gpu.capability_text}): the engine runs only on GPUs of "
            f"that capability, not on the planned {planned.name}; pass --hw-compat ampere+ to build for both"
        )
    if settings.timing_cache is not None and not settings.timing_cache.resolve().parent.is_dir():
        raise MexportError(f"--timing-cache {settings.timing_cache}: its directory does not exist")
    with write_artifact(
        out, overwrite=overwrite or _holds_only_plan(out), needs_bytes=plan.memory.weights_bytes * 11 // 10,
        what="the engine",
    ) as artifact:
        stage = artifact.path
        if settings.timing_cache is None:
            build_cache, recorded_cache = stage / TIMING_CACHE_FILE, out.resolve() / TIMING_CACHE_FILE
            if recorded_cache.is_file():
                shutil.copy2(recorded_cache, build_cache)  # a rebuild into the same OUT reuses its tactic timings
        else:
            build_cache = recorded_cache = settings.timing_cache.resolve()
        started = time.monotonic()
        with console.phase(f"building TensorRT {tensorrt_version} engine ({plan.mode.precision}) on {gpu.name}"):
            serialized = _polygraphy_build(onnx_path, plan, build_cache)
        build_seconds = time.monotonic() - started
        with open(stage / ENGINE_FILE, "wb") as handle:
            handle.write(serialized)
        del serialized  # the host copy of the engine is as large as the weights
        for path in _side_files(model_dir):
            shutil.copy2(path, stage / path.name)
        write_plan(plan, stage, overwrite=True)
        with console.phase("hashing the engine"):
            files = file_records(stage)
        manifest = engine_manifest(plan, source, gpu, tensorrt_version, build_seconds, files, recorded_cache)
        manifest["verified_inputs"] = [verified_input(model_dir, source)]
        artifact.record(manifest)
    return EngineResult(out.resolve(), files[ENGINE_FILE]["bytes"], build_seconds, gpu, tensorrt_version, plan)
