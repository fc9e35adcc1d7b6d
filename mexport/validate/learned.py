"""A tiny Gemma2 that actually knows the shipped questions, so parity tests have accuracy to lose.

A randomly initialised fixture scores at chance, where a broken export and a perfect one look alike. This one
starts from ``tiny-gemma2`` (same architecture, tokenizer and bf16 layout) and is fine-tuned on CPU, in a couple of
minutes, on every usable question of the chosen tasks' shipped sets: the hand-written samples and the 200-question
demo sets (:mod:`mexport.validate.demo`), the prompt exactly as scored, then the gold continuation, loss on the
answer tokens, until it answers them far above chance. Its accuracies, measured the way validation measures them
(``score_items`` on the saved bf16 checkpoint with PyTorch), are written to ``learned.json``. Results are cached
by a hash of the data files, seed, steps and this code (including the base fixture's module, so a change to the
tiny architecture retrains), so after the first call it is a copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mexport import __version__, console, strict_json
from mexport.errors import MexportError
from mexport.fixtures import tiny_gemma2
from mexport.fsutil import output_lock, staged_output_dir
from mexport.lazy import require
from mexport.manifest import package_versions
from mexport.validate import scoring
from mexport.validate import tasks as tasks_module
from mexport.validate.scoring import encode_pair, score_items
from mexport.validate.tasks import TASKS, load_task

LEARNED_NAME = "learned-gemma2"
BASE_FIXTURE = "tiny-gemma2"
DEFAULT_TASKS = ("medmcqa", "medqa", "pubmedqa", "afrimedqa")
DEFAULT_STEPS = 700
# the shipped question sets it learns (``--data TASK=sample`` / ``TASK=demo``)
DATASETS = ("sample", "demo")
BATCH_SIZE = 16
LEARNING_RATE = 1e-2
NOTE_FILE = "learned.json"


def cache_root() -> Path:
    """``$MEXPORT_CACHE`` or ``~/.cache/mexport``."""
    return Path(os.environ.get("MEXPORT_CACHE") or Path.home() / ".cache" / "mexport")


def _cache_key(tasks: Sequence[str], seed: int, steps: int) -> str:
    """Changes whenever anything that decides the weights changes: data, seed, steps, code, library versions."""
    digest = hashlib.sha256()
    inputs = [path for task in tasks for path in (TASKS[task].sample_path, TASKS[task].demo_path)]
    # this module, the base fixture, and the prompt / tokenisation code that decides what the model is trained on
    inputs += [Path(__file__), tiny_gemma2.CORPUS_PATH]
    inputs += [Path(module.__file__ or "") for module in (tiny_gemma2, tasks_module, scoring)]
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    versions = package_versions(("torch", "transformers", "tokenizers"))
    digest.update(json.dumps([list(tasks), seed, steps, __version__, versions], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _training_examples(tokenizer: Any, tasks: Sequence[str]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + gold continuation, number of answer tokens at the end), tokenised as scoring does."""
    examples = []
    for task in tasks:
        for item in (item for data in DATASETS for item in load_task(task, data).items):
            context_ids, answer_ids = encode_pair(tokenizer, item.context, item.choices[item.gold])
            examples.append((context_ids + answer_ids, len(answer_ids)))
    return examples


def _batches(examples: list[tuple[list[int], int]], rng: random.Random) -> list[list[tuple[list[int], int]]]:
    """Length-sorted batches (little padding) in shuffled order."""
    ordered = sorted(examples, key=lambda example: len(example[0]))
    batches = [ordered[start : start + BATCH_SIZE] for start in range(0, len(ordered), BATCH_SIZE)]
    rng.shuffle(batches)
    return batches


def _train(model: Any, examples: list[tuple[list[int], int]], steps: int, seed: int, pad_id: int) -> float:
    """AdamW on the answer tokens (right-padded batches); returns the last epoch's mean loss."""
    torch = require("torch", "fine-tuning the learned fixture")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1)
    model.train()
    losses: list[float] = []
    batches: list[list[tuple[list[int], int]]] = []
    with console.progress() as bar:
        task = bar.add_task(f"fine-tuning {LEARNED_NAME}", total=steps)
        for _ in range(steps):
            if not batches:
                batches, losses = _batches(examples, rng), []
            batch = batches.pop()
            longest = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), longest), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, (ids, answer_tokens) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                labels[row, len(ids) - answer_tokens : len(ids)] = torch.tensor(ids[len(ids) - answer_tokens :])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.advance(task)
    model.eval()
    return sum(losses) / len(losses)


