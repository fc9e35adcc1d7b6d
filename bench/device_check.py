"""The prepared GPU check: mexport's scoring against lm-eval on the 9B's shape, the export check past the window, and
one TensorRT build, all figures in one JSON file (schema: docs/device-check.md). Run it through device_check.sh.

(a) ``scoring_vs_lmeval``: a Gemma2 of Meditron3-Gemma2-9B's exact shape (42 layers, hidden 3584, head_dim 256,
    16 q / 8 KV heads, intermediate 14336, vocab 256000, window 4096, softcaps 50/30) with random bf16 weights
    made on the GPU (nothing downloaded), saved once, scored by mexport's PyTorch-CUDA scorer and by lm-eval's HFLM
    (eager attention: the one that applies Gemma2's softcap) on the same 200 demo questions per format (lettered:
    MedMCQA; option texts: AfriMedQA), interleaved rounds; ratio HFLM / mexport of the best rounds with the
    per-round range, max |Δloglik| and answer agreement.
(b) ``export_long_check``: the full-width 2-layer model (bench/export_memory.py's builder) exported in bf16 on CUDA
    with the check past the 4096 window (``long_check``); its max |Δlogit| against PyTorch. Needs onnxruntime-gpu.
(c) ``tensorrt_engine``: where TensorRT is installed, one bf16 engine of that export, and its logits against ONNX
    Runtime's on the same tokens (prefill, then decode steps through the KV cache).

``--cpu-smoke`` runs the same code on CPU at tiny shapes with a few questions (under 2 minutes on 2 cores): the
test suite runs it, so the GPU run does not find a broken script. Each check that cannot run here is recorded as
skipped with the reason; the JSON is rewritten after every check, so a run cut short keeps what it measured.

    python bench/device_check.py [--cpu-smoke] [--output device_check.json] [--questions 200] [--repeats 2]
                                 [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, when imported as a module
from export_memory import FULL_WIDTH, build_checkpoint
from scoring_vs_lmeval import FORMATS, lmeval_scorer, mexport_scorer

from mexport import strict_json
from mexport.fsutil import write_atomic
from mexport.manifest import utc_now
from mexport.trt_common import installed_tensorrt

SCHEMA = 1
NINE_B_LAYERS = 42
LONG_CHECK_LAYERS = 2
# tiny shapes for --cpu-smoke: every Gemma2 feature of the 9B (GQA, head_dim x heads != hidden, softcaps, window)
SMOKE_SHAPE = {
    **FULL_WIDTH,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "query_pre_attn_scalar": 28,
    "sliding_window": 16,
    "max_position_embeddings": 1024,
}
SMOKE_LAYERS = 2
SMOKE_QUESTIONS = 6
TOKENIZER_VOCAB = 1024  # the fixture tokenizer; a larger model vocab only leaves ids unused
BATCH_SIZE = 8
TRT_COMPARED_TOKENS = 64


class Skipped(Exception):
    """A check this host cannot run (no GPU, no TensorRT, no onnxruntime-gpu): recorded with its reason."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(module: str) -> str | None:
    if not _installed(module):
        return None
    return str(getattr(__import__(module), "__version__", "unknown"))


def environment(device: str) -> dict[str, Any]:
    import torch

    providers: list[str] = []
    if _installed("onnxruntime"):
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval"),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_providers": providers,
        "tensorrt": installed_tensorrt(),
    }


def build_on_device(directory: Path, shape: dict[str, Any], layers: int, device: str) -> dict[str, Any]:
    """A random-weight bf16 Gemma2 of ``shape`` created directly on ``device`` (seeded), saved as safetensors with
    the fixture tokenizer; returns its shape facts."""
    import torch
    import transformers

    from mexport.fixtures.tiny_gemma2 import train_tokenizer

    config = transformers.Gemma2Config(num_hidden_layers=layers, torch_dtype="bfloat16", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    train_tokenizer(TOKENIZER_VOCAB).save_pretrained(directory)
    return {"layers": layers, **{key: shape[key] for key in _SHAPE_KEYS}, "parameters": parameters}


_SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
)


