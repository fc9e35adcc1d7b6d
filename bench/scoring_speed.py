"""Time per question of MCQ scoring: mexport's shared-context path vs one full forward per choice (the baseline).

For each backend (PyTorch on the checkpoint, ONNX Runtime on its fp32 export) and each sample task, scores the
same questions twice: ``score_items`` (context prefilled once, one-token choices read from the prefill, several
questions per batch; multi-token choices on a repeated KV cache) and ``loglikelihood_naive`` (one forward of
context + continuation per choice, as a plain lm-eval loop without its batching would). Prints seconds per
question for both, the speedup, and the largest log-likelihood difference (they must agree: same numbers, less
work). The default model is the tiny Gemma2 fixture, built in a temp dir; ``--fixture wide-gemma2`` has the real
model's large-vocabulary shape.

    python bench/scoring_speed.py [--fixture tiny-gemma2] [--tasks medmcqa medqa pubmedqa afrimedqa]
                                  [--limit 20] [--backends torch ort] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexport.validate.backends import open_backend
from mexport.validate.scoring import loglikelihood_naive, score_items
from mexport.validate.tasks import TASKS, load_task


def _prepare(workdir: Path, fixture: str, backends: list[str]) -> dict[str, Path]:
    from mexport.export import export_onnx
    from mexport.fixtures.tiny_gemma2 import make_fixture

    checkpoint = make_fixture(workdir / fixture, name=fixture)
    paths = {"torch": checkpoint}
    if "ort" in backends:
        export_onnx(checkpoint, workdir / f"{fixture}-onnx-fp32", dtype="fp32", validate=False)
        paths["ort"] = workdir / f"{fixture}-onnx-fp32"
    return paths


def _time(function, *args, **kwargs) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", default="tiny-gemma2", choices=["tiny-gemma2", "wide-gemma2"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--limit", type=int, default=20, help="questions per task")
    parser.add_argument("--backends", nargs="+", default=["torch", "ort"], choices=["torch", "ort"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"{'backend':<8} {'task':<10} {'n':>3} {'fast s/q':>9} {'naive s/q':>10} {'speedup':>8} {'max |diff|':>11}")
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="mexport-bench-scoring-") as scratch:
        paths = _prepare(Path(scratch), args.fixture, args.backends)
        for kind in args.backends:
            runtime, _, tokenizer = open_backend(paths[kind], kind=kind)  # torch: bf16 as saved, like validate
            with runtime:
                warmup = load_task(args.tasks[0], "sample", limit=1).items
                score_items(runtime, tokenizer, warmup, progress=False)
                loglikelihood_naive(runtime, tokenizer, [(warmup[0].context, warmup[0].choices[0])])
                fast_total = naive_total = 0.0
                for task in args.tasks:
                    items = load_task(task, "sample", limit=args.limit).items
                    requests = [(item.context, choice) for item in items for choice in item.choices]
                    fast_s, fast = _time(
                        score_items, runtime, tokenizer, items, batch_size=args.batch_size, progress=False
                    )
                    naive_s, naive = _time(loglikelihood_naive, runtime, tokenizer, requests)
                    diff = np.abs(np.array([v for score in fast for v in score.logliks]) - np.array(naive)).max()
                    fast_total, naive_total = fast_total + fast_s, naive_total + naive_s
                    n = len(items)
                    print(
                        f"{kind:<8} {task:<10} {n:>3} {fast_s / n:>9.4f} {naive_s / n:>10.4f} "
                        f"{naive_s / fast_s:>7.1f}x {diff:>11.2e}"
                    )
                totals[kind] = [fast_total, naive_total]
    for kind, (fast_total, naive_total) in totals.items():
        print(f"{kind}: all tasks {naive_total / fast_total:.1f}x faster than one forward per choice")


if __name__ == "__main__":
    main()
