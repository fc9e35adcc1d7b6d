"""Quantization quality of mexport's recipes beside ONNX Runtime's and ModelOpt's quantizers, on one export.

Every tool quantizes the same fp32 export (of ``--model``: a fixture name, trained or written by mexport, or a
checkpoint directory) and calibrates on the same texts (mexport's default calibration texts, written to a JSONL
file the peers read). One scorer reads every output: 16 held-out prompts (4 per demo set, not in the calibration
texts) x 64 tokens, every position's next-token distribution against the export's, with ONNX Runtime's CPU
provider at ``ORT_ENABLE_BASIC`` (no DequantizeLinear -> MatMulNBits fusion, so each graph computes exactly its
Q/DQ math; MatMulNBits outputs run their own kernel at accuracy level 0). Figures: mean / max KL(export || q),
top-1 agreement, max |logit diff|, quantize wall time and peak RSS (each run in its own process). Each mexport
recipe is divided by the best peer of the same family (int4 weight-only, int8 weight-only, int8 W8A8, fp8) and
form (TensorRT-valid, or ONNX Runtime-only); ``--repeats`` interleaves whole rounds and quotes ranges.

Peers: ONNX Runtime's ``MatMulNBitsQuantizer`` (default/MLAS symmetric QDQ, RTN, HQQ, GPTQ; asymmetric ones are
ONNX Runtime-only), ``quantize_static`` (int8 W8A8 QDQ, per-channel weights) in this interpreter; ModelOpt's
``modelopt.onnx.quantization.quantize`` (int4 awq_clip / awq_lite / rtn_dq, int8 max, fp8 max) in the virtual
environment ``--modelopt-python`` (skipped with a printed line when it does not import).

    python bench/quantize_quality.py [--model learned-gemma2] [--seed 0] [--block-size 32 128] [--repeats 2]
                                     [--peers ort modelopt] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPTS_PER_TASK = 4
PROMPT_TOKENS = 64
PEER_CALIBRATION_TOKENS = 64
DEFAULT_MODELOPT_PYTHON = "/work/notes/venv-modelopt/bin/python"

# (label, family, TensorRT-valid, mexport quantize options)
MEXPORT_RUNS = [
    ("mexport int4-wo", "int4-wo", True, ["--recipe", "int4-wo"]),
    ("mexport int4-wo --method rtn", "int4-wo", True, ["--recipe", "int4-wo", "--method", "rtn"]),
    ("mexport int4-wo --method awq", "int4-wo", True, ["--recipe", "int4-wo", "--method", "awq"]),
    ("mexport int4-wo --method gptq", "int4-wo", True, ["--recipe", "int4-wo", "--method", "gptq"]),
    ("mexport int4-wo --int8-layers auto", "int4-wo", True, ["--recipe", "int4-wo", "--int8-layers", "auto"]),
    ("mexport int4-wo --asymmetric", "int4-wo", False, ["--recipe", "int4-wo", "--asymmetric"]),
    ("mexport int8-wo", "int8-wo", True, ["--recipe", "int8-wo"]),
    ("mexport int8-sq", "int8-w8a8", True, ["--recipe", "int8-sq"]),
    ("mexport fp8", "fp8", True, ["--recipe", "fp8"]),
]

ORT_INT4 = """
import sys, onnx
from onnxruntime.quantization import QuantFormat, matmul_nbits_quantizer as mnb
source, target, block, kind = sys.argv[1:5]
block = int(block)
model = onnx.load(source)
nodes = [node.name for node in model.graph.node if node.op_type == "MatMul"
         and any(init.name == node.input[1] for init in model.graph.initializer)]
if kind == "hqq":
    config = mnb.HQQWeightOnlyQuantConfig(block_size=block)
else:
    config = mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=kind == "default",
                                              quant_format=QuantFormat.QDQ)
quantizer = mnb.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=kind == "default", algo_config=config,
                                     nodes_to_include=nodes)
