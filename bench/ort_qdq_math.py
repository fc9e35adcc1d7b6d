"""Does ONNX Runtime compute a Q/DQ graph as written? mexport's session (``mexport.runtime.ort.ort_session``) vs ORT's
default CPU session, on the tiny fixture quantized with every recipe.

ORT's default CPU session fuses DequantizeLinear -> MatMul into MatMulNBits with accuracy_level 4, which quantizes
the activations to int8: arithmetic the graph does not contain. The reference here is the graph run node by node
(``ORT_DISABLE_ALL``: no rewrite at all); for weight-only recipes it is cross-checked against the weights
dequantized in numpy ((q - zero_point) * scale) feeding plain fp32 MatMuls. Printed per recipe and session: fused
MatMulNBits nodes, max |logit difference| and mean KL against the reference, and the ratio of the default session's
KL to mexport's.

    python bench/ort_qdq_math.py [--workdir DIR] [--recipes int8-wo int4-wo int8-sq fp8] [--tokens 48]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from mexport.export import export_onnx
from mexport.fixtures import write_fixture
from mexport.numerics import log_softmax
from mexport.optimize import quantize
from mexport.runtime.ort import ort_session


def feeds_for(manifest: dict[str, Any], tokens: int) -> dict[str, np.ndarray]:
    config = manifest["model_config"]
    rng = np.random.default_rng(0)
    feeds = {}
    for entry in manifest["io"]["inputs"]:
        name = entry["name"]
        if name == "input_ids":
            feeds[name] = rng.integers(4, config["vocab_size"], size=(1, tokens)).astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, tokens), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(tokens, dtype=np.int64)[None]
        elif name == "logits_indices":
            feeds[name] = np.arange(tokens, dtype=np.int64)
        else:
            feeds[name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_dim"]), np.float32)
    return feeds


def numpy_dequantized(model_dir: Path) -> bytes:
    """The graph with every weight DequantizeLinear replaced by its result computed in numpy (float64, then fp32)."""
    model = onnx.load(str(model_dir / "model.onnx"))
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    kept, folded = [], []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not all(name in values for name in node.input):
            kept.append(node)
            continue
        q = values[node.input[0]].astype(np.float64)
        scale = values[node.input[1]].astype(np.float64)
        zero = values[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros_like(scale)
        attributes = {a.name: a.i for a in node.attribute}
        axis, block = attributes.get("axis", 1), attributes.get("block_size", 0)
        if block:
            scale, zero = np.repeat(scale, block, axis=axis), np.repeat(zero, block, axis=axis)
        elif scale.ndim == 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        folded.append(numpy_helper.from_array(((q - zero) * scale).astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(folded)
    return model.SerializeToString()


def run(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(["logits"], feeds)[0][0].astype(np.float64)


def plain_session(source: str | bytes, level: Any, model_dir: Path) -> tuple[Any, collections.Counter[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)
    return session, ops


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--recipes", nargs="+", default=["int8-wo", "int4-wo", "int8-sq", "fp8"])
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ort-qdq-"))
    checkpoint = workdir / "checkpoint"
    if not checkpoint.is_dir():
        write_fixture("tiny-gemma2", checkpoint)
    export_dir = workdir / "export"
    if not export_dir.is_dir():
        export_onnx(checkpoint, export_dir, validate=False)
    level = ort.GraphOptimizationLevel
    print(f"onnxruntime {ort.__version__}, tiny-gemma2 fp32 export, {args.tokens} tokens")
    print(f"{'recipe':8} {'session':34} {'MatMulNBits':>11} {'max|dlogit|':>11} {'mean KL':>9}")
    for recipe in args.recipes:
        model_dir = workdir / recipe
        if not model_dir.is_dir():
            quantize(export_dir, model_dir, recipe, block_size=32 if recipe == "int4-wo" else None, check_prompts=0)
        feeds = feeds_for(json.loads((model_dir / "mexport.json").read_text()), args.tokens)
        graph = str(model_dir / "model.onnx")
        reference = run(plain_session(graph, level.ORT_DISABLE_ALL, model_dir)[0], feeds)
        rows: list[tuple[str, np.ndarray, int]] = []
        if recipe.endswith("-wo"):
            folded, _ = plain_session(numpy_dequantized(model_dir), level.ORT_DISABLE_ALL, model_dir)
            rows.append(("weights dequantized in numpy", run(folded, feeds), 0))
        default, default_ops = plain_session(graph, level.ORT_ENABLE_ALL, model_dir)
        rows.append(("ORT default (ORT_ENABLE_ALL)", run(default, feeds), default_ops.get("MatMulNBits", 0)))
        basic, basic_ops = plain_session(graph, level.ORT_ENABLE_BASIC, model_dir)
        rows.append(("ORT_ENABLE_BASIC", run(basic, feeds), basic_ops.get("MatMulNBits", 0)))
        ours = ort_session(graph, ["CPUExecutionProvider"], model_dir, qdq=True)
        rows.append(("mexport ort_session", run(ours, feeds), -1))
        for name, logits, fused in rows:
            shown = "?" if fused < 0 else str(fused)
            print(f"{recipe:8} {name:34} {shown:>11} {np.abs(logits - reference).max():11.3e} "
                  f"{mean_kl(reference, logits):9.2e}")
        ratio = mean_kl(reference, rows[-3][1]) / max(mean_kl(reference, rows[-1][1]), 1e-30)
        print(f"{recipe:8} KL(default) / KL(mexport) = {ratio:.3g}")


if __name__ == "__main__":
    main()
