"""The quantization recipes: what each one quantizes, how, and where it runs.

The one registry of recipe facts: the quantizer (validation, graph edits), the engine planner (GPU compute
capability, minimum TensorRT, build mode, weight bits), the CLI's help and error messages, and docs/quantize.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from mexport.errors import MexportError
from mexport.formats import EXPORT_DTYPES
from mexport.quant_schemes import SCHEMES
from mexport.runtime.cuda_kernels import qdq_gap

DEFAULT_SMOOTHQUANT_ALPHA = 0.5
DEFAULT_BLOCK_SIZE = 128
# int4-wo's weight search (mexport.optimize.quantize.weight_search.INT4_METHODS; "rtn" needs no calibration)
DEFAULT_INT4_METHOD = "auto"
# QuantizeLinear / DequantizeLinear take bf16 and fp16 scales and inputs from opset 19 (13 is float32 only)
LOW_PRECISION_QDQ_OPSET = 19


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    weights: str  # scheme of the weights: "fp8" | "int8" | "int4"
    activations: str | None  # scheme of the linear layers' inputs, None for weight-only
    blocked: bool  # weights quantized in blocks along the input dimension (else one scale per output channel)
    smoothquant: bool  # migrate activation outliers into the weights before quantizing
    min_opset: int  # Q/DQ features used: per-axis (13), float8 (19), int4 + block_size (21); fp32 scales
    gpus: str
    accuracy: str
    min_capability: tuple[int, int]  # compute capability of the recipe's tensor-core kernels
    min_tensorrt: str = "10.0"  # first TensorRT whose ONNX parser takes the recipe's Q/DQ (the opset may need later)
    build_mode: str = "strongly typed"  # explicit Q/DQ: TensorRT requires it for FP8 / INT4, recommends it for INT8

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    @property
    def weight_bits(self) -> int:
        return SCHEMES[self.weights].bits

    def opset_for(self, dtype: str) -> int:
        """The lowest opset whose Q/DQ ops this recipe's graph uses, for an export of ``dtype``."""
        return self.min_opset if dtype == "fp32" else max(self.min_opset, LOW_PRECISION_QDQ_OPSET)

    def needs_calibration(self, method: str = DEFAULT_INT4_METHOD) -> bool:
        """Activation statistics for W8A8; int4-wo's weight search unless ``method`` is round-to-nearest."""
        return not self.weight_only or (self.blocked and method != "rtn")


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="fp8",
            summary="W8A8 FP8 E4M3: per-channel weight scales, calibrated per-tensor activation scales (amax/448)",
            weights="fp8",
            activations="fp8",
            blocked=False,
            smoothquant=False,
            min_opset=19,
            gpus="Ada and Hopper only (compute capability >= 8.9: L4, L40S, H100, H200)",
            accuracy="small: FP8's exponent absorbs activation outliers without smoothing; 3 mantissa bits cost "
            "more than int8 on outlier-free layers",
            min_capability=(8, 9),
        ),
        Recipe(
            name="int8-sq",
            summary="W8A8 INT8 SmoothQuant: activation outliers migrated into weights, per-channel int8 weights, "
            "calibrated per-tensor int8 activations (amax/127)",
            weights="int8",
            activations="int8",
            blocked=False,
            smoothquant=True,
            min_opset=13,
            gpus="Turing and newer (>= 7.5; >= 8.0 for a bf16 graph)",
            accuracy="small; per-tensor int8 activations are the weak point, smoothing keeps outliers in check",
            min_capability=(7, 5),
        ),
        Recipe(
            name="int8-wo",
            summary="INT8 weight-only: per-channel int8 weights, activations in the model's float dtype",
            weights="int8",
            activations=None,
            blocked=False,
            smoothquant=False,
            min_opset=13,
            gpus="Turing and newer (>= 7.5; >= 8.0 for a bf16 graph)",
            accuracy="smallest (weight rounding only, 255 levels per output channel)",
            min_capability=(7, 5),
        ),
        Recipe(
            name="int4-wo",
            summary="INT4 weight-only, block-wise along the input dimension (opset-21 blocked DequantizeLinear), "
            "per-layer choice of clipped scales, GPTQ and AWQ by calibrated output error",
            weights="int4",
            activations=None,
            blocked=True,
            smoothquant=False,
            min_opset=21,
            gpus="Ampere and newer (>= 8.0); TensorRT >= 10.15 for the opset-21 graph",
            accuracy="largest of the four (16 levels per block); the calibrated search and smaller blocks recover "
            "most of it",
            min_capability=(8, 0),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise MexportError(f"unknown quantization recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def cuda_recipe_support(recipe_name: str, dtype: str) -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run ``recipe_name`` quantized over a ``dtype`` export on the GPU
    (None: it can; blocked int4 needs a release whose CUDA DequantizeLinear implements ``block_size``)."""
    recipe = get_recipe(recipe_name)
    return qdq_gap(
        "DequantizeLinear", SCHEMES[recipe.weights].element_type, EXPORT_DTYPES[dtype], recipe.opset_for(dtype),
        recipe.blocked,
    )


def cuda_supported_recipes(dtype: str) -> dict[str, str | None]:
    """For ``doctor`` and engine plans: every recipe over a ``dtype`` export -> None (CUDA provider runs it) or why
    not (use its TensorRT engine, or ``--backend-device cpu``)."""
    return {name: cuda_recipe_support(name, dtype) for name in RECIPES}