quantizer.process()
onnx.save_model(quantizer.model.model, target, save_as_external_data=True, location="model.onnx.data")
"""

ORT_STATIC_INT8 = """
import sys, numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
source, target, feeds_file = sys.argv[1:4]
feeds = np.load(feeds_file, allow_pickle=True)["feeds"]
class Reader(CalibrationDataReader):
    def __init__(self): self.items = iter(list(feeds))
    def get_next(self): return next(self.items, None)
model = onnx.load(source)
nodes = [node.name for node in model.graph.node if node.op_type == "MatMul"
         and any(init.name == node.input[1] for init in model.graph.initializer)]
quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_quantize=nodes,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
"""

MODELOPT = """
import os, sys, shutil, numpy as np
from modelopt.onnx.quantization import quantize
source, target, mode, method, block, feeds_file = sys.argv[1:7]
# ModelOpt rewrites its input in place (shape inference): give it a copy, never the export
copy_dir = os.path.join(os.path.dirname(target), "input")
os.makedirs(copy_dir, exist_ok=True)
for name in ("model.onnx", "model.onnx.data"):
    shutil.copy2(os.path.join(os.path.dirname(source), name), os.path.join(copy_dir, name))
source = os.path.join(copy_dir, "model.onnx")
feeds = np.load(feeds_file, allow_pickle=True)["feeds"]
import onnx
model = onnx.load(source, load_external_data=False)
nodes = [node.name for node in model.graph.node if node.op_type == "MatMul"
         and any(init.name == node.input[1] for init in model.graph.initializer)]
calibration = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
kwargs = dict(quantize_mode=mode, calibration_data=calibration, calibration_eps=["cpu"], output_path=target,
              nodes_to_quantize=nodes, high_precision_dtype="fp32", use_external_data_format=True)
if mode == "int4":
    kwargs.update(calibration_method=method, block_size=int(block))
else:
    kwargs.update(calibration_method=method)
