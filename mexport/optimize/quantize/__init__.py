"""Post-training quantization of exported decoders into Q/DQ ONNX (fp8, int8-sq, int8-wo, int4-wo).

See docs/quantize.md for what each recipe quantizes, its expected accuracy cost and the GPUs that run it.
"""

from mexport.optimize.quantize.api import QuantizeResult, quantize
from mexport.optimize.quantize.recipes import RECIPES, Recipe

__all__ = ["RECIPES", "QuantizeResult", "Recipe", "quantize"]
