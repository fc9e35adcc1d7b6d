"""Any lm-eval ``multiple_choice`` task as validation items, built by lm-eval itself from its task definition.

lm-eval builds the requests (``Task.build_all_requests``: ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``,
the task's target and few-shot delimiters, its few-shot sampler seeded with ``seed``); each document's instances
become one :class:`~mexport.validate.items.MCQItem` (the shared context, each continuation as lm-eval sends it), so
the parity report scores exactly the prompts ``lm_eval`` scores. Gold follows lm-eval's ``process_results``: an
index, or a choice text looked up in the choices; a list of golds (several right answers) keeps the first.
``limit`` draws the same seeded subset as the built-in tasks. Needs the ``lmeval`` extra.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mexport.errors import MexportError, first_line
from mexport.lazy import require
from mexport.validate.items import MCQItem, TaskData, sample_indices, text_problem


def task_manager(include_path: Path | str | None) -> Any:
    """lm-eval's task index, with the task YAMLs under ``include_path`` added."""
    tasks = require("lm_eval.tasks", "lm-eval task names in validation")
    return tasks.TaskManager(include_path=str(include_path) if include_path else None)


def is_lmeval_task(name: str, include_path: Path | str | None = None) -> bool:
    """Whether lm-eval (with ``include_path``'s YAMLs) defines a task or group called ``name``."""
    return bool(task_manager(include_path).match_tasks([name]))


def _single_task(name: str, include_path: Path | str | None) -> Any:
    manager = task_manager(include_path)
    if name not in manager.all_subtasks:  # a group or a tag: its tasks have their own names
        raise MexportError(
            f"lm-eval name {name!r} is a group, not a task",
            hint="pass its tasks one by one (`lm_eval ls groups` lists what it contains)",
        )
    try:
        task = manager.load([name])["tasks"][name]
    except Exception as exc:  # the dataset download (network, gated, offline cache) or the task's own code
        reason = first_line(exc)
        raise MexportError(
            f"lm-eval could not load task {name!r}: {reason}",
            hint="its dataset comes from the Hugging Face hub: check network access and the hub token, or run "
            "once online to fill the datasets cache (HF_DATASETS_OFFLINE=1 then reuses it)",
        ) from exc
    if task.OUTPUT_TYPE != "multiple_choice":
        raise MexportError(
            f"lm-eval task {name!r} is {task.OUTPUT_TYPE}; validation compares multiple_choice tasks",
            hint="pick a multiple_choice task (`lm_eval ls tasks`); run generative ones with `mexport lm-eval`",
        )
    return task


def _gold_index(name: str, doc_id: int, task: Any, doc: Any, choices: list[str]) -> int:
    """lm-eval's gold: an index, or a choice text; a list keeps its first. Anything else is refused, naming the doc."""
    gold = task.doc_to_target(doc)
    if isinstance(gold, list) and gold:
        gold = gold[0]
    if isinstance(gold, str) and gold in choices:
        return choices.index(gold)
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold.strip())
    if isinstance(gold, float) and math.isfinite(gold) and gold.is_integer():
        gold = int(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise MexportError(
            f"lm-eval task {name!r} doc {doc_id}: gold {gold!r} is not a choice nor an index in 0..{len(choices) - 1}",
            hint="fix the task's doc_to_target (or its data) so every document names one of its choices",
        )
    return gold


def _checked_text(name: str, doc_id: int, text: str) -> str:
    problem = text_problem(text)
    if problem:
        raise MexportError(
            f"lm-eval task {name!r} doc {doc_id}: the prompt {problem}",
            hint="fix the task's data: prompts must be valid Unicode text",
        )
    return text


def load_lmeval_task(
    name: str, include_path: Path | str | None = None, *, limit: int | None = None, seed: int = 1234, shots: int = 0
) -> TaskData:
    """lm-eval task ``name`` as :class:`~mexport.validate.items.TaskData` (``shots`` examples per prompt)."""
    task = _single_task(name, include_path)
    if shots:
        task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=seed)
    task.build_all_requests()
    by_doc: dict[int, list[Any]] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    docs = list(task.eval_docs)
    items = []
    for doc_id, instances in sorted(by_doc.items()):
        doc = docs[doc_id]
        choices = task.doc_to_choice(doc)
        items.append(
            MCQItem(
                task=name,
                doc_id=str(doc_id),
                context=_checked_text(name, doc_id, instances[0].arguments[0]),
                choices=tuple(
                    _checked_text(name, doc_id, instance.arguments[1])
                    for instance in sorted(instances, key=lambda i: i.idx)
                ),
                gold=_gold_index(name, doc_id, task, doc, choices),
            )
        )
    return TaskData(
        task=name,
        items=[items[index] for index in sample_indices(len(items), limit, seed)],
        skipped=0,
        skip_reasons={},
        source=f"lm-eval:{name}",
        source_sha256=None,
        total_rows=len(docs),
        schema="lm-eval",
        shots=shots,
        limit=limit,
        seed=seed,
    )
