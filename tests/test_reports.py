"""Report files rendered from a synthetic ValidationReport: content, structure and byte-for-byte determinism."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from mexport.validate.reports import (
    REFERENCE_LABEL,
    REPORT_FILES,
    WRITTEN_RECORD,
    BackendInfo,
    ParityResult,
    ScoringSpeed,
    TaskInfo,
    ValidationReport,
    render_accuracy_png,
    render_json,
    render_parity_png,
    write_reports,
)
from mexport.validate.scoring import QuestionScore
from mexport.validate.stats import compare_metric, distribution_drift
from mexport.validate.verdict import FAIL, INCONCLUSIVE, PASS, SKIPPED, parity_verdict, skipped_verdict

N = 120
MARGIN = 5.0  # 120 questions resolve ±3.1 points at best


def _scores(preds: list[int], golds: list[int], shift: float = 0.0) -> list[QuestionScore]:
    """Four-choice questions whose argmax is ``pred`` (log-likelihood -1 for it, -3 - shift for the others)."""
    return [
        QuestionScore.from_logliks(f"q{i}", gold, [-1.0 if c == pred else -3.0 - shift for c in range(4)], [1, 1, 1, 1])
        for i, (pred, gold) in enumerate(zip(preds, golds))
    ]


def _result(task: str, label: str, ref: list[QuestionScore], cand: list[QuestionScore]) -> ParityResult:
    metric = compare_metric(
        "acc", [int(s.acc) for s in ref], [int(s.acc) for s in cand], [s.pred for s in ref], [s.pred for s in cand]
    )
    mean_kl, max_abs = distribution_drift([s.logliks for s in ref], [s.logliks for s in cand])
    verdict = parity_verdict([metric], MARGIN, 0.9)
    return ParityResult(task, label, MARGIN, 0.9, verdict, (metric,), mean_kl, max_abs)


def make_report(created: str = "2025-01-01T00:00:00+00:00", fail_on: str = "inconclusive") -> ValidationReport:
    golds = [i % 4 for i in range(N)]
    ref_preds = [g if i % 3 else (g + 1) % 4 for i, g in enumerate(golds)]  # right on 80 of 120
    wrong_preds = [(g + 2) % 4 for g in golds]  # never right
    unsure_preds = [(g + 3) % 4 if i < 12 and i % 3 else p for i, (g, p) in enumerate(zip(golds, ref_preds))]
    reference = _scores(ref_preds, golds)
    good = _scores(ref_preds, golds, shift=0.1)  # same answers, slightly different distributions
    broken = _scores(wrong_preds, golds)
    unsure = _scores(unsure_preds, golds)  # 8 of 120 lost: -6.7 points, CI crosses -5
    backends = [
        BackendInfo(REFERENCE_LABEL, "reference", "/ckpt", "torch", dtype="bf16", precision="bf16 weights"),
        BackendInfo("good", "candidate", "/good", "ort", dtype="fp32", manifest_sha256="ab" * 32),
        BackendInfo("broken", "candidate", "/broken", "ort", recipe="int4-wo", dtype="bf16"),
        BackendInfo("unsure", "candidate", "/unsure", "ort", recipe="int8-wo", dtype="bf16"),
        BackendInfo("engine", "candidate", "/engine", "trt", skip_reason="TensorRT is not installed"),
    ]
    tasks = [
        TaskInfo("medmcqa", "sample.jsonl", "cd" * 32, "ef" * 32, N, N + 3, {"missing option": 2, "label": 1}),
        TaskInfo("pubmedqa", "sample2.jsonl", None, "01" * 32, N, N, {}, rules="an 'n/a' option dropped"),
    ]
    results, scores = [], {}
    for task in tasks:
        scores[task.name] = {REFERENCE_LABEL: reference, "good": good, "broken": broken, "unsure": unsure}
        results += [
            _result(task.name, "good", reference, good),
            _result(task.name, "broken", reference, broken),
            _result(task.name, "unsure", reference, unsure),
            ParityResult(task.name, "engine", MARGIN, 0.9, skipped_verdict("TensorRT is not installed")),
        ]
    settings = {"margin_points": MARGIN, "agreement_floor": 0.9, "fail_on": fail_on, "shots": 0}
    speed = {REFERENCE_LABEL: ScoringSpeed(2.0, 240, 24000), "good": ScoringSpeed(0.5, 240, 24000)}
    return ValidationReport(created, settings, backends, tasks, results, scores, speed)


def test_synthetic_verdicts_are_what_the_report_shows() -> None:
    report = make_report()
    assert [r.verdict.status for r in report.results] == [PASS, FAIL, INCONCLUSIVE, SKIPPED] * 2
    assert report.failed and report.exit_code == 1 and report.outcome == "FAILED"
    assert not make_report(fail_on="never").failed


def test_inconclusive_alone_exits_4_under_the_default_policy() -> None:
    report = make_report()
    report.results = [r for r in report.results if r.candidate != "broken"]
    assert report.exit_code == 4 and report.outcome == "INCONCLUSIVE"
    report.settings["fail_on"] = "parity"
    assert report.exit_code == 0 and not report.failed


def test_speed_in_json_and_markdown(tmp_path: Path) -> None:
    write_reports(make_report(), tmp_path)
    speed = json.loads((tmp_path / "report.json").read_text())["speed"]
    assert speed["good"] == {
        "seconds": 0.5,
        "questions": 240,
        "tokens": 24000,
        "questions_per_second": 480.0,
        "tokens_per_second": 48000.0,
    }
    assert "| reference | 2.0 | 240 | 120.0 | 12000 |" in (tmp_path / "report.md").read_text()


def test_json_keys_and_per_question_logliks(tmp_path: Path) -> None:
    paths = write_reports(make_report(), tmp_path)
    assert sorted(paths) == sorted(REPORT_FILES)
    payload = json.loads((tmp_path / "report.json").read_text())
    assert {"created", "settings", "methods", "failed", "backends", "tasks", "results"} <= set(payload)
    medmcqa = payload["tasks"]["medmcqa"]
    assert medmcqa["skipped"] == {"label": 1, "missing option": 2}
    assert medmcqa["source_sha256"] == "cd" * 32 and medmcqa["n_items"] == N
    assert len(medmcqa["questions"]) == N
    first = medmcqa["questions"][0]
    assert set(first["backends"]) == {REFERENCE_LABEL, "good", "broken", "unsure"}
    assert len(first["backends"]["good"]["logliks"]) == 4
    assert medmcqa["resolvable_difference_points"] == pytest.approx(3.10, abs=0.005)
    assert "Tango" in payload["methods"]["delta_ci"]
    result = next(r for r in payload["results"] if r["candidate"] == "broken")
    assert result["verdict"] == FAIL and result["metrics"]["acc"]["right_to_wrong"] == 80
    assert result["reasons"][0].startswith("paired CI")
    assert next(b for b in payload["backends"] if b["label"] == "broken")["recipe"] == "int4-wo"
    # no leftovers from the atomic writes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*REPORT_FILES, WRITTEN_RECORD])


def test_json_deterministic_apart_from_timestamp() -> None:
    first = json.loads(render_json(make_report(created="2025-01-01T00:00:00+00:00")))
    second = json.loads(render_json(make_report(created="2026-06-06T12:00:00+00:00")))
    assert first.pop("created") != second.pop("created")
    assert first == second
    assert render_json(make_report()) == render_json(make_report())


def test_markdown_table(tmp_path: Path) -> None:
    write_reports(make_report(), tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| backend | acc [95% CI] | Δ vs ref [paired CI] | flips b/c | McNemar p | agreement | KL | verdict |"
        in markdown
    )
    assert markdown.count("| reference | 66.7 ") == 2
    assert "| broken | ort | int4-wo | bf16 | – | `/broken` |" in markdown
    good_row = next(line for line in markdown.splitlines() if line.startswith("| good | 66.7"))
    assert "+0.0 [-3.1, +3.1]" in good_row and "0/0" in good_row and "PASS" in good_row
    broken_row = next(line for line in markdown.splitlines() if line.startswith("| broken | 0.0"))
    assert "80/0" in broken_row and "FAIL" in broken_row and "agreement 0.00 < 0.90" in broken_row
    unsure_row = next(line for line in markdown.splitlines() if line.startswith("| unsure | 60.0"))
    assert "8/0" in unsure_row and "INCONCLUSIVE" in unsure_row and "crosses ±5" in unsure_row
    assert "Resolvable difference: ±3.10 pts" in markdown
    assert markdown.count("Rules: an 'n/a' option dropped.") == 1  # only the task that has rules says so
    assert json.loads((tmp_path / "report.json").read_text())["tasks"]["pubmedqa"]["rules"] == "an 'n/a' option dropped"
    assert "skipped `engine`: TensorRT is not installed" in markdown
    assert "**Result: FAILED**" in markdown


def test_junit_structure(tmp_path: Path) -> None:
    write_reports(make_report(), tmp_path)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 8
    assert {c.get("classname") for c in cases} == {"mexport.parity.medmcqa", "mexport.parity.pubmedqa"}
    failures = root.findall(".//testcase/failure")
    skipped = root.findall(".//testcase/skipped")
    assert len(failures) == 4 and len(skipped) == 2
    assert failures[0].get("message") == "paired CI [-74.47, -57.83] pts lies outside ±5; agreement 0.00 < 0.90"
    assert [f.get("type") for f in failures[:2]] == ["ParityFailure", "ParityInconclusive"]
    assert "(n=120: resolvable difference ±3.10 pts)" in (failures[1].text or "")
    assert skipped[0].get("message") == "TensorRT is not installed"
    assert root.get("tests") == "8" and root.get("failures") == "4" and root.get("skipped") == "2"


def test_junit_reports_inconclusive_as_skipped_when_the_policy_ignores_it(tmp_path: Path) -> None:
    write_reports(make_report(fail_on="parity"), tmp_path)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.get("failures") == "2" and root.get("skipped") == "4"
    messages = [s.get("message") for s in root.findall(".//testcase/skipped")]
    assert messages[0].startswith("inconclusive: paired CI")


def test_png_exists_and_is_deterministic(tmp_path: Path) -> None:
    write_reports(make_report(), tmp_path)
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert render_accuracy_png(make_report(created="2030-01-01T00:00:00+00:00")) == png
    assert b"Software" not in png and b"matplotlib" not in png.lower()
    parity = (tmp_path / "parity.png").read_bytes()
    assert parity.startswith(b"\x89PNG\r\n\x1a\n") and parity != png
    assert render_parity_png(make_report(created="2030-01-01T00:00:00+00:00")) == parity


@pytest.mark.parametrize("name", ["report.md", "junit.xml"])
def test_text_reports_deterministic(tmp_path: Path, name: str) -> None:
    write_reports(make_report(), tmp_path / "a")
    write_reports(make_report(created="2030-01-01T00:00:00+00:00"), tmp_path / "b")
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@dataclass(frozen=True)
class Declined:
    """Stand-in for scoring.SkippedQuestion: a question the scorer declined, with the reason."""

    doc_id: str
    reason: str


def test_declined_questions_are_left_out_of_the_pairing_and_counted(tmp_path: Path) -> None:
    from mexport.validate.runner import parity_results

    golds = [i % 4 for i in range(N)]
    reference = _scores(golds, golds)
    candidate: list[object] = list(reference)
    long_prompt = "prompt 700 tokens > context 512"
    for index in (3, 7):
        candidate[index] = Declined(reference[index].doc_id, long_prompt)
    reference_row: list[object] = list(reference)
    reference_row[9] = Declined(reference[9].doc_id, long_prompt)
    task = TaskInfo("medmcqa", "demo.jsonl", None, "ab" * 32, N, N)
    candidate_info = BackendInfo("cand", "candidate", "/cand", "ort")
    scores = {"medmcqa": {REFERENCE_LABEL: reference_row, "cand": candidate}}
    [result] = parity_results([task], [candidate_info], scores, margin=5.0, recipe_margins={}, agreement_floor=0.9)
    assert result.metrics[0].n == N - 3
    assert result.skipped_questions == {long_prompt: 3}
    assert result.verdict.status == PASS

    report = ValidationReport(
        "2025-01-01T00:00:00+00:00",
        {"margin_points": 5.0},
        [BackendInfo(REFERENCE_LABEL, "reference", "/ckpt", "torch"), candidate_info],
        [task],
        [result],
        scores,
    )
    write_reports(report, tmp_path)
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["results"][0]["skipped_questions"] == {long_prompt: 3}
    assert payload["tasks"]["medmcqa"]["questions"][3]["backends"]["cand"] == {"skipped": long_prompt}
    assert f"- `cand`: 3 question(s) (3 {long_prompt}) not compared" in (tmp_path / "report.md").read_text()


def test_console_summary_names_outcome_and_speed() -> None:
    from rich.console import Console

    from mexport.validate.reports import summary_table

    console = Console(width=200, record=True)
    console.print(summary_table(make_report()))
    text = console.export_text()
    assert "parity vs reference: FAILED" in text and "INCONCLUSIVE" in text
    assert "scoring speed: reference 120.0 q/s (12000 tok/s), good 480.0 q/s (48000 tok/s)" in text
