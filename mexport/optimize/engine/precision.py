"""How a graph is built: strongly typed or with precision flags, per float dtype, recipe and TensorRT version.

Pure functions, so the choice is unit-tested without TensorRT:

- Explicitly quantized graphs (Q/DQ from ``mexport quantize``) are built strongly typed: TensorRT 10 requires it for
  FP8 and INT4 Q/DQ and recommends it for INT8; precision flags are then not set and every tensor keeps the type
  the graph gives it (unquantized layers run in the export's float dtype).
- An unquantized graph already in the requested precision is strongly typed too, so the exporter's explicit casts
  (fp32 RMSNorm and softmax in Gemma2) are kept exactly.
- An fp32 graph built at bf16 / fp16 needs the weakly typed BF16 / FP16 builder flag. That exists only on TensorRT
  10 (deprecated from 10.12, with a warning); TensorRT 11 removed weak typing and the precision flags, so there the
  plan is refused with the fix (export with ``--dtype bf16``), never proposed.
- Gemma2's activations overflow fp16 (softcapped logits and residual stream exceed 65504), so bf16 is the default and
  fp16 gets a warning.

The TensorRT version a plan targets is the installed one, ``--tensorrt-version``, or the newest release the
``[gpu]`` extra allows (:data:`NEWEST_TENSORRT`); the extra's range is :data:`SUPPORTED_TENSORRT`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mexport.errors import MexportError
from mexport.optimize.engine.compat import OPSETS, PARSER_MIN_OPSET, first_tensorrt_for_opset
from mexport.optimize.quantize.recipes import RECIPES
from mexport.trt_common import architecture_name, version_tuple

PRECISIONS = ("bf16", "fp16", "fp32")
# the [gpu] extra's `tensorrt>=10.8,<12` (pyproject.toml): the API lines mexport reads were checked for this range
SUPPORTED_TENSORRT = ("10.8", "12")
NEWEST_TENSORRT = "11.4"  # newest release the [gpu] extra allows when this mexport was released: the plan default
WEAK_TYPING_DEPRECATED = (10, 12)  # TensorRT 10.12 deprecates weak typing ...
STRONG_TYPING_ONLY = (11, 0)  # ... 11.0 removes it and the FP16 / BF16 / INT8 / FP8 builder flags
BUILDER_FLAGS = {"bf16": "BF16", "fp16": "FP16"}
BASE_TENSORRT = "10.0"  # name-based IO, INT64 IO, BF16 and strongly typed networks
# compute capability each float precision needs (TensorRT 10 supports Turing and newer)
PRECISION_MIN_CAPABILITY = {"fp32": (7, 5), "fp16": (7, 5), "bf16": (8, 0)}


@dataclass(frozen=True)
class TensorRTTarget:
    """The TensorRT release a plan is made for, and where that choice came from."""

    version: str
    source: str

    @property
    def strongly_typed_only(self) -> bool:
        return version_tuple(self.version)[:2] >= STRONG_TYPING_ONLY

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source, "strongly_typed_only": self.strongly_typed_only}


def resolve_tensorrt_target(requested: str | None, installed: str | None) -> TensorRTTarget:
    """``--tensorrt-version`` when given, else the installed TensorRT, else :data:`NEWEST_TENSORRT`."""
    if requested is not None:
        target = TensorRTTarget(requested, "--tensorrt-version")
    elif installed is not None:
        target = TensorRTTarget(installed, "installed")
    else:
        target = TensorRTTarget(NEWEST_TENSORRT, "the newest release the [gpu] extra, tensorrt>=10.8,<12, allows")
    parts = target.version.split(".")
    if requested is not None and (len(parts) < 2 or not all(part.isdigit() for part in parts)):
        raise MexportError(f"--tensorrt-version {requested!r} is not of the form X.Y (e.g. 10.13 or 11.4)")
    low, high = (version_tuple(bound) for bound in SUPPORTED_TENSORRT)
    if not low <= version_tuple(target.version) < high:
        raise MexportError(
            f"TensorRT {target.version} ({target.source}) is outside the range mexport supports "
            f"(>= {SUPPORTED_TENSORRT[0]}, < {SUPPORTED_TENSORRT[1]})",
            hint="install TensorRT with `pip install 'mexport[gpu]'`, or plan with --tensorrt-version 10.13 / 11.4",
        )
    return target


def min_tensorrt_for_opset(opset: int) -> str:
    """The first TensorRT release whose parser documents ``opset``; an input error when none does."""
    version = first_tensorrt_for_opset(opset)
    if version is None:
        raise MexportError(
            f"ONNX opset {opset} is outside what any TensorRT parser mexport knows documents ({PARSER_MIN_OPSET} to {OPSETS[-1][0]}, "
            f"opset {OPSETS[-1][0]} in TensorRT {OPSETS[-1][1]})",
            hint="export with another --opset",
        )
    return version


@dataclass(frozen=True)
class BuildMode:
    """Network typing and builder flags for one build, with the reasons shown in the plan."""

    precision: str  # float precision unquantized layers run in
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    recipe: str | None
    min_tensorrt: str
    min_capability: tuple[int, int]
    notes: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.builder_flags),
            "tf32": False,
            "recipe": self.recipe,
            "min_tensorrt": self.min_tensorrt,
            "min_compute_capability": f"{self.min_capability[0]}.{self.min_capability[1]}",
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


def _fp16_warnings(precision: str) -> tuple[str, ...]:
    if precision != "fp16":
        return ()
    return (
        (
            "fp16 overflows on Gemma2 activations (the residual stream and pre-softcap logits exceed 65504); "
            "expect inf/NaN logits. bf16 keeps fp32's range: use --precision bf16"
        ),
    )


def select_build_mode(
    graph_dtype: str, precision: str, recipe_name: str | None, tensorrt_version: str = NEWEST_TENSORRT
) -> BuildMode:
    """The build mode for a graph of float dtype ``graph_dtype`` at ``precision``, quantized by ``recipe_name``,
    on TensorRT ``tensorrt_version``."""
    if precision not in PRECISIONS:
        raise MexportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if graph_dtype not in PRECISIONS:
        raise MexportError(f"unknown model dtype {graph_dtype!r} in manifest; expected one of {', '.join(PRECISIONS)}")

    if recipe_name is not None:
        if recipe_name not in RECIPES:
            raise MexportError(f"unknown quantization recipe {recipe_name!r}; mexport builds {', '.join(RECIPES)}")
        recipe = RECIPES[recipe_name]
        notes = [
            (
                f"{recipe.summary}: explicitly quantized graph built strongly typed (TensorRT >= 10 requires it for "
                "FP8 / INT4 Q/DQ and recommends it for INT8); no precision flags are set, the graph's own types rule"
            ),
            f"unquantized layers (norms, softmax, embeddings) run in the graph's {graph_dtype}",
        ]
        warnings = list(_fp16_warnings(graph_dtype))
        if precision != graph_dtype:
            warnings.append(
                f"--precision {precision} has no effect on a strongly typed {graph_dtype} graph; quantize a "
                f"{precision} export to change it"
            )
        min_capability = max(recipe.min_capability, PRECISION_MIN_CAPABILITY[graph_dtype])
        return BuildMode(
            graph_dtype, True, (), recipe_name, recipe.min_tensorrt, min_capability, tuple(notes), tuple(warnings)
        )

    min_capability = PRECISION_MIN_CAPABILITY[precision]
    if graph_dtype == precision:
        note = (
            f"{graph_dtype} graph built strongly typed: the exporter's casts (fp32 RMSNorm, softmax) are kept exactly"
        )
        if precision == "fp32":
            note += "; TF32 disabled so fp32 matmuls match the reference"
        return BuildMode(
            precision, True, (), None, BASE_TENSORRT, min_capability, (note,), _fp16_warnings(precision)
        )
    if graph_dtype == "fp32":
        version = version_tuple(tensorrt_version)[:2]
        if version >= STRONG_TYPING_ONLY:
            raise MexportError(
                f"cannot build an fp32 export at {precision} with TensorRT {tensorrt_version}: TensorRT 11 removed "
                f"weak typing and the {BUILDER_FLAGS[precision]} builder flag, so the graph's own dtype is what runs",
                hint=f"export with `mexport onnx --dtype {precision}` (then quantize that export if you need a "
                f"recipe), or build this export with --precision fp32, or plan for --tensorrt-version 10.x",
            )
        flag = BUILDER_FLAGS[precision]
        note = (
            f"fp32 graph built weakly typed with the {flag} builder flag: TensorRT runs each layer in {precision} or "
            f"fp32, IO stays fp32 (TensorRT 10 only: 11 removed weak typing; a {precision} export builds strongly "
            "typed)"
        )
        warnings = list(_fp16_warnings(precision))
        if version >= WEAK_TYPING_DEPRECATED:
            warnings.append(
                f"weak typing is deprecated in TensorRT {tensorrt_version} and removed in 11.0: export with "
                f"--dtype {precision} to build strongly typed"
            )
        return BuildMode(
            precision, False, (flag,), None, BASE_TENSORRT, min_capability, (note,), tuple(warnings)
        )
    raise MexportError(
        f"cannot build a {graph_dtype} export at {precision}: TensorRT can lower an fp32 graph's precision, not "
        f"change a {graph_dtype} one",
        hint=f"build with --precision {graph_dtype}, or export with --dtype fp32 (or {precision})",
    )


def check_capability(mode: BuildMode, gpu_name: str, capability: tuple[int, int] | None) -> None:
    """Refuse a GPU that cannot run the recipe / precision (e.g. FP8 before Ada)."""
    if capability is None or capability >= mode.min_capability:
        return
    need = mode.min_capability
    what = f"recipe {mode.recipe}" if mode.recipe else f"precision {mode.precision}"
    raise MexportError(
        f"{what} needs compute capability >= {need[0]}.{need[1]} ({architecture_name(need)} or newer); "
        f"{gpu_name} is {capability[0]}.{capability[1]} ({architecture_name(capability)})",
        hint="choose another recipe (int8-sq / int4-wo run on Ampere) or a newer GPU",
    )