quantize(source, **kwargs)
shutil.rmtree(copy_dir)
"""


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_model(model: str, seed: int, workdir: Path) -> tuple[Path, Path]:
    """The checkpoint (a fixture written here, or the given directory) and its fp32 export."""
    mexport = str(Path(sys.executable).with_name("mexport"))
    checkpoint = Path(model)
    if not checkpoint.is_dir():
        checkpoint = workdir / f"{model}-seed{seed}"
        if not checkpoint.is_dir():
            subprocess.run([mexport, "-q", "fixture", model, str(checkpoint), "--seed", str(seed)], check=True)
    export = workdir / f"{checkpoint.name}-fp32"
    if not export.is_dir():
        subprocess.run([mexport, "-q", "onnx", str(checkpoint), "-o", str(export), "--dtype", "fp32"], check=True)
    return checkpoint, export


def held_out_prompts(export: Path) -> list[np.ndarray]:
    """4 prompts per demo set (64 tokens each): text the calibration (the shipped samples) never saw."""
    from mexport.optimize.quantize.calibration import tokenize
    from mexport.validate.tasks import TASKS, calibration_texts

    texts = []
    for task in TASKS:
        rows = calibration_texts(task, "demo")
        texts.extend(rows[:: max(1, len(rows) // PROMPTS_PER_TASK)][:PROMPTS_PER_TASK])
    return [ids for ids in tokenize(export, texts, PROMPT_TOKENS) if ids.shape[1] >= 8]


def write_calibration(export: Path, workdir: Path, calib_size: int) -> tuple[Path, Path]:
    """mexport's default calibration texts as JSONL (for mexport) and as graph feeds (for the peers)."""
    from mexport.optimize.quantize.calibration import MAX_CALIBRATION_TOKENS, load_calibration, tokenize

    texts = load_calibration(None, calib_size, 0).texts
    jsonl = workdir / "calibration.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    # the same tokens, cut into fixed-length rows: ModelOpt's AWQ stacks calibration inputs into one batch
    stream = np.concatenate([row[0] for row in tokenize(export, texts, MAX_CALIBRATION_TOKENS)])
    rows = stream[: len(stream) // PEER_CALIBRATION_TOKENS * PEER_CALIBRATION_TOKENS].reshape(-1, PEER_CALIBRATION_TOKENS)
    feeds = [_feeds(export, row[None]) for row in rows]
    feeds_file = workdir / "calibration_feeds.npz"
    np.savez(feeds_file, feeds=np.array(feeds, dtype=object))
    return jsonl, feeds_file


def _feeds(model_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one prompt with an empty KV cache, read from the graph's own inputs (any tool's output)."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        dims = [d.dim_value or 0 for d in value.type.tensor_type.shape.dim]
        if value.name == "input_ids":
            feeds[value.name] = ids
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones_like(ids)
        elif value.name == "position_ids":
            feeds[value.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif value.name == "logits_indices":
            feeds[value.name] = np.arange(ids.shape[1], dtype=np.int64)
        elif value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
    return feeds


def score_logits(model_dir: Path, prompts: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return [session.run(["logits"], _feeds(model_dir, ids))[0][0] for ids in prompts]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    from mexport.optimize.quantize.report import compare_logits

    return compare_logits(reference, candidate)


def peer_runs(peers: list[str], export: Path, block: int, feeds: Path, modelopt_python: str) -> list[tuple]:
    """(label, family, TensorRT-valid, command builder) for each peer quantizer."""
    graph = str(export / "model.onnx")
    runs: list[tuple] = []
    if "ort" in peers:
        for kind in ("default", "asymmetric", "hqq"):  # symmetric default: negative scales, not TensorRT-valid
            runs.append((f"ORT MatMulNBits {kind}", "int4-wo", False,
                         lambda out, kind=kind: [sys.executable, "-c", ORT_INT4, graph, out, str(block), kind]))
        runs.append(("ORT quantize_static int8", "int8-w8a8", True,
                     lambda out: [sys.executable, "-c", ORT_STATIC_INT8, graph, out, str(feeds)]))
    if "modelopt" in peers:
        probe = subprocess.run(
            [modelopt_python, "-c", "import modelopt.onnx.quantization"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            print(f"ModelOpt skipped: {modelopt_python} cannot import modelopt.onnx.quantization", flush=True)
        else:
            for mode, method, family in (("int4", "awq_clip", "int4-wo"), ("int4", "awq_lite", "int4-wo"),
                                         ("int4", "rtn_dq", "int4-wo"), ("int8", "max", "int8-w8a8"),
                                         ("fp8", "max", "fp8")):
                runs.append((f"ModelOpt {mode} {method}", family, True,
                             lambda out, mode=mode, method=method: [modelopt_python, "-c", MODELOPT, graph, out, mode,
                                                                    method, str(block), str(feeds)]))
    return runs


def _peer_dir(export: Path, output: Path) -> None:
    """A peer's output next to the export's tokenizer and config files (scored like any model directory)."""
    for path in export.iterdir():
        if path.name not in ("model.onnx", "model.onnx.data", "mexport.json") and path.is_file():
            shutil.copy2(path, output / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="learned-gemma2", help="fixture name or checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="fixture seed (a model you did not tune on)")
    parser.add_argument("--block-size", type=int, nargs="+", default=[32], help="int4 block sizes (0: mexport's default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--peers", nargs="*", default=["ort", "modelopt"])
    parser.add_argument("--only", nargs="*", help="run only labels containing one of these strings")
    parser.add_argument("--modelopt-python", default=DEFAULT_MODELOPT_PYTHON)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    measure = _module("export_memory").measure
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mexport-qquality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _, export = prepare_model(args.model, args.seed, workdir)
    calib_jsonl, feeds = write_calibration(export, workdir, args.calib_size)
    prompts = held_out_prompts(export)
    reference = score_logits(export, prompts)
    mexport = str(Path(sys.executable).with_name("mexport"))
    results: dict[tuple[str, int], list[dict]] = {}
    meta: dict[str, tuple[str, bool]] = {}
    for _ in range(args.repeats):
        for block in args.block_size:
            runs = [
                (label, family, trt, lambda out, options=options, block=block, family=family: [
                    mexport, "-q", "quantize", str(export), *options, "--calib", str(calib_jsonl),
                    "--calib-size", str(args.calib_size), "--check-prompts", "0",
                    *(["--block-size", str(block)] if block and family == "int4-wo" else []), "-o", out,
                ])
                for label, family, trt, options in MEXPORT_RUNS
            ]
            runs += peer_runs(args.peers, export, block or 128, feeds, args.modelopt_python)
            for label, family, trt, build in runs:
                if args.only and not any(key in label for key in args.only):
                    continue
                if block != args.block_size[0] and family != "int4-wo":
                    continue
                output = workdir / "runs" / f"{label.replace(' ', '_').replace('-', '')}-b{block}"
                shutil.rmtree(output, ignore_errors=True)
                if label.startswith("mexport"):
                    command = build(str(output))
                else:
                    output.mkdir(parents=True)
                    command = build(str(output / "model.onnx"))
                result = measure(label, command, output, workdir / f"{output.name}.log")
                if result["rc"] == 0:
                    if not label.startswith("mexport"):
                        _peer_dir(export, output)
                    result.update(compare(reference, score_logits(output, prompts)))
                results.setdefault((label, block), []).append(result)
                meta[label] = (family, trt)
    report(results, meta)


def _range(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if np.isclose(low, high, rtol=1e-9) else f"{format(low, fmt)}-{format(high, fmt)}"


def report(results: dict[tuple[str, int], list[dict]], meta: dict[str, tuple[str, bool]]) -> None:
    header = (f"{'tool':<40}{'block':>6}{'TRT':>5}{'mean KL':>17}{'max KL':>15}{'top-1':>13}{'max|dlogit|':>15}"
              f"{'wall s':>13}{'peak RSS MB':>13}")
    print("\n" + header)
    print("-" * len(header))
    best: dict[tuple[str, bool, int], float] = {}
    for (label, block), runs in results.items():
        ok = [run for run in runs if run["rc"] == 0]
        family, trt = meta[label]
        if not ok:
            print(f"{label:<40}{block:>6}{'yes' if trt else 'no':>5}  failed (exit {runs[0]['rc']}, {runs[0]['log']})")
            continue
        kls = [run["mean_kl"] for run in ok]
        print(
            f"{label:<40}{block:>6}{'yes' if trt else 'no':>5}{_range(kls, '.4f'):>17}"
            f"{_range([run['max_kl'] for run in ok], '.3f'):>15}{_range([run['top1_agreement'] for run in ok], '.3f'):>13}"
            f"{_range([run['max_abs_logit_diff'] for run in ok], '.3f'):>15}"
            f"{_range([run['wall_s'] for run in ok], '.1f'):>13}"
            f"{_range([run['peak_rss_bytes'] / 1e6 for run in ok], '.0f'):>13}"
        )
        if not label.startswith("mexport"):
            key = (family, trt, block)
            best[key] = min(best.get(key, np.inf), min(kls))
    print("\nmexport / best peer of the same family and form (mean KL; < 1 is better), and / best peer of any form:")
    for (label, block), runs in results.items():
        ok = [run for run in runs if run["rc"] == 0]
        family, trt = meta[label]
        peer = best.get((family, trt, block))
        any_form = min((kl for (f, _, b), kl in best.items() if f == family and b == block), default=None)
        if label.startswith("mexport") and ok and any_form:
            ours = max(r["mean_kl"] for r in ok)  # the worst repeat
            same = f"{ours / peer:.2f}x (best {peer:.4f})" if peer else "no peer of this form"
            print(f"  {label} (block {block}, {'TensorRT-valid' if trt else 'ONNX Runtime-only'}): same form "
                  f"{same}; any form {ours / any_form:.2f}x (best {any_form:.4f})")


if __name__ == "__main__":
    main()
