"""End to end: a learned tiny Gemma2, its fp32 ONNX export and a corrupted copy, validated on the shipped samples.

The learned fixture answers the sample questions far above chance, so a broken export has accuracy to lose; the
intact fp32 export must pass parity against the bf16 PyTorch checkpoint, the corrupted one must fail (exit 1).
24 questions resolve a difference of ±13.8 points at best, so these tests use a 25-point margin (WIDE).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.manifest import file_records, read_manifest, write_manifest
from mexport.validate import validate
from mexport.validate.reports import REPORT_FILES

TASKS = "medmcqa,pubmedqa"
DATA = ["--data", "medmcqa=sample", "--data", "pubmedqa=sample"]
LIMIT = ["--limit", "24"]
WIDE = ["--margin", "25"]
SAMPLE = {"medmcqa": "sample"}


def corrupt_matmul_weights(model_dir: Path, noise: float = 1.0, seed: int = 0) -> int:
    """Add Gaussian noise (``noise`` × each tensor's std) to every MatMul weight in model.onnx.data, in place.

    Nothing else changes (graph, manifest, file hashes recorded in it): a silently damaged artifact.
    """
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    matmul_inputs = {name for node in model.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    weights = np.memmap(model_dir / "model.onnx.data", mode="r+", dtype=np.uint8)
    rng = np.random.default_rng(seed)
    touched = 0
    for tensor in model.graph.initializer:
        if tensor.name not in matmul_inputs or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}
        start, length = int(location["offset"]), int(location["length"])
        values = weights[start : start + length].view(np.float32)
        values += rng.normal(0.0, noise * float(values.std()), values.shape).astype(np.float32)
        touched += 1
    weights.flush()
    return touched


@pytest.fixture(scope="module")
def corrupted_export(tmp_path_factory: pytest.TempPathFactory, learned_export: Path) -> Path:
    out = tmp_path_factory.mktemp("corrupted") / "learned-fp32-corrupted"
    shutil.copytree(learned_export, out)
    assert corrupt_matmul_weights(out) >= 28  # 7 projections x 4 layers
    record_files(out)  # weights wrong as written (a broken quantizer), not a damaged file: it must fail on accuracy
    return out


def record_files(model_dir: Path) -> None:
    """Make the manifest record the files as they now are: an artifact written that way, which verifies."""
    write_manifest(model_dir, {**read_manifest(model_dir), "files": file_records(model_dir)})


class ScoreCounter:
    """Wraps scoring.score_items to count scored questions, optionally interrupting after some batches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt_after_batches: int | None = None) -> None:
        from mexport.validate import runner, scoring

        self.real = getattr(runner.score_items, "real", scoring.score_items)  # never wrap a previous counter
        self.questions = 0
        self.batches = 0
        self.interrupt_after_batches = interrupt_after_batches
        monkeypatch.setattr(runner, "score_items", self)  # where validation calls it

    def __call__(self, runtime: Any, tokenizer: Any, items: Any, **kwargs: Any) -> Any:
        if self.interrupt_after_batches is not None and self.batches >= self.interrupt_after_batches:
            raise KeyboardInterrupt
        result = self.real(runtime, tokenizer, items, **kwargs)
        self.batches += 1
        self.questions += len(items)
        return result


def _invoke(reference: Path, candidates: list[Path], tasks: str, out: Path, *extra: str) -> Any:
    """`mexport validate` through the CLI; ``extra`` holds any further options."""
    args = ["validate", "--reference", str(reference), "--tasks", tasks, "-o", str(out), *extra]
    for candidate in candidates:
        args += ["--candidate", str(candidate)]
    return CliRunner().invoke(app, args)


