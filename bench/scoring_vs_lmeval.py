"""MCQ scoring time: lm-eval's own HFLM against mexport's scorer (PyTorch and ONNX Runtime) on one model and data.

Model: the ``wide-gemma2`` fixture (21M parameters: vocabulary 32000, hidden 512, 2 layers, Gemma2 softcaps and
sliding window) run in fp32 by every tool — HFLM ``dtype=float32``, mexport ``TorchDecoder(dtype="fp32")`` and
``OrtDecoder`` on its fp32 export. Two formats of the shipped samples, each question asked zero-shot and 1-shot
(two seeds) so the prompts are distinct and of mixed length:

- lettered: MedMCQA prompt, one-token choices A-D (lm-eval's ``medmcqa``);
- option texts: AfriMedQA prompt, the option texts as multi-token choices.

Each (format, tool) is timed ``--repeats`` times, interleaved (tool order rotates every round) so load from other
processes hits every tool alike; model load excluded, one warm-up call each. Prints every time, the ratio HFLM /
mexport of the best rounds with the per-round range, the largest |loglik| difference to HFLM and the accuracies.
HFLM runs with eager attention by default: with its default SDPA, transformers skips Gemma2's attention-logit
softcap, so its log-likelihoods are not Gemma2's (``--hf-attention sdpa`` times that anyway). Needs the ``lmeval``
extra (``pip install 'mexport[lmeval]'``).

    python bench/scoring_vs_lmeval.py [--repeats 3] [--batch-size 8] [--threads 1] [--hf-attention eager|sdpa]
                                      [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mexport.validate.tasks import MCQItem, load_task

FIXTURE = "wide-gemma2"
FORMATS = {"lettered": "medmcqa", "option texts": "afrimedqa"}
TOOLS = ("lm-eval hf", "mexport torch", "mexport ort")
TARGETS = {("lettered", "mexport torch"): 1.2, ("lettered", "mexport ort"): 2.0}
TARGETS |= {("option texts", "mexport torch"): 3.0, ("option texts", "mexport ort"): 4.0}


def _items(task: str) -> list[MCQItem]:
    """Each sample question zero-shot and 1-shot with two seeds: distinct prompts of mixed length."""
    items = list(load_task(task, "sample").items)
    for seed in (1, 2):
        items += [
            MCQItem(item.task, f"{item.doc_id}@{seed}", item.context, item.choices, item.gold)
            for item in load_task(task, "sample", shots=1, seed=seed).items
        ]
    return items


def _prepare(workdir: Path) -> tuple[Path, Path]:
    from mexport.export import export_onnx
    from mexport.fixtures import write_fixture

    checkpoint, export = workdir / FIXTURE, workdir / f"{FIXTURE}-onnx-fp32"
    if not checkpoint.is_dir():
        write_fixture(FIXTURE, checkpoint)
    if not export.is_dir():
        export_onnx(checkpoint, export, dtype="fp32", validate=False)
    return checkpoint, export


def lmeval_scorer(
    checkpoint: Path, batch_size: int, attn: str, dtype: str = "float32", device: str = "cpu"
) -> Callable[[list[MCQItem]], list[list[float]]]:
    """lm-eval's HFLM on ``checkpoint``: items -> each choice's log-likelihood."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = HFLM(
        pretrained=str(checkpoint), dtype=dtype, batch_size=batch_size, device=device, attn_implementation=attn
    )

    def score(items: list[MCQItem]) -> list[list[float]]:
        requests = [
            Instance("loglikelihood", {}, (item.context, choice), index)
            for index, item in enumerate(items)
            for choice in item.choices
        ]
        values = iter(loglik for loglik, _ in model.loglikelihood(requests, disable_tqdm=True))
        return [[next(values) for _ in item.choices] for item in items]

    return score


def mexport_scorer(runtime, tokenizer, batch_size: int) -> Callable[[list[MCQItem]], list[list[float]]]:
    """mexport's scorer on an activated runtime: items -> each choice's log-likelihood."""
    from mexport.validate.scoring import score_items

    def score(items: list[MCQItem]) -> list[list[float]]:
        return [s.logliks for s in score_items(runtime, tokenizer, items, batch_size=batch_size, progress=False)]

    return score


def _accuracy(items: list[MCQItem], logliks: list[list[float]]) -> float:
    return float(np.mean([int(np.argmax(values)) == item.gold for item, values in zip(items, logliks, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="HFLM's and mexport's batch size")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ONNX Runtime threads (1: fair on a shared host)"
    )
    parser.add_argument(
        "--hf-attention",
        default="eager",
        choices=["eager", "sdpa"],
        help="HFLM's attention: eager (Gemma2's softcap, identical logliks) or sdpa (HFLM's default, skips the softcap)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the fixture and export here between runs")
    args = parser.parse_args()

    import torch

    from mexport.runtime.ort import OrtDecoder
    from mexport.runtime.torch_runtime import TorchDecoder
    from mexport.validate.backends import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mexport-bench-lmeval-") as scratch:
        checkpoint, export = _prepare(args.workdir or Path(scratch))
        tokenizer = load_tokenizer(checkpoint)
        data = {name: _items(task) for name, task in FORMATS.items()}
        with (
            TorchDecoder(checkpoint, dtype="fp32") as torch_runtime,
            OrtDecoder(export, intra_op_threads=args.threads) as ort_runtime,
        ):
            scorers = {
                "lm-eval hf": lmeval_scorer(checkpoint, args.batch_size, args.hf_attention),
                "mexport torch": mexport_scorer(torch_runtime, tokenizer, args.batch_size),
                "mexport ort": mexport_scorer(ort_runtime, tokenizer, args.batch_size),
            }
            times: dict[tuple[str, str], list[float]] = {}
            results: dict[tuple[str, str], list[list[float]]] = {}
            for name, items in data.items():
                for tool, score in scorers.items():
                    score(items[:2])  # warm-up
            for round_index in range(args.repeats):
                order = TOOLS[round_index % 3 :] + TOOLS[: round_index % 3]
                for name, items in data.items():
                    for tool in order:
                        started = time.perf_counter()
                        results[name, tool] = scorers[tool](items)
                        times.setdefault((name, tool), []).append(time.perf_counter() - started)
    print(
        f"model: {FIXTURE} fp32 (vocab 32000, hidden 512, 2 layers), batch {args.batch_size}, threads "
        f"{args.threads or 'default'}, HFLM attention {args.hf_attention}, {args.repeats} interleaved rounds"
    )
    print(
        f"{'format':<13} {'tool':<14} {'n':>4} {'seconds per round':<28} {'best (rounds)':>16} {'target':>7} "
        f"{'max|dlogl|':>10} {'acc':>6}"
    )
    for name, items in data.items():
        baseline = times[name, "lm-eval hf"]
        for tool in TOOLS:
            spent = times[name, tool]
            ratios = [base / mine for base, mine in zip(baseline, spent, strict=True)]
            diff = np.abs(np.array(results[name, tool]) - np.array(results[name, "lm-eval hf"])).max()
            target = TARGETS.get((name, tool))
            # best round against best round (least disturbed by other load), then the per-round range
            ratio_text = (
                ""
                if tool == "lm-eval hf"
                else f"{min(baseline) / min(spent):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            )
            print(
                f"{name:<13} {tool:<14} {len(items):>4} {' '.join(f'{s:6.2f}' for s in spent):<28} {ratio_text:>16} "
                f"{f'{target:.1f}x' if target else '':>7} {diff:>10.1e} {_accuracy(items, results[name, tool]):>6.3f}"
            )


if __name__ == "__main__":
    main()
