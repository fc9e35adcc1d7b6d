"""Data is read as its schema says, or refused: every field a task reads is type-checked, and a bad row, file or
artifact header is one line naming where (exit 2 for data, 3 for a changed artifact), never a guess or a crash."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import EXIT_ENVIRONMENT, EXIT_USAGE, IntegrityError, MexportError
from mexport.manifest import MANIFEST_NAME, read_manifest
from mexport.validate.tasks import SAMPLE_DIR, TASKS, load_task


def _first_row(task: str) -> dict[str, Any]:
    return json.loads(TASKS[task].sample_path.read_text().splitlines()[0])


def _write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _refused(task: str, path: Path, message: str) -> MexportError:
    with pytest.raises(MexportError, match=message) as raised:
        load_task(task, path)
    assert raised.value.exit_code == EXIT_USAGE and raised.value.hint
    assert "\n" not in raised.value.message
    return raised.value


# ---- a field of the wrong type is refused, naming file, row and field ----------------------------------------


@pytest.mark.parametrize(
    ("task", "changes", "field", "problem"),
    [
        # the abstract given as one string (not a list of sections) was split one character per line
        ("pubmedqa", {"context": {"contexts": "One abstract as a single string."}}, "context.contexts",
         "expected a list of abstract sections, got str"),
        ("pubmedqa", {"context": {"contexts": ["fine", 3]}}, r"context.contexts\[1\]", "expected text, got int 3"),
        ("pubmedqa", {"final_decision": None}, "final_decision", "expected text, got null"),
        # NaN (JSON's NaN token, pandas' missing value) was scored as the text "nan"
        ("medmcqa", {"question": math.nan}, "question", "expected text, got nan"),
        ("medmcqa", {"opb": 12}, "opb", "expected text, got int 12"),
        ("medmcqa", {"cop": math.inf}, "cop", "expected an integer label, got inf"),
        ("medmcqa", {"cop": 1.5}, "cop", "expected an integer label, got float 1.5"),
        ("medmcqa", {"cop": True}, "cop", "expected an integer label, got bool True"),
        ("medmcqa", {"cop": 4}, "cop", r"label 4 is not in 0..3"),
        ("medmcqa", {"question": "A lone \ud800 surrogate?"}, "question", "contains a lone surrogate U\\+D800"),
        ("medmcqa", {"id": [1, 2]}, "id", "expected a text or integer id"),
        ("medqa", {"answer_idx": "F"}, "answer_idx", "'F' is not one of the row's options A, B, C, D"),
        ("medqa", {"options": {"A": "x", "B": "y", "C": "z"}}, "options", "expected keys A, B, C, D"),
        ("afrimedqa", {"answer_options": "{not json"}, "answer_options", "not valid JSON"),
        ("afrimedqa", {"correct_answer": "option9"}, "correct_answer", "'option9' is not one of option1"),
        ("afrimedqa", {"tier": 3}, "tier", "expected text, got int 3"),
    ],
)
def test_a_wrongly_typed_field_is_refused_naming_file_row_and_field(
    tmp_path: Path, task: str, changes: dict, field: str, problem: str
) -> None:
    good = _first_row(task)
    path = _write_rows(tmp_path / f"{task}.jsonl", [good, {**good, **changes}])
    _refused(task, path, rf"{task}.jsonl line 2: {task} field '{field}': {problem}")


def test_a_row_missing_a_field_is_refused_not_dropped(tmp_path: Path) -> None:
    good = _first_row("medmcqa")
    partial = {key: value for key, value in good.items() if key != "opd"}
    _refused("medmcqa", _write_rows(tmp_path / "m.jsonl", [good, partial]), r"line 2: medmcqa field 'opd': missing")


def test_rows_the_datasets_rules_leave_out_are_counted_not_refused(tmp_path: Path) -> None:
    good = _first_row("afrimedqa")
    rows = [good, {**good, "sample_id": "saq", "question_type": "saq"}, {**good, "sample_id": "c", "tier": None},
            {**good, "sample_id": "blank", "question": "  ", "question_clean": None}]
    data = load_task("afrimedqa", _write_rows(tmp_path / "a.jsonl", rows))
    assert len(data.items) == 1
    assert data.skip_reasons == {"blank question": 1, "not expert tier": 1, "not mcq": 1}


# ---- MedQA: both schemas, mixed row by row; N options scored N-way --------------------------------------------


def _medqa_pair() -> tuple[dict, dict]:
    hf = json.loads((SAMPLE_DIR / "medqa_hf_sample.jsonl").read_text().splitlines()[0])
    letters = "ABCD"
    options = {"question": hf["sent1"], "options": {letters[i]: hf[f"ending{i}"] for i in range(4)},
               "answer_idx": letters[hf["label"]]}
    return hf, options


def test_a_file_mixing_the_two_medqa_schemas_reads_every_row(tmp_path: Path) -> None:
    hf, options = _medqa_pair()
    data = load_task("medqa", _write_rows(tmp_path / "mixed.jsonl", [hf, options, {**hf, "id": "again"}]))
    assert len(data.items) == 3 and data.skipped == 0
    assert data.schema == "medqa-hf+medqa-4-options"
    assert data.items[0].context == data.items[1].context and data.items[0].gold == data.items[1].gold


def test_a_row_matching_neither_medqa_schema_names_the_row(tmp_path: Path) -> None:
    hf, options = _medqa_pair()
    broken = {key: value for key, value in options.items() if key != "answer_idx"}
    _refused("medqa", _write_rows(tmp_path / "mixed.jsonl", [hf, broken]), r"line 2: medqa field 'answer_idx': missing")


def test_five_option_medqa_is_scored_five_way_in_both_schemas(tmp_path: Path) -> None:
    hf, options = _medqa_pair()
    hf5 = {**hf, "ending4": "A fifth answer", "label": 4}
    options5 = {**options, "options": {**options["options"], "E": "A fifth answer"}, "answer_idx": "E"}
    data = load_task("medqa", _write_rows(tmp_path / "five.jsonl", [hf5, options5]))
    for item in data.items:
        assert item.choices == (" A", " B", " C", " D", " E") and item.gold == 4
        assert "\nE. A fifth answer\nAnswer:" in item.context
    assert data.items[0].context == data.items[1].context


# ---- files that cannot be read are bad input, one line ---------------------------------------------------------


def test_unreadable_files_are_refused_with_one_line(tmp_path: Path) -> None:
    good = json.dumps(_first_row("medmcqa"))
    (tmp_path / "latin1.jsonl").write_bytes(good.encode().replace(b"Drug", b"Dr\xe9g", 1) + b"\n")
    _refused("medmcqa", tmp_path / "latin1.jsonl", r"latin1.jsonl: not UTF-8 text")
    (tmp_path / "broken.jsonl").write_text(good + "\n{not json\n")
    _refused("medmcqa", tmp_path / "broken.jsonl", r"broken.jsonl: line 2: not valid JSON")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    _refused("medmcqa", tmp_path / "corrupt.parquet", r"corrupt.parquet: not a readable parquet file")
    (tmp_path / "list.json").write_text(json.dumps([json.loads(good), "a string row"]))
    _refused("medmcqa", tmp_path / "list.json", r"list.json row 2: medmcqa field '\(row\)': expected an object")


def test_validate_cli_exits_2_on_a_bad_data_file(tmp_path: Path, tiny_checkpoint: Path, tiny_export_fp32: Path) -> None:
    row = {**_first_row("medmcqa"), "cop": math.inf}
    bad = _write_rows(tmp_path / "bad.jsonl", [row])
    result = CliRunner().invoke(
        app,
        ["validate", "--reference", str(tiny_checkpoint), "--candidate", str(tiny_export_fp32), "--tasks", "medmcqa",
         "--data", f"medmcqa={bad}", "-o", str(tmp_path / "report")],
    )
    assert result.exit_code == EXIT_USAGE, result.output
    assert "bad.jsonl line 1: medmcqa field 'cop': expected an integer label, got inf" in result.output
    assert "Traceback" not in result.output


# ---- lm-eval tasks: a gold that names no choice is the task's error ---------------------------------------------


class _Task:
    def __init__(self, gold: Any) -> None:
        self.gold = gold

    def doc_to_target(self, doc: Any) -> Any:
        return self.gold


@pytest.mark.parametrize(("gold", "expected"), [(1, 1), ("no", 1), (["maybe", "no"], 2), (2.0, 2), ("0", 0)])
def test_lmeval_gold_is_an_index_or_a_choice(gold: Any, expected: int) -> None:
    from mexport.validate.lmeval_tasks import _gold_index

    assert _gold_index("t", 0, _Task(gold), {}, ["yes", "no", "maybe"]) == expected


@pytest.mark.parametrize("gold", [math.inf, math.nan, 1.5, 3, -1, "unsure", None, []])
def test_lmeval_gold_that_names_no_choice_is_refused(gold: Any) -> None:
    from mexport.validate.lmeval_tasks import _gold_index

    with pytest.raises(MexportError, match="lm-eval task 't' doc 7: gold .* is not a choice") as raised:
        _gold_index("t", 7, _Task(gold), {}, ["yes", "no", "maybe"])
    assert raised.value.exit_code == EXIT_USAGE and raised.value.hint


# ---- an artifact's manifest is checked against its graph on read ----------------------------------------------


def _tampered(tmp_path: Path, export: Path, edit: Any) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    edit(manifest)
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def test_a_manifest_dtype_the_graph_disagrees_with_is_refused(tmp_path: Path, tiny_export_fp32: Path) -> None:
    copy = _tampered(tmp_path, tiny_export_fp32, lambda manifest: manifest.update(dtype="bf16"))
    with pytest.raises(IntegrityError, match="manifest says dtype 'bf16' but model.onnx's KV cache is float32") as raised:
        read_manifest(copy, verify=True)
    assert raised.value.exit_code == EXIT_ENVIRONMENT and raised.value.hint


def test_a_manifest_io_the_graph_disagrees_with_is_refused(tmp_path: Path, tiny_export_fp32: Path) -> None:
    def rename_logits(manifest: dict) -> None:
        manifest["io"]["outputs"][0]["name"] = "scores"

    copy = _tampered(tmp_path, tiny_export_fp32, rename_logits)
    with pytest.raises(IntegrityError, match="mexport.json does not describe this graph \\(output logits is only in the graph"):
        read_manifest(copy, verify=True)
    assert read_manifest(tiny_export_fp32, verify=True)["dtype"] == "fp32"  # the untouched export still reads


# ---- the tokenizer must fit the model ---------------------------------------------------------------------------


def test_a_tokenizer_larger_than_the_models_vocab_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from mexport.checkpoint import load_tokenizer

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    tokens = len(load_tokenizer(copy))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "vocab_size": tokens - 1}))
    with pytest.raises(MexportError, match=f"the tokenizer has {tokens} tokens but the model's vocab_size is"):
        load_tokenizer(copy)
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    with pytest.raises(MexportError, match="could not load its tokenizer") as raised:
        load_tokenizer(copy)
    assert raised.value.hint


# ---- quantize owns its calibration text --------------------------------------------------------------------------


def test_shipped_calibration_text_is_the_samples_questions_with_answers() -> None:
    """quantize ships its default calibration text (so validation tasks never change it silently); this checks the
    shipped file still equals what tools/write_calibration_texts.py derives from the samples (re-run it after a
    deliberate change to a sample)."""
    import importlib.util

    from mexport.optimize.quantize.calibration import DEFAULT_CALIBRATION_FILE, load_calibration

    spec = importlib.util.spec_from_file_location("writer", Path(__file__).parents[1] / "tools" / "write_calibration_texts.py")
    assert spec is not None and spec.loader is not None
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    shipped = [json.loads(line) for line in DEFAULT_CALIBRATION_FILE.read_text().splitlines()]
    assert shipped == writer.expected_rows()
    assert len(shipped) == 161 and len(load_calibration(None, 64, 0).texts) == 64


def test_an_unreachable_hub_dataset_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mexport.errors import EnvironmentFailure
    from mexport.validate import tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # nothing cached
    monkeypatch.setattr(tasks, "unreachable_reason", lambda: "test-host:443: refused")
    datasets = pytest.importorskip("datasets")
    offline_before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(EnvironmentFailure, match="cannot be reached .*test-host.* not in the local cache") as caught:
        load_task("medmcqa", None)
    assert "--data medmcqa=sample" in (caught.value.hint or "")
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # the offline switch is restored after the attempt
