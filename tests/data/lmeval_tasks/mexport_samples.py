"""Datasets of the local lm-eval test tasks: mexport's shipped MCQ samples as (context, choices, gold) rows."""

import datasets

from mexport.validate.tasks import load_task


def _rows(task: str, **kwargs) -> datasets.DatasetDict:
    items = load_task(task, "sample").items
    rows = [
        {"doc_id": item.doc_id, "context": item.context, "choices": list(item.choice_texts), "gold": item.gold}
        for item in items
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def medmcqa(**kwargs) -> datasets.DatasetDict:
    return _rows("medmcqa")


def afrimedqa(**kwargs) -> datasets.DatasetDict:
    return _rows("afrimedqa")
