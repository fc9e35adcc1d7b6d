"""The quantization schemes: one table of what each stored number type is and where it runs.

Read by the quantizer (value ranges, storage types, ONNX element types), the ONNX Runtime CUDA kernel check, the
TensorRT compatibility check and the recipes, so a new scheme is one row here. No third-party import: the
storage type is named (an ``ml_dtypes`` attribute or a NumPy type), not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mexport.errors import MexportError


@dataclass(frozen=True)
class QuantScheme:
    name: str  # mexport's name ("fp8", "int8", "int4", "uint4")
    onnx_type: str  # onnx.TensorProto element type name
    element_type: str  # the lower-case element type name type inference reports ("float8e4m3fn", "int4")
    storage: str  # NumPy / ml_dtypes type name of the stored values
    bits: int
    qmin: float  # smallest value produced
    qmax: float  # largest value produced
    symmetric: bool  # zero point always 0 (TensorRT's Q/DQ takes no other)
    ort_cuda_min_opset: int  # first opset with a CUDA Q/DQ kernel for the type
    ort_cuda_blocked: bool  # the CUDA provider's blocked DequantizeLinear takes this type
    tensorrt: str | None  # why TensorRT cannot take it (None: it can)

    @property
    def levels(self) -> int:
        return int(self.qmax - self.qmin) + 1

    @property
    def element_bytes(self) -> float:
        return self.bits / 8


FP8_E4M3_MAX = 448.0

SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantScheme("fp8", "FLOAT8E4M3FN", "float8e4m3fn", "float8_e4m3fn", 8, -FP8_E4M3_MAX, FP8_E4M3_MAX, True, 19,
                    False, None),
        QuantScheme("fp8-e5m2", "FLOAT8E5M2", "float8e5m2", "float8_e5m2", 8, -57344.0, 57344.0, True, 19, False,
                    "not produced by mexport (E4M3 is TensorRT's FP8 Q/DQ type)"),
        QuantScheme("int8", "INT8", "int8", "int8", 8, -127.0, 127.0, True, 10, False, None),
        QuantScheme("uint8", "UINT8", "uint8", "uint8", 8, 0.0, 255.0, False, 10, False,
                    "zero points: TensorRT's IDequantizeLayer accepts only zero zero points (symmetric Q/DQ)"),
        QuantScheme("int4", "INT4", "int4", "int4", 4, -8.0, 7.0, True, 21, True, None),
        QuantScheme("uint4", "UINT4", "uint4", "uint4", 4, 0.0, 15.0, False, 21, True,
                    "zero points: TensorRT's IDequantizeLayer accepts only zero zero points (symmetric Q/DQ)"),
    )
}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise MexportError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def scheme_for_element_type(element_type: str) -> QuantScheme | None:
    """The scheme of an inferred element type name ("int4", "float8e4m3fn"), None for a float type."""
    return next((scheme for scheme in SCHEMES.values() if scheme.element_type == element_type), None)
