"""File names, dtype tables and data-file layout shared by every stage (export, quantize, engine, runtimes).

They live below all stages so that neither :mod:`mexport.export` nor :mod:`mexport.runtime` imports the other for
a constant.
"""

from __future__ import annotations

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ENGINE_FILE = "model.engine"
TASK = "text-generation-with-past"

# mexport dtype name -> torch / numpy name (also how HF configs spell the saved dtype)
EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ONNX_ELEMENT_TYPES = {"fp32": "FLOAT", "bf16": "BFLOAT16", "fp16": "FLOAT16"}
# bytes per element of each float dtype, under its mexport and its torch / numpy name
ELEMENT_BYTES = {
    spelling: size
    for name, size in {"fp32": 4, "bf16": 2, "fp16": 2}.items()
    for spelling in (name, EXPORT_DTYPES[name])
}

# tensors of at least LARGE_TENSOR_BYTES start on a 64 KiB boundary so ONNX Runtime can memory-map them in place
LARGE_TENSOR_BYTES = 1 << 20
LARGE_ALIGNMENT = 1 << 16
SMALL_ALIGNMENT = 64
# the exporter stores a Linear's weight pre-transposed for MatMul under this suffix
TRANSPOSED_SUFFIX = "_transposed"

# decoder IO names (Optimum's convention)
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# lean graphs: int64 positions, within the new tokens of a call, whose logits the graph computes
LOGITS_INDICES = "logits_indices"
LOGITS_LENGTH_AXIS = "logits_length"


def is_plain_transpose(node: object) -> bool:
    """A 2-D ``Transpose`` node (no perm, or perm [1, 0])."""
    if getattr(node, "op_type", None) != "Transpose":
        return False
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]  # type: ignore[attr-defined]
    return not perm or perm[0] == [1, 0]
