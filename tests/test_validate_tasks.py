"""Task loaders: lm-eval prompts, schema detection, unusable rows counted by reason, sampling and few-shot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mexport.errors import MexportError
from mexport.validate import tasks as tasks_module
from mexport.validate.tasks import SAMPLE_DIR, TASKS, calibration_texts, load_task


def _rows(task: str) -> list[dict]:
    return [json.loads(line) for line in TASKS[task].sample_path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_sample_row_is_a_question(task: str) -> None:
    data = load_task(task, "sample")
    assert data.total_rows == len(_rows(task)) == len(data.items)
    assert data.skipped == 0 and data.skip_reasons == {}
    assert len({item.doc_id for item in data.items}) == len(data.items)
    assert data.source_sha256 is not None and data.source == str(TASKS[task].sample_path)
    for item in data.items:
        assert all(choice.startswith(" ") for choice in item.choices)
        assert 0 <= item.gold < len(item.choices)


def test_medmcqa_prompt_is_lm_evals() -> None:
    row = _rows("medmcqa")[0]
    item = load_task("medmcqa", "sample").items[0]
    assert item.context == (
        f"Question: {row['question']}\nChoices:\nA. {row['opa']}\nB. {row['opb']}\nC. {row['opc']}\n"
        f"D. {row['opd']}\nAnswer:"
    )
    assert item.choices == (" A", " B", " C", " D")
    assert (item.doc_id, item.gold) == (row["id"], row["cop"])


def test_medqa_accepts_both_schemas_with_the_same_prompt(tmp_path: Path) -> None:
    hf = load_task("medqa", SAMPLE_DIR / "medqa_hf_sample.jsonl")
    assert (hf.schema, hf.skipped, len(hf.items)) == ("medqa-hf", 0, 20)
    first = json.loads((SAMPLE_DIR / "medqa_hf_sample.jsonl").read_text().splitlines()[0])
    endings = "".join(f"{letter}. {first[f'ending{i}']}\n" for i, letter in enumerate("ABCD"))
    assert hf.items[0].context == f"Question: {first['sent1']}\n{endings}Answer:"
    assert hf.items[0].gold == first["label"]

    # the same question in the non-hf layout (question, options{A..D}, answer_idx) gives the same item
    converted = {
        "question": first["sent1"],
        "options": {letter: first[f"ending{i}"] for i, letter in enumerate("ABCD")},
        "answer_idx": "ABCD"[first["label"]],
        "id": first["id"],
    }
    path = tmp_path / "medqa.jsonl"
    path.write_text(json.dumps(converted) + "\n")
    options = load_task("medqa", path)
    assert options.schema == "medqa-4-options"
    assert options.items == hf.items[:1]
    assert load_task("medqa", "sample").schema == "medqa-4-options"


def test_pubmedqa_prompt_and_choices() -> None:
    row = _rows("pubmedqa")[0]
    item = load_task("pubmedqa", "sample").items[0]
    abstract = "\n".join(row["context"]["contexts"])
    assert item.context == f"Abstract: {abstract}\nQuestion: {row['question']}\nAnswer:"
    assert item.choices == (" yes", " no", " maybe")
    assert item.choices[item.gold] == " " + row["final_decision"]


def test_afrimedqa_choices_are_the_option_texts() -> None:
    row = _rows("afrimedqa")[0]
    item = load_task("afrimedqa", "sample").items[0]
    options = json.loads(row["answer_options"])
    assert item.context == f"Question: {row['question']}\nAnswer:"
    assert item.choice_texts == tuple(options[f"option{i}"] for i in range(1, 6))
    assert item.gold == int(row["correct_answer"].removeprefix("option")) - 1


def _afrimedqa_row(**changes: object) -> dict:
    """A row in intronhealth/afrimedqa_v2's schema (answer_options is a JSON string; question has trailing blank
    lines, as in the real data)."""
    options = {"option1": "Artesunate", "option2": "Chloroquine", "option3": "Quinine", "option4": "Primaquine"}
    row = {
        "sample_id": "s1",
        "question_type": "mcq",
        "tier": "expert",
        "question": "First-line drug for severe malaria?\n\n",
        "answer_options": json.dumps({**options, "option5": "Doxycycline"}),
        "correct_answer": "option1",
    }
    return row | changes


@pytest.mark.parametrize(
    ("changes", "choices", "gold"),
    [
        ({}, ("Artesunate", "Chloroquine", "Quinine", "Primaquine", "Doxycycline"), 0),
        # an "n/a" fifth option (any case) is dropped: a 4-way question
        (
            {
                "answer_options": json.dumps(
                    {"option1": "A1", "option2": "B2", "option3": "C3", "option4": "D4", "option5": "N/A"}
                )
            },
            ("A1", "B2", "C3", "D4"),
            0,
        ),
        # several answers: the first one is gold
        (
            {"correct_answer": "option3,option1"},
            ("Artesunate", "Chloroquine", "Quinine", "Primaquine", "Doxycycline"),
            2,
        ),
    ],
)
def test_afrimedqa_follows_the_authors_rules(tmp_path: Path, changes: dict, choices: tuple, gold: int) -> None:
    path = tmp_path / "afrimedqa.jsonl"
    path.write_text(json.dumps(_afrimedqa_row(**changes)) + "\n")
    [item] = load_task("afrimedqa", path).items
    assert item.choice_texts == choices
    assert item.gold == gold
    assert item.context == "Question: First-line drug for severe malaria?\nAnswer:"  # trailing blank lines gone


def test_afrimedqa_prefers_question_clean_and_skips_an_n_a_gold(tmp_path: Path) -> None:
    n_a_gold = _afrimedqa_row(
        sample_id="s2",
        answer_options=json.dumps({"option1": "a", "option2": "b", "option3": "c", "option4": "d", "option5": "n/a"}),
        correct_answer="option5",
    )
    rows = [_afrimedqa_row(question_clean="Which drug first?"), n_a_gold]
    path = tmp_path / "afrimedqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_task("afrimedqa", path)
    assert [item.context for item in data.items] == ["Question: Which drug first?\nAnswer:"]
    assert data.skip_reasons == {"answer is the dropped n/a option": 1}


def test_afrimedqa_hub_error_says_the_dataset_is_gated(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def gated(*args: object, **kwargs: object) -> None:
        raise ConnectionError("401 Client Error: Unauthorized")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    monkeypatch.setattr(tasks_module, "unreachable_reason", lambda: None)  # the Hub answers, and refuses
    with pytest.raises(MexportError, match="401") as raised:
        load_task("afrimedqa")
    assert "gated" in raised.value.hint and "HF_TOKEN" in raised.value.hint


def test_wrong_dataset_file_names_the_missing_fields() -> None:
    with pytest.raises(
        MexportError,
        match=r"pubmedqa_sample.jsonl: rows lack fields opa, opb, opc, opd, cop: "
        r"is this a medmcqa file\?",
    ):
        load_task("medmcqa", TASKS["pubmedqa"].sample_path)


def test_unknown_task_lists_valid_names() -> None:
    # the same with or without lm-eval installed (with it, lm-eval's task names are valid too)
    with pytest.raises(MexportError, match="unknown task 'no_such_task'.*medmcqa, medqa, pubmedqa, afrimedqa"):
        load_task("no_such_task", "sample")


def test_json_and_parquet_files_load_like_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows("medmcqa")[:5]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    expected = load_task("medmcqa", "sample").items[:5]
    assert load_task("medmcqa", tmp_path / "rows.json").items == expected
    assert load_task("medmcqa", tmp_path / "rows.parquet").items == expected
    assert load_task("medmcqa", jsonl).items == expected


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(MexportError, match="no such data file"):
        load_task("medmcqa", tmp_path / "absent.jsonl")
    (tmp_path / "rows.csv").write_text("question,opa\n")
    with pytest.raises(MexportError, match="unsupported data file type '.csv'"):
        load_task("medmcqa", tmp_path / "rows.csv")


def test_hub_failure_is_one_line_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openlifescienceai/medmcqa' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MexportError) as raised:
        load_task("medmcqa")
    assert "\n" not in raised.value.message
    assert "hf:openlifescienceai/medmcqa:validation" in raised.value.message
    assert "--data medmcqa=FILE" in raised.value.hint and "medmcqa=sample" in raised.value.hint


def test_hub_rows_go_through_the_same_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_hub(path, name=None, split=None):
        calls.append((path, name, split))
        return _rows("pubmedqa")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    data = load_task("pubmedqa")
    assert calls == [("qiaojin/PubMedQA", "pqa_labeled", "train")]
    assert data.source == "hf:qiaojin/PubMedQA/pqa_labeled:train" and data.source_sha256 is None
    assert data.items == load_task("pubmedqa", "sample").items


def test_limit_is_a_seeded_sample_in_file_order() -> None:
    full = [item.doc_id for item in load_task("medmcqa", "sample").items]
    first = [item.doc_id for item in load_task("medmcqa", "sample", limit=10, seed=7).items]
    again = [item.doc_id for item in load_task("medmcqa", "sample", limit=10, seed=7).items]
    other = [item.doc_id for item in load_task("medmcqa", "sample", limit=10, seed=8).items]
    assert first == again and len(first) == 10
    assert first != other
    assert first == [doc_id for doc_id in full if doc_id in set(first)]  # original order kept
    assert [item.doc_id for item in load_task("medmcqa", "sample", limit=1000).items] == full
    with pytest.raises(MexportError, match="limit must be at least 1"):
        load_task("medmcqa", "sample", limit=0)


def test_few_shot_prefix_is_lm_eval_layout_and_excludes_the_question() -> None:
    zero = {item.doc_id: item for item in load_task("medmcqa", "sample").items}
    shot = load_task("medmcqa", "sample", shots=2, limit=5, seed=3)
    for item in shot.items:
        examples = item.context.split("\n\n")
        assert len(examples) == 3
        assert examples[-1] == zero[item.doc_id].context
        for example in examples[:2]:
            prompt, answer = example.rsplit(" ", 1)
            source = next(other for other in zero.values() if other.context == prompt)
            assert source.doc_id != item.doc_id
            assert " " + answer == source.choices[source.gold]
    # a question's prefix does not depend on which other questions are scored with it
    alone = {item.doc_id: item.context for item in load_task("medmcqa", "sample", shots=2, seed=3).items}
    assert all(alone[item.doc_id] == item.context for item in shot.items)
    with pytest.raises(MexportError, match="need more than"):
        load_task("medqa", SAMPLE_DIR / "medqa_hf_sample.jsonl", shots=20)


def test_calibration_texts_append_the_correct_answer() -> None:
    texts = calibration_texts("afrimedqa", "sample", limit=3, seed=0)
    items = load_task("afrimedqa", "sample", limit=3, seed=0).items
    assert texts == [item.context + item.choices[item.gold] for item in items]
    assert texts[0].startswith("Question: ") and "\nAnswer: " in texts[0]


def test_afrimedqa_scoring_rules_travel_with_the_loaded_task() -> None:
    """The report states how AfriMedQA rows were turned into questions (the authors' rules), not only the docs."""
    loaded = load_task("afrimedqa", "sample")
    assert "'n/a' fifth option dropped" in loaded.rules and "first answer" in loaded.rules
    assert load_task("medmcqa", "sample").rules == ""