@pytest.mark.slow
def test_export_passes_and_corrupted_export_fails(
    learned: Path, learned_export: Path, corrupted_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = tmp_path / "parity"
    intact = _invoke(learned, [learned_export], TASKS, reports, *DATA, *LIMIT, *WIDE, "--json")
    assert intact.exit_code == 0, intact.output
    summary = json.loads(intact.stdout)
    assert summary["failed"] is False
    assert [r["verdict"] for r in summary["results"]] == ["pass", "pass"]
    for result in summary["results"]:
        assert result["reference_acc"] > 0.6  # far above chance: there is accuracy to lose
        assert result["agreement"] >= 0.9

    counter = ScoreCounter(monkeypatch)
    both = _invoke(learned, [learned_export, corrupted_export], TASKS, reports, *DATA, *LIMIT, *WIDE)
    assert both.exit_code == 1, both.output
    assert counter.questions == 2 * 24  # reference and intact export came from the cache
    assert "learned-fp32-corrupted" in both.output and "FAILED" in both.output

    report = json.loads((reports / "report.json").read_text())
    verdicts = {(r["task"], r["candidate"]): r for r in report["results"]}
    for task in TASKS.split(","):
        assert verdicts[(task, "learned-fp32")]["verdict"] == "pass"
        broken = verdicts[(task, "learned-fp32-corrupted")]
        assert broken["verdict"] == "fail"
        assert broken["metrics"]["acc"]["delta_ci"][1] < 0  # the loss is shown, not just possible
        assert any(reason.startswith("agreement") for reason in broken["reasons"])
        assert broken["metrics"]["acc"]["right_to_wrong"] > 0
        questions = report["tasks"][task]["questions"]
        assert len(questions) == 24
        assert all(len(q["backends"]) == 3 for q in questions)
    backend = next(b for b in report["backends"] if b["label"] == "learned-fp32")
    assert backend["dtype"] == "fp32" and "fp32 compute" in backend["precision"]
    assert report["tasks"]["medmcqa"]["skipped"] == {} and report["tasks"]["medmcqa"]["source_sha256"]

    import xml.etree.ElementTree as ET

    junit = ET.parse(reports / "junit.xml").getroot()
    assert junit.get("tests") == "4" and junit.get("failures") == "2"
    assert (reports / "report.md").read_text().count("❌ FAIL") == 2 + 1  # pubmedqa also reports acc_norm


@pytest.mark.slow
def test_skipped_engine_fails_only_under_fail_on_any(learned: Path, learned_export: Path, tmp_path: Path) -> None:
    """8 questions cannot resolve the default ±1 margin: inconclusive (exit 4) by default, 0 under --fail-on parity,
    1 under --fail-on any (the skipped engine)."""
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "mexport.json").write_text(json.dumps({"kind": "engine", "dtype": "bf16"}))
    candidates = [learned_export, engine]
    extra = ["--data", "medmcqa=sample", "--limit", "8"]
    default = _invoke(learned, candidates, "medmcqa", tmp_path / "r", *extra, "--json")
    assert default.exit_code == 4, default.output
    verdicts = {r["candidate"]: r for r in json.loads(default.stdout)["results"]}
    assert verdicts["learned-fp32"]["verdict"] == "inconclusive"
    assert "8 questions resolve ±32.44 at best" in verdicts["learned-fp32"]["reasons"][0]
    assert verdicts["engine"]["verdict"] == "skipped" and verdicts["engine"]["reasons"]
    lenient = _invoke(learned, candidates, "medmcqa", tmp_path / "r", *extra, "--fail-on", "parity")
    assert lenient.exit_code == 0, lenient.output
    strict = _invoke(learned, candidates, "medmcqa", tmp_path / "r", *extra, "--fail-on", "any")
    assert strict.exit_code == 1, strict.output


@pytest.mark.slow
def test_resume_after_interruption(
    learned: Path, learned_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "resume"

    def run() -> Any:
        return validate(learned, [learned_export], ["medmcqa"], data=SAMPLE, output=out, batch_size=8, margin=25)

    interrupted = ScoreCounter(monkeypatch, interrupt_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert interrupted.questions == 16  # two batches of the reference were scored and cached

    resumed = ScoreCounter(monkeypatch)
    first = run()
    assert resumed.questions == (40 - 16) + 40  # the rest of the reference, then the whole candidate
    assert first.results[0].verdict.status == "pass"

    for name in REPORT_FILES:
        (out / name).unlink()
    cached = ScoreCounter(monkeypatch)
    again = run()
    assert cached.questions == 0
    first_json, again_json = first.to_dict(), again.to_dict()
    first_json.pop("created"), again_json.pop("created")
    assert set(first_json.pop("speed")) == {"reference", "learned-fp32"}  # resumed backends were timed
    assert again_json.pop("speed") == {}  # nothing scored: nothing timed
    assert first_json == again_json

    fresh = ScoreCounter(monkeypatch)
    validate(learned, [learned_export], ["medmcqa"], data=SAMPLE, output=out, resume=False)
    assert fresh.questions == 80


@pytest.mark.slow
def test_candidate_with_other_tokenizer_is_refused(learned: Path, learned_export: Path, tmp_path: Path) -> None:
    from mexport.fixtures.tiny_gemma2 import train_tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(learned_export, other)
    train_tokenizer(vocab_size=512).save_pretrained(other)
    record_files(other)  # exported from another checkpoint, not tampered with
    result = _invoke(learned, [other], "medmcqa", tmp_path / "r", "--data", "medmcqa=sample")
    assert result.exit_code == 2, result.output
    assert "different tokenizer" in result.output
    assert str(other) in result.output.replace("\n", "") and str(learned) in result.output.replace("\n", "")


def test_unknown_task_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke(tmp_path, [tmp_path], "medmcqa,usmle", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "unknown task 'usmle'" in result.output
    assert "medmcqa, medqa, pubmedqa, afrimedqa" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "medmcqa"], "--data 'medmcqa': expected KEY=FILE"),
        (["--data", "pubmedqa=sample"], "pubmedqa is not among the requested tasks"),
        (["--margin-for", "int4-wo=wide"], "POINTS must be a number"),
        (["--fail-on", "sometimes"], "--fail-on 'sometimes'"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    result = _invoke(tmp_path, [tmp_path], "medmcqa", tmp_path / "r", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", "")