def _timed_rounds(
    scorers: dict[str, Callable[[list[Any]], list[list[float]]]], items: list[Any], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """Each scorer ``repeats`` times, the order rotating every round; one warm-up call each."""
    names = list(scorers)
    for name in names:
        scorers[name](items[:2])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[list[float]]] = {}
    for round_index in range(repeats):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            started = time.perf_counter()
            results[name] = scorers[name](items)
            seconds[name].append(time.perf_counter() - started)
    return seconds, results


def check_scoring(work: Path, smoke: bool, device: str, questions: int, repeats: int) -> dict[str, Any]:
    if not _installed("lm_eval"):
        raise Skipped("lm-eval is not installed (pip install 'mexport[lmeval]')")
    from mexport.runtime.torch_runtime import TorchDecoder
    from mexport.validate.backends import load_tokenizer
    from mexport.validate.tasks import load_task

    checkpoint = work / "nine-b-shape"
    shape = SMOKE_SHAPE if smoke else FULL_WIDTH
    model = build_on_device(checkpoint, shape, SMOKE_LAYERS if smoke else NINE_B_LAYERS, device)
    tokenizer = load_tokenizer(checkpoint)
    data = {name: load_task(task, "demo").items[:questions] for name, task in FORMATS.items()}
    formats: dict[str, Any] = {}
    with TorchDecoder(checkpoint, device=device) as runtime:
        scorers = {
            "mexport": mexport_scorer(runtime, tokenizer, BATCH_SIZE),
            "lm-eval": lmeval_scorer(checkpoint, BATCH_SIZE, "eager", dtype="bfloat16", device=device),
        }
        for name, items in data.items():
            seconds, results = _timed_rounds(scorers, items, repeats)
            ratios = [theirs / ours for theirs, ours in zip(seconds["lm-eval"], seconds["mexport"], strict=True)]
            ours, theirs = np.array(results["mexport"]), np.array(results["lm-eval"])
            formats[name] = {
                "task": FORMATS[name],
                "questions": len(items),
                "mexport_seconds": seconds["mexport"],
                "lmeval_seconds": seconds["lm-eval"],
                "ratio_best": min(seconds["lm-eval"]) / min(seconds["mexport"]),
                "ratio_range": [min(ratios), max(ratios)],
                "max_abs_loglik_delta": float(np.max(np.abs(ours - theirs))),
                "answer_agreement": float(np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1))),
                "mexport_acc": _accuracy(items, ours),
                "lmeval_acc": _accuracy(items, theirs),
            }
    shutil.rmtree(checkpoint, ignore_errors=True)
    return {"status": "ran", "model": model, "dtype": "bf16", "repeats": repeats, "formats": formats}


def _accuracy(items: list[Any], logliks: np.ndarray) -> float:
    return float(np.mean([int(row.argmax()) == item.gold for item, row in zip(items, logliks, strict=True)]))


def check_export(work: Path, smoke: bool, device: str) -> dict[str, Any]:
    from mexport.errors import ValidationFailedError
    from mexport.export import export_onnx
    from mexport.manifest import read_manifest

    if device == "cuda" and "CUDAExecutionProvider" not in environment(device)["onnxruntime_providers"]:
        raise Skipped("onnxruntime-gpu is not installed (no CUDAExecutionProvider): the CUDA export check needs it")
    checkpoint, export = work / "two-layer", work / "two-layer-bf16"
    build_checkpoint(checkpoint, SMOKE_LAYERS if smoke else LONG_CHECK_LAYERS, 2.2, SMOKE_SHAPE if smoke else None)
    started = time.perf_counter()
    try:
        export_onnx(checkpoint, export, dtype="bf16", device=device, long_check=True)
    except ValidationFailedError:
        pass  # kept and marked failed: its check's figures are the result
    summary = read_manifest(export)["validation"]
    return {
        "status": summary["status"],
        "device": device,
        "export_seconds": time.perf_counter() - started,
        "max_abs_logit_delta": summary["max_abs"],
        "top1_agreement": summary["top1_agreement"],
        "sequence_length": summary["inputs"]["sequence_length"],
        "sliding_window": summary["inputs"]["sliding_window"],
        "window_exercised": summary["inputs"]["window_exercised"],
        "tolerance": summary["tolerance"],
        "export_dir": str(export),
    }