def _accuracies(checkpoint: Path, tasks: Sequence[str], data: str) -> dict[str, dict[str, float]]:
    """acc / acc_norm per task on one shipped set, scored like validation does: PyTorch on the saved bf16 weights."""
    from mexport.runtime.torch_runtime import TorchDecoder
    from mexport.validate.backends import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    results = {}
    with TorchDecoder(checkpoint) as runtime:
        for task in tasks:
            scores = score_items(runtime, tokenizer, load_task(task, data).items, progress=False)
            results[task] = {
                "n": len(scores),
                "acc": sum(score.acc for score in scores) / len(scores),
                "acc_norm": sum(score.acc_norm for score in scores) / len(scores),
                "chance": TASKS[task].chance,
            }
    return results


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """A 64-wide model gains nothing from intra-op threads, and on a busy machine they stall it (10x measured)."""
    torch = require("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build(target: Path, tasks: Sequence[str], seed: int, steps: int) -> None:
    """Fine-tune the base fixture and write the bf16 checkpoint plus its note into ``target`` (a staging dir)."""
    torch = require("torch", "fine-tuning the learned fixture")
    transformers = require("transformers")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mexport-learned-") as scratch:
        base = tiny_gemma2.make_fixture(Path(scratch) / BASE_FIXTURE, name=BASE_FIXTURE, seed=seed)
        tokenizer = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
        base_note = json.loads((base / "fixture.json").read_text())
    training_started = time.perf_counter()
    final_loss = _train(model, _training_examples(tokenizer, tasks), steps, seed, tokenizer.pad_token_id)
    train_seconds = time.perf_counter() - training_started
    model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "fixture.json").write_text(
        strict_json.dumps({**base_note, "fixture": LEARNED_NAME, "base": BASE_FIXTURE}, indent=2, sort_keys=True) + "\n"
    )
    note = {
        "fixture": LEARNED_NAME,
        "tasks": list(tasks),
        "seed": seed,
        "steps": steps,
        "final_loss": round(final_loss, 5),
        "train_seconds": round(train_seconds, 1),
        "accuracy_bf16": _accuracies(target, tasks, "sample"),
        "accuracy_bf16_demo": _accuracies(target, tasks, "demo"),
    }
    note["build_seconds"] = round(time.perf_counter() - started, 1)
    (target / NOTE_FILE).write_text(strict_json.dumps(note, indent=2, sort_keys=True) + "\n")


def make_learned_fixture(
    out_dir: Path | str,
    name: str = LEARNED_NAME,
    seed: int = 0,
    overwrite: bool = False,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    steps: int = DEFAULT_STEPS,
) -> Path:
    """Write the learned tiny Gemma2 checkpoint to ``out_dir`` (same signature head as ``make_fixture``).

    Trained once per (sample data, seed, steps, code) and cached under :func:`cache_root`; ``learned.json`` in the
    output holds the training time and per-task accuracies of the saved bf16 weights.
    """
    if name != LEARNED_NAME:
        raise MexportError(f"unknown learned fixture {name!r}; available: {LEARNED_NAME}")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise MexportError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; valid tasks: {', '.join(TASKS)}")
    if steps < 1:
        raise MexportError(f"steps must be >= 1, got {steps}")
    cached = cache_root() / f"{LEARNED_NAME}-{_cache_key(tasks, seed, steps)}"
    if not (cached / NOTE_FILE).is_file():
        with output_lock(cached, wait=True):  # another process may be training it: wait and use its result
            if not (cached / NOTE_FILE).is_file():
                with staged_output_dir(cached, overwrite=True) as staging, _one_torch_thread():
                    _build(staging, tuple(tasks), seed, steps)
    with staged_output_dir(Path(out_dir), overwrite=overwrite) as staging:
        shutil.copytree(cached, staging, dirs_exist_ok=True)
    return Path(out_dir)


def learned_note(checkpoint: Path | str) -> dict[str, Any]:
    """The ``learned.json`` note of a learned-fixture checkpoint."""
    path = Path(checkpoint) / NOTE_FILE
    if not path.is_file():
        raise MexportError(f"{checkpoint}: no {NOTE_FILE} (not a {LEARNED_NAME} checkpoint)")
    return json.loads(path.read_text())
