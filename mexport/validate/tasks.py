"""Medical multiple-choice tasks, turned into lm-eval style (context, continuations, gold) items.

Prompts, choices and few-shot layout follow lm-evaluation-harness 0.4.x (``medmcqa``, ``medqa_4options``,
``pubmedqa``; AfriMedQA with the proposed zero-shot prompt) so our accuracies are comparable with published
tables. Each task reads its dataset's own schema from the Hugging Face hub, a local file, or the small shipped
sample; rows that cannot form a valid question (missing option, label out of range, not an MCQ) are skipped and
counted by reason, never fatal. A file whose rows lack the schema's fields altogether is the wrong dataset and is
refused.

Data splits (what we score vs what lm-eval scores):
- medmcqa: ``openlifescienceai/medmcqa`` validation (4183), as lm-eval (test labels are hidden).
- medqa: ``GBaker/MedQA-USMLE-4-options-hf`` test (1273), as lm-eval ``medqa_4options``. Local files may also use
  the non-hf ``GBaker/MedQA-USMLE-4-options`` schema (question, options{A..D}, answer_idx); detected per file.
- pubmedqa: ``qiaojin/PubMedQA`` pqa_labeled train = all 1000 labelled questions. lm-eval's current task scores
  the 500-question test fold of BigBio's script dataset (which no longer loads with datasets>=4), older lm-eval
  scored these same 1000: accuracies are comparable in kind, not digit for digit.
- afrimedqa: ``intronhealth/afrimedqa_v2`` (gated) expert-tier MCQs, as its authors score them (no lm-eval task):
  an "n/a" fifth option is dropped (a 4-way question), a multi-answer row is scored with its first answer (lm-eval
  PR #3890 would accept any listed one), ``question_clean`` is used when present.

Few-shot (``shots`` > 0): lm-eval draws examples from the task's train split. Here they come from the same set
as the scored questions (all usable rows, before ``limit``), never the scored question itself, chosen
deterministically from ``seed`` and the question's id, so a question gets the same prefix however many others are
scored with it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport.errors import MexportError, first_line
from mexport.lazy import require
from mexport.manifest import sha256_file

TARGET_DELIMITER = " "  # lm-eval: continuation = delimiter + choice
FEWSHOT_DELIMITER = "\n\n"  # lm-eval: between few-shot examples and before the question
SAMPLE_DIR = Path(__file__).with_name("data")
LETTERS = ("A", "B", "C", "D")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# names of the question sets shipped in SAMPLE_DIR (``--data TASK=sample`` / ``TASK=demo``), not file paths
SHIPPED_SETS = ("sample", "demo")


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


class RowSkipped(Exception):
    """Raised by a row converter: this row cannot be a valid question (``reason`` is counted, not shown per row)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Question:
    """A row turned into a prompt, choice texts (no delimiter) and gold index, before any few-shot prefix."""

    doc_id: str
    prompt: str
    choice_texts: tuple[str, ...]
    gold: int


RowConverter = Callable[[Mapping[str, Any]], tuple[str, tuple[str, ...], int]]


@dataclass(frozen=True)
class RowSchema:
    """One dataset layout: the fields every row must have and how a row becomes (prompt, choices, gold)."""

    name: str
    required_fields: tuple[str, ...]
    convert: RowConverter
    id_field: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task: where its data lives on the hub, the schema(s) a file may use, and lm-eval's prompt for it."""

    name: str
    hub_id: str
    hub_split: str
    schemas: tuple[RowSchema, ...]
    chance: float
    hub_config: str | None = None
    lm_eval_task: str | None = None
    notes: str = ""
    gated: bool = False  # the hub dataset needs an accepted licence and an authenticated token

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Fields of the hub schema (the first one)."""
        return self.schemas[0].required_fields

    @property
    def sample_path(self) -> Path:
        """The shipped sample, in the dataset's own schema (``--data TASK=sample``)."""
        return SAMPLE_DIR / f"{self.name}_sample.jsonl"

    @property
    def demo_path(self) -> Path:
        """200 templated questions over one fact table (``--data TASK=demo``), see :mod:`mexport.validate.demo`."""
        return SAMPLE_DIR / f"{self.name}_demo.jsonl"


