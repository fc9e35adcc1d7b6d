"""How a graph is built: strongly typed or with precision flags, per float dtype and quantization recipe.

Pure functions, so the choice is unit-tested without TensorRT:

- Explicitly quantized graphs (Q/DQ from ``mexport quantize``) are built strongly typed: TensorRT 10 requires it for
  FP8 and INT4 Q/DQ and recommends it for INT8; precision flags are then not set and every tensor keeps the type
  the graph gives it (unquantized layers run in the export's float dtype).
- An unquantized graph already in the requested precision is strongly typed too, so the exporter's explicit casts
  (fp32 RMSNorm and softmax in Gemma2) are kept exactly.
- An fp32 graph built at bf16 / fp16 uses the weakly typed BF16 / FP16 builder flag (TensorRT picks per layer;
  deprecated from TensorRT 10.12, so a bf16 export is the better input).
- Gemma2's activations overflow fp16 (softcapped logits and residual stream exceed 65504), so bf16 is the default and
  fp16 gets a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mexport.errors import MexportError
from mexport.optimize.engine.gpus import architecture_name

PRECISIONS = ("bf16", "fp16", "fp32")
BUILDER_FLAGS = {"bf16": "BF16", "fp16": "FP16"}
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
BASE_TENSORRT = "10.0"  # name-based IO, INT64 IO, BF16 and strongly typed networks
# compute capability each float precision needs (TensorRT 10 supports Turing and newer)
PRECISION_MIN_CAPABILITY = {"fp32": (7, 5), "fp16": (7, 5), "bf16": (8, 0)}
# highest ONNX opset documented for a TensorRT release's parser (ONNX-TensorRT operators.md, release notes); an
# opset between two entries needs the later release as far as mexport knows
OPSET_TENSORRT = ((20, "10.0"), (24, "10.15"), (25, "11.5"))


@dataclass(frozen=True)
class Recipe:
    """What a quantization recipe needs from TensorRT and the GPU."""

    name: str
    weight_bits: int
    quantizes_activations: bool
    min_capability: tuple[int, int]
    min_tensorrt: str
    summary: str


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("fp8", 8, True, (8, 9), "10.0", "FP8 E4M3 weights and activations (Q/DQ)"),
        Recipe("int8-sq", 8, True, (7, 5), "10.0", "INT8 SmoothQuant weights and activations (Q/DQ)"),
        Recipe("int8-wo", 8, False, (7, 5), "10.0", "INT8 weight-only (DQ before each GEMM)"),
        Recipe("int4-wo", 4, False, (8, 0), "10.0", "block-wise INT4 weight-only (DQ before each GEMM)"),
    )
}


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); compares release numbers correctly ('10.15' > '10.8')."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def opset_min_tensorrt(opset: int) -> str:
    for highest, version in OPSET_TENSORRT:
        if opset <= highest:
            return version
    raise MexportError(
        f"ONNX opset {opset} is newer than any TensorRT parser mexport knows (opset {OPSET_TENSORRT[-1][0]} in "
        f"TensorRT {OPSET_TENSORRT[-1][1]})",
        hint="export with an older --opset",
    )


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


def select_build_mode(graph_dtype: str, precision: str, recipe_name: str | None) -> BuildMode:
    """The build mode for a graph of float dtype ``graph_dtype`` at ``precision``, quantized by ``recipe_name``."""
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
        flag = BUILDER_FLAGS[precision]
        note = (
            f"fp32 graph built weakly typed with the {flag} builder flag: TensorRT runs each layer in {precision} or "
            f"fp32, IO stays fp32 (weak typing is deprecated from TensorRT 10.12: a {precision} export builds "
            "strongly typed)"
        )
        return BuildMode(
            precision, False, (flag,), None, BASE_TENSORRT, min_capability, (note,), _fp16_warnings(precision)
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
