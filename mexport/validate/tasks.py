"""Medical multiple-choice tasks, turned into lm-eval style (context, continuations, gold) items.

Prompts, choices and few-shot layout follow lm-evaluation-harness 0.4.x (``medmcqa``, ``medqa_4options``,
``pubmedqa``; AfriMedQA with the proposed zero-shot prompt) so our accuracies are comparable with published
tables. Each task reads its dataset's own schema from the Hugging Face hub, a local file, or the small shipped
sample, and checks every field it reads against that schema: a missing, wrongly typed or non-finite field, an
out-of-range label, a lone surrogate or an unparseable row is refused with one line naming the file, the row and
the field (exit 2), never guessed at. Rows the dataset's own rules leave out (AfriMedQA's non-MCQ or non-expert
rows, a blank text field) are skipped and counted by reason. A file whose rows lack the schema's fields
altogether is the wrong dataset and is refused. MedQA files may mix its two layouts row by row, and may carry
more than four options (lettered A, B, C, ...: scored N-way, as the row says).

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
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport.errors import EnvironmentFailure, MexportError, first_line
from mexport.hub import unreachable_reason
from mexport.lazy import is_available, require
from mexport.manifest import sha256_file
from mexport.validate.items import TARGET_DELIMITER, MCQItem, TaskData, sample_indices, text_problem
from mexport.validate.lmeval_tasks import is_lmeval_task, load_lmeval_task

FEWSHOT_DELIMITER = "\n\n"  # lm-eval: between few-shot examples and before the question
SAMPLE_DIR = Path(__file__).with_name("data")
LETTERS = tuple("ABCDEFGHIJ")  # option letters, as many as a row has options
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# names of the question sets shipped in SAMPLE_DIR (``--data TASK=sample`` / ``TASK=demo``), not file paths
SHIPPED_SETS = ("sample", "demo")
SCHEMA_HINT = "fix or drop that row; each task's fields are described in mexport/validate/tasks.py (lm-eval's schema)"


class RowSkipped(Exception):
    """Raised by a row converter: the dataset's own rules leave this row out (``reason`` is counted, not shown)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RowInvalid(Exception):
    """Raised by a row converter: ``field`` does not hold what the schema says (``problem`` says what it holds)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


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


# ---- typed field readers: the schema's type, or RowInvalid naming the field ----------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _text(row: Mapping[str, Any], key: str, field: str | None = None) -> str:
    """A string field; a blank one skips the row (counted as "blank KEY"), anything else not a string is refused."""
    field = field or key
    if key not in row:
        raise RowInvalid(field, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise RowInvalid(field, f"expected text, got {_describe(value)}")
    problem = text_problem(value)
    if problem:
        raise RowInvalid(field, problem)
    if not value.strip():
        raise RowSkipped(f"blank {key}")
    return value


def _index(row: Mapping[str, Any], key: str, count: int) -> int:
    """An integer label in [0, count): an int, an integral finite float or a string of digits."""
    if key not in row:
        raise RowInvalid(key, "missing")
    value = row[key]
    index: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        index = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    if index is None:
        raise RowInvalid(key, f"expected an integer label, got {_describe(value)}")
    if not 0 <= index < count:
        raise RowInvalid(key, f"label {index} is not in 0..{count - 1} (the row has {count} options)")
    return index


def _category(row: Mapping[str, Any], key: str) -> str:
    """A filter field, lower-cased ("" when null or absent: the row is simply not in the category)."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowInvalid(key, f"expected text, got {_describe(value)}")
    return value.strip().lower()


