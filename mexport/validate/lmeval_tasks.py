"""Any lm-eval ``multiple_choice`` task as validation items, built by lm-eval itself from its task definition.

lm-eval builds the requests (``Task.build_all_requests``: ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``,
the task's target and few-shot delimiters, its few-shot sampler seeded with ``seed``); each document's instances
become one :class:`~mexport.validate.tasks.MCQItem` (the shared context, each continuation as lm-eval sends it), so
the parity report scores exactly the prompts ``lm_eval`` scores. Gold follows lm-eval's ``process_results``: an
index, or a choice text looked up in the choices; a list of golds (several right answers) keeps the first.
``limit`` draws the same seeded subset as the built-in tasks. Needs the ``lmeval`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mexport.errors import MexportError, first_line
from mexport.lazy import require


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
        raise MexportError(f"lm-eval task {name!r} is {task.OUTPUT_TYPE}; validation compares multiple_choice tasks")
    return task


def _gold_index(task: Any, doc: Any, choices: list[str]) -> int:
    gold = task.doc_to_target(doc)
    if isinstance(gold, list):
        gold = gold[0]
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else int(gold)
    return int(gold)


def load_lmeval_task(
    name: str, include_path: Path | str | None = None, *, limit: int | None = None, seed: int = 1234, shots: int = 0
) -> Any:
    """lm-eval task ``name`` as :class:`~mexport.validate.tasks.TaskData` (``shots`` examples per prompt)."""
    from mexport.validate.tasks import MCQItem, TaskData, _sample_indices

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
                context=instances[0].arguments[0],
                choices=tuple(instance.arguments[1] for instance in sorted(instances, key=lambda i: i.idx)),
                gold=_gold_index(task, doc, choices),
            )
        )
    return TaskData(
        task=name,
        items=[items[index] for index in _sample_indices(len(items), limit, seed)],
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