# ---- row helpers --------------------------------------------------------------------------------------------


def _text(row: Mapping[str, Any], key: str, reason: str) -> str:
    """A non-empty string field, else skip the row with ``reason``."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowSkipped(reason)
    return str(value)


def _index(value: Any, count: int) -> int:
    """A gold index in [0, count), accepting ints and integral strings."""
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise RowSkipped("label out of range") from None
    if isinstance(value, float) and value != index:
        raise RowSkipped("label out of range")
    if not 0 <= index < count:
        raise RowSkipped("label out of range")
    return index


def _letter_prompt(question: str, options: Iterable[str], header: str = "") -> str:
    """lm-eval's lettered MCQ prompt: ``Question: q\\n{header}A. o1\\n...D. o4\\nAnswer:``."""
    lines = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options, strict=True))
    return f"Question: {question}\n{header}{lines}Answer:"


# ---- converters, one per schema (lm-eval's doc_to_text / doc_to_choice / doc_to_target) ---------------------


def _medmcqa(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    question = _text(row, "question", "missing question")
    options = [_text(row, key, "missing option") for key in ("opa", "opb", "opc", "opd")]
    gold = _index(row.get("cop"), len(LETTERS))
    return _letter_prompt(question, options, header="Choices:\n"), LETTERS, gold


def _medqa_hf(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    question = _text(row, "sent1", "missing question")
    options = [_text(row, f"ending{i}", "missing option") for i in range(len(LETTERS))]
    gold = _index(row.get("label"), len(LETTERS))
    return _letter_prompt(question, options), LETTERS, gold


def _medqa_options(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    """GBaker/MedQA-USMLE-4-options: same prompt as the -hf variant, options given as a letter-keyed dict."""
    question = _text(row, "question", "missing question")
    options_field = row.get("options")
    if not isinstance(options_field, Mapping):
        raise RowSkipped("missing option")
    options = [_text(options_field, letter, "missing option") for letter in LETTERS]
    answer = str(row.get("answer_idx") or "").strip().upper()
    if answer not in LETTERS:
        raise RowSkipped("label out of range")
    return _letter_prompt(question, options), LETTERS, LETTERS.index(answer)


PUBMEDQA_CHOICES = ("yes", "no", "maybe")


def _pubmedqa(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    question = _text(row, "question", "missing question")
    context = row.get("context")
    contexts = context.get("contexts") if isinstance(context, Mapping) else None
    if not contexts or not any(str(part).strip() for part in contexts):
        raise RowSkipped("missing abstract")
    decision = str(row.get("final_decision") or "").strip().lower()
    if decision not in PUBMEDQA_CHOICES:
        raise RowSkipped("label out of range")
    abstract = "\n".join(str(part) for part in contexts)
    return f"Abstract: {abstract}\nQuestion: {question}\nAnswer:", PUBMEDQA_CHOICES, PUBMEDQA_CHOICES.index(decision)


AFRIMEDQA_OPTIONS = 5
AFRIMEDQA_PLACEHOLDER = "n/a"  # a fifth option the authors drop (any case): those questions are 4-way


def _afrimedqa(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    """The AfriMed-QA authors' rules (intron-innovation/AfriMed-QA ``src/utils/prepare_data.py``): an "n/a" fifth
    option is dropped, a multi-answer row (``option1,option3``) is scored with its first answer, and the question
    is ``question_clean`` when present (``question`` carries trailing blank lines)."""
    if str(row.get("question_type") or "").strip().lower() != "mcq":
        raise RowSkipped("not mcq")
    if str(row.get("tier") or "").strip().lower() != "expert":
        raise RowSkipped("not expert tier")
    question = str(row.get("question_clean") or "").strip() or _text(row, "question", "missing question").rstrip()
    raw_options = row.get("answer_options")
    try:
        options_field = json.loads(raw_options) if isinstance(raw_options, str) else raw_options
    except json.JSONDecodeError:
        raise RowSkipped("missing option") from None
    if not isinstance(options_field, Mapping):
        raise RowSkipped("missing option")
    keys = [f"option{i}" for i in range(1, AFRIMEDQA_OPTIONS + 1)]
    if str(options_field.get(keys[-1]) or "").strip().lower() == AFRIMEDQA_PLACEHOLDER:
        keys = keys[:-1]
    options = tuple(_text(options_field, key, "missing option") for key in keys)
    answers = [part.strip() for part in str(row.get("correct_answer") or "").split(",") if part.strip()]
    if not answers or answers[0] not in keys:
        raise RowSkipped("label out of range")
    return f"Question: {question}\nAnswer:", options, keys.index(answers[0])


TASKS: dict[str, TaskSpec] = {
    "medmcqa": TaskSpec(
        name="medmcqa",
        hub_id="openlifescienceai/medmcqa",
        hub_split="validation",
        schemas=(RowSchema("medmcqa", ("question", "opa", "opb", "opc", "opd", "cop"), _medmcqa, "id"),),
        chance=1 / 4,
        lm_eval_task="medmcqa",
    ),
    "medqa": TaskSpec(
        name="medqa",
        hub_id="GBaker/MedQA-USMLE-4-options-hf",
        hub_split="test",
        schemas=(
            RowSchema("medqa-hf", ("sent1", "ending0", "ending1", "ending2", "ending3", "label"), _medqa_hf, "id"),
            RowSchema("medqa-4-options", ("question", "options", "answer_idx"), _medqa_options, "id"),
        ),
        chance=1 / 4,
        lm_eval_task="medqa_4options",
    ),
    "pubmedqa": TaskSpec(
        name="pubmedqa",
        hub_id="qiaojin/PubMedQA",
        hub_config="pqa_labeled",
        hub_split="train",
        schemas=(RowSchema("pubmedqa", ("question", "context", "final_decision"), _pubmedqa, "pubid"),),
        chance=1 / 3,
        lm_eval_task="pubmedqa",
        notes="all 1000 labelled questions; lm-eval's current task scores a 500-question test fold",
    ),
    "afrimedqa": TaskSpec(
        name="afrimedqa",
        hub_id="intronhealth/afrimedqa_v2",
        hub_split="train",
        schemas=(
            RowSchema(
                "afrimedqa",
                ("question_type", "tier", "question", "answer_options", "correct_answer"),
                _afrimedqa,
                "sample_id",
            ),
        ),
        chance=1 / 5,
        notes="expert-tier MCQs scored as the authors do: an 'n/a' fifth option dropped, a multi-answer row scored "
        "with its first answer, question_clean preferred; choices are the option texts, so acc_norm differs from acc",
        gated=True,
    ),
}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``, or an error listing the valid names."""
    if name not in TASKS:
        raise MexportError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def check_task(name: str, include_path: str | Path | None = None) -> None:
    """``name`` is a built-in task or, with lm-eval installed, an lm-eval task (``include_path``: extra YAMLs)."""
    if name in TASKS:
        return
    from mexport.lazy import is_available

    if not is_available("lm_eval"):
        raise MexportError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}",
            hint="lm-eval task names need lm-eval: pip install 'mexport[lmeval]'",
        )
    from mexport.validate.lmeval_tasks import is_lmeval_task

    if not is_lmeval_task(name, include_path):
        raise MexportError(
            f"unknown task {name!r}: neither built in ({', '.join(TASKS)}) nor an lm-eval task",
            hint="`lm_eval ls tasks` lists lm-eval's; local task YAMLs need --include-path DIR",
        )


# ---- reading rows --------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[Any]:
    """Rows of a local .jsonl / .json / .parquet file (unparseable .jsonl lines become None: skipped later)."""
    if not path.is_file():
        raise MexportError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: list[Any] = []
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
        return rows
    if suffix == ".json":
        try:
            payload = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise MexportError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(payload, Mapping) and isinstance(payload.get("data"), list):
            payload = payload["data"]
        if not isinstance(payload, list):
            raise MexportError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        return payload
    if suffix == ".parquet":
        parquet = require("pyarrow.parquet", "reading parquet task data")
        return list(parquet.read_table(path).to_pylist())
    raise MexportError(f"{path}: unsupported data file type {suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")


def _read_hub_rows(spec: TaskSpec) -> list[Any]:
    datasets = require("datasets", "downloading benchmark data from the Hugging Face hub")
    try:
        dataset = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as exc:  # network, auth, missing-config errors all mean "not available here"
        reason = first_line(exc)
        raise MexportError(
            f"could not load {spec.name} from the Hugging Face hub ({_hub_source(spec)}): {reason}",
            hint=(
                f"{spec.hub_id} is gated: accept its terms on huggingface.co and log in (huggingface-cli login, or "
                "set HF_TOKEN); or "
                if spec.gated
                else ""
            )
            + f"pass a local copy with --data {spec.name}=FILE (.jsonl/.json/.parquet in the dataset's schema), "
            f"or --data {spec.name}=sample for the shipped sample",
        ) from exc
    return list(dataset)


def _hub_source(spec: TaskSpec) -> str:
    config = f"/{spec.hub_config}" if spec.hub_config else ""
    return f"hf:{spec.hub_id}{config}:{spec.hub_split}"


def _detect_schema(spec: TaskSpec, rows: list[Any], source_name: str) -> RowSchema:
    """The schema whose required fields all occur in the file; otherwise it is the wrong dataset."""
    present: set[str] = set()
    for row in rows:
        if isinstance(row, Mapping):
            present.update(row)
    missing_by_schema = [
        (schema, [name for name in schema.required_fields if name not in present]) for schema in spec.schemas
    ]
    for schema, missing in missing_by_schema:
        if not missing:
            return schema
    _, missing = min(missing_by_schema, key=lambda pair: len(pair[1]))
    if not present:
        raise MexportError(f"{source_name}: no rows found: is this a {spec.name} file?")
    raise MexportError(
        f"{source_name}: rows lack fields {', '.join(missing)}: is this a {spec.name} file?",
        hint=f"{spec.name} expects the schema of {spec.hub_id}"
        + (f" or {', '.join(s.name for s in spec.schemas[1:])}" if len(spec.schemas) > 1 else ""),
    )


def _convert_rows(schema: RowSchema, rows: list[Any]) -> tuple[list[Question], Counter[str]]:
    questions: list[Question] = []
    reasons: Counter[str] = Counter()
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            reasons["unparseable row"] += 1
            continue
        try:
            prompt, choice_texts, gold = schema.convert(row)
        except RowSkipped as skipped:
            reasons[skipped.reason] += 1
            continue
        raw_id = row.get(schema.id_field) if schema.id_field else None
        doc_id = str(raw_id) if raw_id not in (None, "") else f"row-{index}"
        if doc_id in seen_ids:  # ids pair questions across runs, so they must be unique
            doc_id = f"{doc_id}#{index}"
        seen_ids.add(doc_id)
        questions.append(Question(doc_id, prompt, tuple(choice_texts), gold))
    return questions, reasons


def data_file(name: str, data: str | Path) -> Path:
    """The file ``--data name=DATA`` reads: a shipped set's (``sample``, ``demo``) or the path given."""
    spec = get_task(name)
    shipped = dict(zip(SHIPPED_SETS, (spec.sample_path, spec.demo_path), strict=True))
    return shipped.get(str(data)) or Path(data).expanduser()


def _resolve_source(spec: TaskSpec, data: str | Path | None) -> tuple[list[Any], str, str | None]:
    """(rows, source description, sha256 of the file or None for the hub)."""
    if data is None:
        return _read_hub_rows(spec), _hub_source(spec), None
    path = data_file(spec.name, data)
    return _read_rows(path), str(path), sha256_file(path)


# ---- public API ----------------------------------------------------------------------------------------------


def _fewshot_prefix(question: Question, pool: list[Question], shots: int, seed: int) -> str:
    """lm-eval's few-shot layout: K solved examples (prompt + delimiter + gold choice), each followed by \\n\\n."""
    others = [candidate for candidate in pool if candidate.doc_id != question.doc_id]
    # seeded by (seed, question id) so the prefix does not depend on which other questions are scored
    rng = random.Random(hashlib.sha256(f"{seed}:{question.doc_id}".encode()).hexdigest())
    examples = rng.sample(others, shots)
    return "".join(f"{ex.prompt}{TARGET_DELIMITER}{ex.choice_texts[ex.gold]}{FEWSHOT_DELIMITER}" for ex in examples)


def _sample_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices drawn with ``seed``, in original order (all of them without a limit)."""
    if limit is not None and limit < 1:
        raise MexportError(f"limit must be at least 1, got {limit}")
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def load_task(
    name: str,
    data: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 1234,
    shots: int = 0,
    include_path: str | Path | None = None,
) -> TaskData:
    """Load task ``name`` as scored items.

    ``data``: a local .jsonl/.json/.parquet file in the dataset's own schema, "sample" for the shipped sample, or
    None for the Hugging Face hub (needs network). ``limit`` scores a seeded random subset (kept in file order);
    ``shots`` prepends that many solved examples from the same set (never the question itself). A name that is not
    built in is an lm-eval task (:mod:`mexport.validate.lmeval_tasks`; ``include_path``: extra task YAMLs), whose
    data and prompts come from its definition.
    """
    if name not in TASKS:
        check_task(name, include_path)
        if data is not None:
            raise MexportError(f"--data {name}=...: lm-eval task {name!r} reads the data its definition names")
        from mexport.validate.lmeval_tasks import load_lmeval_task

        return load_lmeval_task(name, include_path, limit=limit, seed=seed, shots=shots)
    spec = get_task(name)
    if shots < 0:
        raise MexportError(f"shots must be >= 0, got {shots}")
    rows, source, source_sha256 = _resolve_source(spec, data)
    schema = _detect_schema(spec, rows, Path(source).name if data is not None else source)
    questions, reasons = _convert_rows(schema, rows)
    if shots and len(questions) <= shots:
        raise MexportError(
            f"{name}: {shots}-shot prompts need more than {shots} usable questions, the data has {len(questions)}"
        )
    selected = [questions[i] for i in _sample_indices(len(questions), limit, seed)]
    items = [
        MCQItem(
            task=name,
            doc_id=question.doc_id,
            context=(_fewshot_prefix(question, questions, shots, seed) if shots else "") + question.prompt,
            choices=tuple(TARGET_DELIMITER + choice for choice in question.choice_texts),
            gold=question.gold,
        )
        for question in selected
    ]
    return TaskData(
        task=name,
        items=items,
        skipped=sum(reasons.values()),
        skip_reasons=dict(sorted(reasons.items())),
        source=source,
        source_sha256=source_sha256,
        total_rows=len(rows),
        schema=schema.name,
        shots=shots,
        limit=limit,
        seed=seed,
        rules=spec.notes,
    )


def calibration_texts(
    name: str, data: str | Path | None = None, limit: int | None = None, seed: int = 1234
) -> list[str]:
    """Prompts with their correct answer appended: in-distribution text for quantization calibration."""
    task = load_task(name, data, limit=limit, seed=seed)
    return [item.context + item.choices[item.gold] for item in task.items]