def _mapping(row: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = row.get(key)
    if not isinstance(value, Mapping):
        raise RowInvalid(key, "missing" if key not in row else f"expected an object, got {_describe(value)}")
    return value


def _numbered(row: Mapping[str, Any], name: Callable[[int], str], minimum: int) -> list[str]:
    """Options named by consecutive numbers (``name(0)``, ``name(1)``, ...): at least ``minimum``, all present."""
    count = 0
    while name(count) in row:
        count += 1
    if count < minimum:
        raise RowInvalid(name(count), "missing")
    if count > len(LETTERS):
        raise RowInvalid(name(count - 1), f"{count} options; at most {len(LETTERS)} are lettered")
    return [_text(row, name(i)) for i in range(count)]


def _letter_prompt(question: str, options: Iterable[str], header: str = "") -> str:
    """lm-eval's lettered MCQ prompt: ``Question: q\\n{header}A. o1\\n...D. o4\\nAnswer:``."""
    options = list(options)
    lines = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options, strict=False))
    return f"Question: {question}\n{header}{lines}Answer:"


# ---- converters, one per schema (lm-eval's doc_to_text / doc_to_choice / doc_to_target) ---------------------


MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")


def _medmcqa(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    question = _text(row, "question")
    options = [_text(row, key) for key in MEDMCQA_OPTIONS]
    gold = _index(row, "cop", len(MEDMCQA_OPTIONS))
    return _letter_prompt(question, options, header="Choices:\n"), LETTERS[: len(options)], gold


MEDQA_MIN_OPTIONS = 4  # the USMLE sets have 4 (GBaker) or 5 (the original MedQA) options


def _medqa_hf(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    """GBaker/MedQA-USMLE-4-options-hf: ``ending0..endingN`` (4 in that dataset; more are scored N-way)."""
    question = _text(row, "sent1")
    options = _numbered(row, lambda i: f"ending{i}", MEDQA_MIN_OPTIONS)
    gold = _index(row, "label", len(options))
    return _letter_prompt(question, options), LETTERS[: len(options)], gold


def _medqa_options(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    """GBaker/MedQA-USMLE-4-options: same prompt as the -hf variant, options given as a letter-keyed dict (A..D
    there; A..E, as in the original 5-option MedQA, is scored 5-way)."""
    question = _text(row, "question")
    options_field = _mapping(row, "options")
    letters = LETTERS[: len(options_field)]
    if len(options_field) < MEDQA_MIN_OPTIONS or sorted(options_field) != sorted(letters):
        keys = ", ".join(sorted(map(str, options_field))) or "none"
        raise RowInvalid("options", f"expected keys A, B, C, D (and E, ...: consecutive letters), got {keys}")
    options = [_text(options_field, letter, f"options.{letter}") for letter in letters]
    answer = _text(row, "answer_idx").strip().upper()
    if answer not in letters:
        raise RowInvalid("answer_idx", f"{answer!r} is not one of the row's options {', '.join(letters)}")
    return _letter_prompt(question, options), letters, letters.index(answer)


PUBMEDQA_CHOICES = ("yes", "no", "maybe")


def _pubmedqa(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    question = _text(row, "question")
    contexts = _mapping(row, "context").get("contexts")
    if not isinstance(contexts, list | tuple):
        raise RowInvalid("context.contexts", f"expected a list of abstract sections, got {_describe(contexts)}")
    parts = [_text({"contexts": part}, "contexts", f"context.contexts[{i}]") for i, part in enumerate(contexts)]
    if not parts:
        raise RowSkipped("blank contexts")
    decision = _text(row, "final_decision").strip().lower()
    if decision not in PUBMEDQA_CHOICES:
        raise RowInvalid("final_decision", f"{decision!r} is not one of {', '.join(PUBMEDQA_CHOICES)}")
    abstract = "\n".join(parts)
    return f"Abstract: {abstract}\nQuestion: {question}\nAnswer:", PUBMEDQA_CHOICES, PUBMEDQA_CHOICES.index(decision)


AFRIMEDQA_OPTIONS = 5
AFRIMEDQA_PLACEHOLDER = "n/a"  # a fifth option the authors drop (any case): those questions are 4-way


def _afrimedqa(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...], int]:
    """The AfriMed-QA authors' rules (intron-innovation/AfriMed-QA ``src/utils/prepare_data.py``): an "n/a" fifth
    option is dropped, a multi-answer row (``option1,option3``) is scored with its first answer, and the question
    is ``question_clean`` when present (``question`` carries trailing blank lines)."""
    if _category(row, "question_type") != "mcq":
        raise RowSkipped("not mcq")
    if _category(row, "tier") != "expert":
        raise RowSkipped("not expert tier")
    if _category(row, "question_clean"):
        question = _text(row, "question_clean").strip()
    else:
        question = _text(row, "question").rstrip()
    raw_options = row.get("answer_options")
    try:
        options_field = json.loads(raw_options) if isinstance(raw_options, str) else raw_options
    except json.JSONDecodeError as exc:
        raise RowInvalid("answer_options", f"not valid JSON ({exc.msg})") from None
    if not isinstance(options_field, Mapping):
        raise RowInvalid("answer_options", f"expected an object option1..option5, got {_describe(options_field)}")
    keys = [f"option{i}" for i in range(1, AFRIMEDQA_OPTIONS + 1)]
    last = options_field.get(keys[-1])
    if isinstance(last, str) and last.strip().lower() == AFRIMEDQA_PLACEHOLDER:
        keys = keys[:-1]
    options = tuple(_text(options_field, key, f"answer_options.{key}") for key in keys)
    answers = [part.strip() for part in _text(row, "correct_answer").split(",") if part.strip()]
    if answers and answers[0] == f"option{AFRIMEDQA_OPTIONS}" and len(keys) < AFRIMEDQA_OPTIONS:
        raise RowSkipped("answer is the dropped n/a option")
    if not answers or answers[0] not in keys:
        raise RowInvalid("correct_answer", f"{answers[0] if answers else ''!r} is not one of {', '.join(keys)}")
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
        raise MexportError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}",
            hint="lm-eval task names are accepted where --tasks is (with the lmeval extra installed)",
        )
    return TASKS[name]


def check_task(name: str, include_path: str | Path | None = None) -> None:
    """``name`` is a built-in task or, with lm-eval installed, an lm-eval task (``include_path``: extra YAMLs)."""
    if name in TASKS:
        return
    if not is_available("lm_eval"):
        raise MexportError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}",
            hint="lm-eval task names need lm-eval: pip install 'mexport[lmeval]'",
        )
    if not is_lmeval_task(name, include_path):
        raise MexportError(
            f"unknown task {name!r}: neither built in ({', '.join(TASKS)}) nor an lm-eval task",
            hint="`lm_eval ls tasks` lists lm-eval's; local task YAMLs need --include-path DIR",
        )


