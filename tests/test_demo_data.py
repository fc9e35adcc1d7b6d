"""The shipped demo question sets: reproducible from the fact table, valid in each dataset's schema, big enough."""

from __future__ import annotations

from collections import Counter

import pytest

from mexport.validate.demo import FACTS, GENERATORS, render_demo
from mexport.validate.stats import resolvable_difference
from mexport.validate.tasks import TASKS, load_task


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_shipped_demo_file_is_what_the_generator_writes(task: str) -> None:
    assert TASKS[task].demo_path.read_text(encoding="utf-8") == render_demo(task)


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_every_demo_row_is_a_usable_question(task: str) -> None:
    data = load_task(task, "demo")
    assert len(data.items) == data.total_rows == 4 * len(FACTS) == 200
    assert data.skipped == 0
    # enough questions to resolve a 5-point margin with room for a few flips
    assert 100 * resolvable_difference(len(data.items)) < 2.0
    golds = Counter(item.gold for item in data.items)
    assert len(golds) == len(data.items[0].choices)  # every answer position is used
    for item in data.items:
        texts = item.choice_texts
        assert len(set(texts)) == len(texts), item.doc_id  # distractors never repeat the answer
    assert len({item.doc_id for item in data.items}) == len(data.items)
