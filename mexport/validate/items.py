"""What every task source (built-in datasets, lm-eval tasks) hands the scorer: items, and the account of a load.

Its own module so the task sources depend on it and not on each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mexport.errors import MexportError

TARGET_DELIMITER = " "  # lm-eval: continuation = delimiter + choice


@dataclass(frozen=True)
class MCQItem:
    """One scored question: the full prompt, each choice as a continuation (with the delimiter), the gold index."""

    task: str
    doc_id: str
    context: str
    choices: tuple[str, ...]
    gold: int

    @property
    def choice_texts(self) -> tuple[str, ...]:
        """The choices without the target delimiter (what lm-eval's acc_norm divides by, in characters)."""
        return tuple(choice.removeprefix(TARGET_DELIMITER) for choice in self.choices)


@dataclass
class TaskData:
    """The usable questions of one task plus an account of what was dropped and where it came from."""

    task: str
    items: list[MCQItem]
    skipped: int
    skip_reasons: dict[str, int]
    source: str
    source_sha256: str | None
    total_rows: int
    schema: str = ""
    shots: int = 0
    limit: int | None = None
    seed: int = 1234
    rules: str = ""  # how rows become questions where the dataset's authors say so (e.g. AfriMedQA)


def sample_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices drawn with ``seed``, in original order (all of them without a limit)."""
    if limit is not None and limit < 1:
        raise MexportError(f"limit must be at least 1, got {limit}", hint="pass --limit N with N >= 1, or no limit")
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized as Unicode (a lone surrogate, as JSON's ``"\\ud800"`` decodes to), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} (not valid Unicode)"
    return None
