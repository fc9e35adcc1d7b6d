"""The engine plan: profiles, build mode, expected TensorRT version and a GPU memory estimate, without TensorRT.

Everything comes from the model directory's ``mexport.json`` (IO signature, model config, dtype, quantization
recipe) plus the user's limits, so ``mexport engine --plan`` runs on any machine and refuses, with the numbers,
a build that cannot fit the chosen GPU.

Memory at run time is estimated as the sum of:

- weights: unquantized, ``parameter_count x bytes(precision)``; quantized, the Q/DQ ONNX files' bytes (what the
  engine stores), or when the manifest lists no files, quantized GEMM weights at the recipe's bits plus the
  embedding (which weight-only recipes keep in the float dtype);
- KV cache at max shapes, ``2 (K and V) x layers x kv_heads x head_dim x bytes x max_batch x max_context``, counted
  twice: the runtime binds the past as inputs and the present (past + new token) as separate outputs;
- activations at the largest profile shape: the logits output ``B x L x vocab`` (L = ``logits_length`` in a
  lean-logits graph, else every new token S), one layer's MLP / attention intermediates and the fp32 attention
  scores and probabilities ``2 x B x heads x S x min(past + S, max_context) x 4``;
- the builder's workspace pool (``--workspace``), which tactics may use at run time too;
- a fixed reserve for the CUDA context and TensorRT's own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mexport import strict_json
from mexport.errors import MexportError
from mexport.formats import ELEMENT_BYTES, GRAPH_FILE
from mexport.fsutil import format_bytes
from mexport.hardware import GpuInfo
from mexport.manifest import read_manifest, verify_files
from mexport.models import family_of
from mexport.optimize.engine.compat import require_compatible
from mexport.optimize.engine.gpus import GPU_TARGETS, gpu_budget
from mexport.optimize.engine.precision import (
    BuildMode,
    TensorRTTarget,
    check_capability,
    min_tensorrt_for_opset,
    resolve_tensorrt_target,
    select_build_mode,
)
from mexport.optimize.engine.profiles import OptimizationProfile, derive_profiles
from mexport.optimize.quantize.recipes import RECIPES, cuda_recipe_support
from mexport.trt_common import (
    BATCH,
    GB,
    LOGITS,
    PAST,
    SEQUENCE,
    EngineSettings,
    installed_tensorrt,
    version_tuple,
)

PLAN_FILE = "plan.json"
SOURCE_KINDS = ("export", "quantize")
HARDWARE_COMPAT = ("none", "ampere+")
RUNTIME_RESERVE_BYTES = 1 * GB  # CUDA context, cuBLAS / TensorRT kernels and the runtime's own allocations
KV_BUFFERS = 2  # past inputs and present outputs are distinct device buffers
ONNX_WEIGHT_SUFFIXES = (".onnx", ".onnx.data")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the engine needs on the GPU at run time, by component (see the module docstring)."""

    weights_bytes: int
    weights_source: str
    kv_bytes_per_token: int
    kv_cache_bytes: int
    activation_bytes: int
    workspace_bytes: int
    reserve_bytes: int = RUNTIME_RESERVE_BYTES

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + KV_BUFFERS * self.kv_cache_bytes
            + self.activation_bytes
            + self.workspace_bytes
            + self.reserve_bytes
        )

    def breakdown(self) -> str:
        return (
            f"weights {format_bytes(self.weights_bytes)} + KV cache {KV_BUFFERS} x {format_bytes(self.kv_cache_bytes)}"
            f" + activations {format_bytes(self.activation_bytes)} + workspace {format_bytes(self.workspace_bytes)}"
            f" + CUDA reserve {format_bytes(self.reserve_bytes)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.weights_bytes,
            "weights_source": self.weights_source,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_buffers": KV_BUFFERS,
            "activation_bytes": self.activation_bytes,
            "workspace_bytes": self.workspace_bytes,
            "reserve_bytes": self.reserve_bytes,
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class EnginePlan:
    """Everything a build will do, decided before TensorRT is touched."""

    model_dir: Path
    source_kind: str
    settings: EngineSettings
    mode: BuildMode
    profiles: list[OptimizationProfile]
    memory: MemoryEstimate
    gpu: GpuInfo | None
    min_tensorrt: str
    opset: int
    tensorrt: TensorRTTarget
    compatibility: dict[str, Any]
    # why ONNX Runtime's CUDA provider cannot run this model on the GPU (None: it can), so a GPU validation of it
    # goes through this engine instead of silently falling back to the CPU
    ort_cuda_gap: str | None = None
    notes: list[str] = field(default_factory=list)  # defaults chosen for this model, said aloud

    @property
    def warnings(self) -> list[str]:
        return list(self.mode.warnings)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.memory.total_bytes <= self.gpu.memory_bytes

    def runs_on(self, gpu: GpuInfo) -> str | None:
        """Why this engine cannot run on ``gpu`` (its memory, or a compute capability below the build mode's);
        None when it fits."""
        capability = gpu.compute_capability
        if capability is not None and capability < self.mode.min_capability:
            need = self.mode.min_capability
            return f"needs compute capability >= {need[0]}.{need[1]}"
        if self.memory.total_bytes > gpu.memory_bytes:
            return f"needs {format_bytes(self.memory.total_bytes)}"
        return None

    @property
    def fits_per_gpu(self) -> dict[str, str | None]:
        """Each named GPU target (``--target``) and why the engine does not fit it (None: it fits)."""
        return {name: self.runs_on(gpu) for name, gpu in GPU_TARGETS.items()}

    def to_dict(self) -> dict[str, Any]:
        gpu = None
        if self.gpu is not None:
            gpu = {
                "name": self.gpu.name,
                "memory_bytes": self.gpu.memory_bytes,
                "compute_capability": self.gpu.capability_text if self.gpu.compute_capability else None,
            }
        return {
            "model_dir": str(self.model_dir),
            "source_kind": self.source_kind,
            "settings": self.settings.to_dict(),
            "build": self.mode.to_dict(),
            "hardware_compatibility": self.settings.hw_compat,
            "tensorrt_min": self.min_tensorrt,
            "tensorrt": self.tensorrt.to_dict(),
            "compatibility": self.compatibility,
            "onnxruntime_cuda": {"runs": self.ort_cuda_gap is None, "reason": self.ort_cuda_gap},
            "notes": list(self.notes),
            "opset": self.opset,
            "profiles": [profile.to_dict() for profile in self.profiles],
            "memory": self.memory.to_dict(),
            "engine_bytes_estimate": self.memory.weights_bytes,
            "gpu": gpu,
            "fits": self.fits,
            "fits_per_gpu": self.fits_per_gpu,
            "warnings": list(self.warnings),
        }


def read_source_manifest(model_dir: Path, verify: bool = False) -> dict[str, Any]:
    """The export / quantize manifest, with the keys engines rely on checked; ``verify`` (a build, which reads
    the files; a plan reads only the manifest): every recorded file matches its hash."""
    manifest = read_manifest(model_dir, expected_kind=SOURCE_KINDS)
    for key in ("io", "model_config", "dtype", "opset"):
        if key not in manifest:
            raise MexportError(f"{model_dir}: manifest has no {key!r} (written by an incompatible mexport?)")
    if manifest["kind"] == "quantize" and not isinstance(manifest.get("recipe"), dict):
        raise MexportError(f"{model_dir}: quantize manifest has no recipe")
    if verify:
        verify_files(model_dir, manifest)
    return manifest


def recipe_name(manifest: dict[str, Any]) -> str | None:
    return manifest["recipe"]["name"] if manifest["kind"] == "quantize" else None


def _io_dtype(manifest: dict[str, Any], group: str, name_prefix: str) -> str:
    dtypes = {entry["dtype"] for entry in manifest["io"][group] if entry["name"].startswith(name_prefix)}
    if len(dtypes) != 1:
        raise MexportError(f"manifest io: expected one dtype for {name_prefix}* {group}, found {sorted(dtypes)}")
    dtype = str(dtypes.pop())
    if dtype not in ELEMENT_BYTES:
        raise MexportError(f"manifest io: unsupported dtype {dtype!r} for {name_prefix}*")
    return dtype


def estimate_weights(manifest: dict[str, Any], mode: BuildMode) -> tuple[int, str]:
    """Weight bytes in the engine, and how they were counted."""
    config = manifest["model_config"]
    params = int(config["parameter_count"])
    if mode.recipe is None:
        return params * ELEMENT_BYTES[mode.precision], f"{params:,} parameters x {mode.precision}"
    files = manifest.get("files") or {}
    onnx_bytes = sum(int(info["bytes"]) for name, info in files.items() if name.endswith(ONNX_WEIGHT_SUFFIXES))
    if onnx_bytes:
        return onnx_bytes, f"quantized ONNX files ({mode.recipe})"
    recipe = RECIPES[mode.recipe]
    # the embedding and an untied LM head stay in the float dtype (quantize leaves the LM head unless asked)
    tables = 1 if config.get("tie_word_embeddings", True) else 2
    embedding = tables * int(config["vocab_size"]) * int(config["hidden_size"])
    gemm_bytes = (params - embedding) * recipe.weight_bits // 8
    embedding_bytes = embedding * ELEMENT_BYTES[mode.precision]
    what = "embedding" if tables == 1 else "embedding and LM head"
    return gemm_bytes + embedding_bytes, (
        f"{params - embedding:,} GEMM parameters x {recipe.weight_bits} bits + {embedding:,} {what} x "
        f"{mode.precision} (scales not counted)"
    )


def estimate_activations(
    manifest: dict[str, Any], profiles: list[OptimizationProfile], act_bytes: int, max_context: int
) -> int:
    """Peak activation bytes over the profiles' max shapes (see the module docstring).

    A lean-logits graph computes logits for ``logits_length`` positions per row, not every new token; the runtime
    never runs more than ``max_context`` cached + new tokens, so attention rows are capped there.
    """
    config = manifest["model_config"]
    logits_bytes = ELEMENT_BYTES[_io_dtype(manifest, "outputs", "logits")]
    hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
    heads, vocab = int(config["num_attention_heads"]), int(config["vocab_size"])
    peak = 0
    for profile in profiles:
        batch, new, past = (profile.symbols[symbol][2] for symbol in (BATCH, SEQUENCE, PAST))
        positions = profile.symbols[LOGITS][2] if LOGITS in profile.symbols else new
        tokens = batch * new
        logits = batch * positions * vocab * logits_bytes
        layer = tokens * (2 * intermediate + 4 * hidden) * act_bytes
        scores = 2 * batch * heads * new * min(past + new, max_context) * 4
        peak = max(peak, logits + layer + scores)
    return peak


def estimate_memory(
    manifest: dict[str, Any], mode: BuildMode, profiles: list[OptimizationProfile], settings: EngineSettings
) -> MemoryEstimate:
    config = manifest["model_config"]
    kv_bytes = ELEMENT_BYTES[_io_dtype(manifest, "inputs", "past_key_values.")]
    per_token = family_of(config).kv_bytes_per_token(config, kv_bytes)
    weights, source = estimate_weights(manifest, mode)
    return MemoryEstimate(
        weights_bytes=weights,
        weights_source=source,
        kv_bytes_per_token=per_token,
        kv_cache_bytes=per_token * settings.max_batch * settings.limits.max_context,
        activation_bytes=estimate_activations(
            manifest, profiles, ELEMENT_BYTES[mode.precision], settings.limits.max_context
        ),
        workspace_bytes=settings.workspace_bytes,
    )


def _check_settings(settings: EngineSettings) -> None:
    if settings.hw_compat not in HARDWARE_COMPAT:
        raise MexportError(f"unknown --hw-compat {settings.hw_compat!r}; expected one of {', '.join(HARDWARE_COMPAT)}")
    if settings.workspace_gb <= 0:
        raise MexportError(f"--workspace must be positive, got {settings.workspace_gb}")


def _ort_cuda_gap(manifest: dict[str, Any]) -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run a quantized model on the GPU (None: it can, or not quantized)."""
    recipe = recipe_name(manifest)
    return None if recipe is None else cuda_recipe_support(recipe, manifest["dtype"])


def plan_engine(model_dir: Path, settings: EngineSettings, local_gpu: GpuInfo | None = None) -> EnginePlan:
    """Plan a build of ``model_dir``; raises :class:`MexportError` when it cannot run on the chosen GPU.

    The GPU is ``settings.target`` / ``settings.gpu_memory_gb`` when given, else ``local_gpu`` (a build passes the
    GPU it runs on); with neither, memory is estimated but not checked.
    """
    model_dir = Path(model_dir)
    _check_settings(settings)
    manifest = read_source_manifest(model_dir)
    config = manifest["model_config"]
    settings, notes = settings.for_model(config.get("max_position_embeddings"))
    limits = settings.limits
    limits.validate(config.get("max_position_embeddings"))
    tensorrt = resolve_tensorrt_target(settings.tensorrt_version, installed_tensorrt())
    mode = select_build_mode(
        manifest["dtype"], settings.precision or manifest["dtype"], recipe_name(manifest), tensorrt.version
    )
    profiles = derive_profiles(manifest["io"]["inputs"], limits)
    memory = estimate_memory(manifest, mode, profiles, settings)
    gpu = gpu_budget(settings.target, settings.gpu_memory_gb) or local_gpu
    opset = int(manifest["opset"])
    min_tensorrt = max(mode.min_tensorrt, min_tensorrt_for_opset(opset), key=version_tuple)
    if version_tuple(tensorrt.version) < version_tuple(min_tensorrt):
        raise MexportError(
            f"this graph needs TensorRT >= {min_tensorrt} (ONNX opset {opset}"
            f"{', recipe ' + mode.recipe if mode.recipe else ''}); the plan targets TensorRT {tensorrt.version} "
            f"({tensorrt.source})",
            hint=f"install or plan for TensorRT {min_tensorrt} or newer (--tensorrt-version), or export with an "
            "older --opset",
        )
    if (model_dir / GRAPH_FILE).is_file():
        rules = require_compatible(model_dir, tensorrt.version)
        compatibility: dict[str, Any] = {"checked": True, "rules": rules, "tensorrt": tensorrt.version}
    else:
        compatibility = {"checked": False, "reason": f"no {GRAPH_FILE} (only the manifest was planned from)"}
    plan = EnginePlan(
        model_dir, manifest["kind"], settings, mode, profiles, memory, gpu, min_tensorrt, opset, tensorrt,
        compatibility, _ort_cuda_gap(manifest), notes,
    )
    if gpu is not None:
        check_capability(mode, gpu.name, gpu.compute_capability)
        if not plan.fits:
            raise MexportError(
                f"the engine does not fit on {gpu.name} ({format_bytes(gpu.memory_bytes)}): it needs about "
                f"{format_bytes(memory.total_bytes)} = {memory.breakdown()} "
                f"(batch {limits.max_batch}, context {limits.max_context}, input {limits.max_input_len})",
                hint="lower --max-batch / --max-context / --max-input-len / --workspace, use a quantized model "
                "(mexport quantize --recipe int4-wo), or a larger GPU",
            )
    return plan


def write_plan(plan: EnginePlan, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``plan.json`` into ``out_dir`` (created if needed); an existing plan is replaced only with overwrite."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MexportError(f"{out_dir}: exists and is not a directory")
    target = out_dir / PLAN_FILE
    if target.exists() and not overwrite:
        raise MexportError(f"{target}: already exists", hint="pass --overwrite to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(strict_json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
    return target