def check_tensorrt(work: Path, device: str, export: Path | None) -> dict[str, Any]:
    if device != "cuda":
        raise Skipped("no CUDA GPU: a TensorRT engine is built on the GPU it runs on")
    if installed_tensorrt() is None:
        raise Skipped("TensorRT is not installed, or only its type stubs (pip install 'mexport[gpu]')")
    if export is None:
        raise Skipped("no bf16 export of the 2-layer model (the export check did not produce one)")
    from mexport.export.verify import compare_logits, run_rows, validation_tokens
    from mexport.optimize.engine import build_engine
    from mexport.optimize.engine.plan import EngineSettings
    from mexport.runtime.ort import OrtDecoder
    from mexport.runtime.trt import TrtDecoder

    engine = work / "two-layer-engine"
    started = time.perf_counter()
    build_engine(export, engine, EngineSettings(max_batch=1, max_context=512, max_input_len=256))
    build_seconds = time.perf_counter() - started
    vocab = json.loads((export / "mexport.json").read_text())["model_config"]["vocab_size"]
    tokens, _ = validation_tokens(vocab, TRT_COMPARED_TOKENS)
    rows = [(tokens[: TRT_COMPARED_TOKENS // 2], tokens[TRT_COMPARED_TOKENS // 2 :])]
    with TrtDecoder(engine) as trt_runtime:
        trt_logits = run_rows(trt_runtime, rows)
    ort_device = "cuda" if "CUDAExecutionProvider" in environment(device)["onnxruntime_providers"] else "cpu"
    with OrtDecoder(export, device=ort_device) as ort_runtime:
        ort_logits = run_rows(ort_runtime, rows)
    comparison = compare_logits(trt_logits, ort_logits)
    return {
        "status": "ran",
        "tensorrt": installed_tensorrt(),
        "build_seconds": build_seconds,
        "ort_device": ort_device,
        "positions": TRT_COMPARED_TOKENS,
        "max_abs_logit_delta": comparison["max_abs"],
        "top1_agreement": comparison["top1_agreement"],
    }


def _run_check(result: dict[str, Any], name: str, output: Path, check: Callable[[], dict[str, Any]]) -> None:
    """Run one check into ``result["checks"][name]`` (skipped / error with its reason), then rewrite the JSON."""
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        entry = check()
    except Skipped as exc:
        entry = {"status": "skipped", "reason": str(exc)}
        print(f"   skipped: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a check that breaks is recorded; the others still run
        entry = {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(entry["traceback"], file=sys.stderr, flush=True)
    entry.setdefault("reason", None)
    entry["seconds"] = time.perf_counter() - started
    result["checks"][name] = entry
    write_atomic(output, (strict_json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}, indent=1, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, few questions, on CPU")
    parser.add_argument("--output", type=Path, default=Path("device_check.json"))
    parser.add_argument("--questions", type=int, default=None, help="per format (default 200; smoke 6)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 2; smoke 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    args = parser.parse_args()

    import torch

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU: run on a GPU host, or pass --cpu-smoke")
    questions = args.questions or (SMOKE_QUESTIONS if smoke else 200)
    repeats = args.repeats or (1 if smoke else 2)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "cpu-smoke" if smoke else "gpu",
        "created": utc_now(),
        "environment": environment(device),
        "checks": {},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mexport-device-check-", dir=args.workdir) as scratch:
        work = Path(scratch)
        _run_check(result, "scoring_vs_lmeval", args.output, lambda: check_scoring(work, smoke, device, questions, repeats))
        _run_check(result, "export_long_check", args.output, lambda: check_export(work, smoke, device))
        export_dir = result["checks"]["export_long_check"].get("export_dir")
        _run_check(
            result, "tensorrt_engine", args.output,
            lambda: check_tensorrt(work, device, Path(export_dir) if export_dir else None),
        )
    result["seconds"] = time.perf_counter() - started
    write_atomic(args.output, (strict_json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    print(f"figures in {args.output.resolve()} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