# ---- reading rows --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """A source's rows and what to call each one in an error (``line N`` of a .jsonl, else ``row N``)."""

    source: str
    rows: list[Any]
    labels: list[str]


def _bad_file(path: Path, problem: str) -> MexportError:
    return MexportError(
        f"{path}: {problem}",
        hint=f"pass a {', '.join(DATA_SUFFIXES)} file in the dataset's schema, saved as UTF-8",
    )


def _read_rows(path: Path) -> Rows:
    """Rows of a local .jsonl / .json / .parquet file; an unreadable file or line is refused, naming where."""
    if not path.is_file():
        raise MexportError(
            f"{path}: no such data file",
            hint="--data TASK=FILE takes an existing file, or TASK=sample / TASK=demo for the shipped sets",
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        parquet = require("pyarrow.parquet", "reading parquet task data")
        try:
            rows = list(parquet.read_table(path).to_pylist())
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
            raise _bad_file(path, f"not a readable parquet file ({first_line(exc)})") from exc
        return Rows(str(path), rows, [f"row {number}" for number in range(1, len(rows) + 1)])
    if suffix not in DATA_SUFFIXES:
        raise MexportError(
            f"{path}: unsupported data file type {suffix!r}",
            hint=f"use one of {', '.join(DATA_SUFFIXES)} in the dataset's own schema",
        )
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad_file(path, f"not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    if suffix == ".jsonl":
        rows, labels = [], []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise _bad_file(path, f"line {number}: not valid JSON ({exc.msg})") from exc
            labels.append(f"line {number}")
        return Rows(str(path), rows, labels)
    try:
        payload = json.loads(content)
    except json.JSONDecodeError as exc:
        raise _bad_file(path, f"not valid JSON ({exc})") from exc
    if isinstance(payload, Mapping) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise _bad_file(path, "expected a JSON list of rows (or {'data': [...]})")
    return Rows(str(path), payload, [f"row {number}" for number in range(1, len(payload) + 1)])


def _read_hub_rows(spec: TaskSpec) -> Rows:
    """The hub dataset's rows; an unreachable Hub is probed first (no retries), leaving only the local cache."""
    datasets = require("datasets", "downloading benchmark data from the Hugging Face hub")
    unreachable = unreachable_reason()
    offline_before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline_before or unreachable is not None
    try:
        dataset = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as exc:  # network, auth, missing-config errors all mean "not available here"
        reason = first_line(exc)
        if unreachable is not None:
            raise EnvironmentFailure(
                f"{spec.name}: the Hugging Face Hub cannot be reached ({unreachable}) and {_hub_source(spec)} is not "
                "in the local cache",
                hint=f"pass a local copy with --data {spec.name}=FILE, or --data {spec.name}=sample for the shipped "
                "sample; or check the network (HTTPS_PROXY, HF_ENDPOINT)",
            ) from exc
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
    finally:
        datasets.config.HF_HUB_OFFLINE = offline_before
    rows = list(dataset)
    return Rows(_hub_source(spec), rows, [f"row {number}" for number in range(1, len(rows) + 1)])


def _hub_source(spec: TaskSpec) -> str:
    config = f"/{spec.hub_config}" if spec.hub_config else ""
    return f"hf:{spec.hub_id}{config}:{spec.hub_split}"


def _invalid_row(spec: TaskSpec, source: Rows, index: int, field: str, problem: str) -> MexportError:
    return MexportError(f"{source.source} {source.labels[index]}: {spec.name} field {field!r}: {problem}",
                        hint=SCHEMA_HINT)


def _row_schema(spec: TaskSpec, source: Rows, index: int) -> RowSchema:
    """The schema whose required fields all occur in this row (files may mix a task's schemas row by row)."""
    row = source.rows[index]
    if not isinstance(row, Mapping):
        raise _invalid_row(spec, source, index, "(row)", f"expected an object, got {_describe(row)}")
    missing_by_schema = [[name for name in schema.required_fields if name not in row] for schema in spec.schemas]
    for schema, missing in zip(spec.schemas, missing_by_schema, strict=True):
        if not missing:
            return schema
    missing = min(missing_by_schema, key=len)
    raise _invalid_row(spec, source, index, missing[0], "missing" + (
        f" (also {', '.join(missing[1:])})" if len(missing) > 1 else ""
    ))


def _check_dataset(spec: TaskSpec, source: Rows) -> None:
    """Refuse a source none of whose rows has a schema's fields: it is another dataset, not a broken row."""
    present: set[str] = set()
    for row in source.rows:
        if isinstance(row, Mapping):
            present.update(row)
    missing_by_schema = [[name for name in schema.required_fields if name not in present] for schema in spec.schemas]
    if not present:
        raise MexportError(
            f"{source.source}: no rows found: is this a {spec.name} file?",
            hint=f"{spec.name} expects rows in the schema of {spec.hub_id}",
        )
    if any(not missing for missing in missing_by_schema):
        return
    missing = min(missing_by_schema, key=len)
    raise MexportError(
        f"{source.source}: rows lack fields {', '.join(missing)}: is this a {spec.name} file?",
        hint=f"{spec.name} expects the schema of {spec.hub_id}"
        + (f" or {', '.join(s.name for s in spec.schemas[1:])}" if len(spec.schemas) > 1 else ""),
    )


def _doc_id(spec: TaskSpec, source: Rows, index: int, schema: RowSchema) -> str | None:
    raw = source.rows[index].get(schema.id_field) if schema.id_field else None
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise _invalid_row(spec, source, index, str(schema.id_field), f"expected a text or integer id, got {_describe(raw)}")
    problem = text_problem(str(raw))
    if problem:
        raise _invalid_row(spec, source, index, str(schema.id_field), problem)
    return str(raw)


def _convert_rows(spec: TaskSpec, source: Rows) -> tuple[list[Question], Counter[str], list[str]]:
    """(questions, skipped rows by reason, the schemas the rows used); any invalid row is refused."""
    _check_dataset(spec, source)
    questions: list[Question] = []
    reasons: Counter[str] = Counter()
    used: list[str] = []
    seen_ids: set[str] = set()
    for index in range(len(source.rows)):
        schema = _row_schema(spec, source, index)
        if schema.name not in used:
            used.append(schema.name)
        try:
            prompt, choice_texts, gold = schema.convert(source.rows[index])
        except RowSkipped as skipped:
            reasons[skipped.reason] += 1
            continue
        except RowInvalid as invalid:
            raise _invalid_row(spec, source, index, invalid.field, invalid.problem) from None
        doc_id = _doc_id(spec, source, index, schema) or f"row-{index}"
        if doc_id in seen_ids:  # ids pair questions across runs, so they must be unique
            doc_id = f"{doc_id}#{index}"
        seen_ids.add(doc_id)
        questions.append(Question(doc_id, prompt, tuple(choice_texts), gold))
    return questions, reasons, used


def data_file(name: str, data: str | Path) -> Path:
    """The file ``--data name=DATA`` reads: a shipped set's (``sample``, ``demo``) or the path given."""
    spec = get_task(name)
    shipped = dict(zip(SHIPPED_SETS, (spec.sample_path, spec.demo_path), strict=True))
    return shipped.get(str(data)) or Path(data).expanduser()


def _resolve_source(spec: TaskSpec, data: str | Path | None) -> tuple[Rows, str | None]:
    """(rows, sha256 of the file or None for the hub)."""
    if data is None:
        return _read_hub_rows(spec), None
    path = data_file(spec.name, data)
    return _read_rows(path), sha256_file(path)


# ---- public API ----------------------------------------------------------------------------------------------


def _fewshot_prefix(question: Question, pool: list[Question], shots: int, seed: int) -> str:
    """lm-eval's few-shot layout: K solved examples (prompt + delimiter + gold choice), each followed by \\n\\n."""
    others = [candidate for candidate in pool if candidate.doc_id != question.doc_id]
    # seeded by (seed, question id) so the prefix does not depend on which other questions are scored
    rng = random.Random(hashlib.sha256(f"{seed}:{question.doc_id}".encode()).hexdigest())
    examples = rng.sample(others, shots)
    return "".join(f"{ex.prompt}{TARGET_DELIMITER}{ex.choice_texts[ex.gold]}{FEWSHOT_DELIMITER}" for ex in examples)


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
            raise MexportError(
                f"--data {name}=...: lm-eval task {name!r} reads the data its definition names",
                hint=f"drop --data {name}=...; --data is for the built-in tasks ({', '.join(TASKS)})",
            )
        return load_lmeval_task(name, include_path, limit=limit, seed=seed, shots=shots)
    spec = get_task(name)
    if shots < 0:
        raise MexportError(f"shots must be >= 0, got {shots}", hint="pass --shots 0 (zero-shot, as lm-eval) or more")
    source, source_sha256 = _resolve_source(spec, data)
    questions, reasons, schemas = _convert_rows(spec, source)
    if shots and len(questions) <= shots:
        raise MexportError(
            f"{name}: {shots}-shot prompts need more than {shots} usable questions, the data has {len(questions)}",
            hint="pass fewer --shots, or a larger data file",
        )
    selected = [questions[i] for i in sample_indices(len(questions), limit, seed)]
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
        source=source.source,
        source_sha256=source_sha256,
        total_rows=len(source.rows),
        schema="+".join(schemas),
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
