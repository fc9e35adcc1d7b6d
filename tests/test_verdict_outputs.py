"""No vacuous verdict, one check per option, the graph's own math, no lost report, and the output contract.

A: non-finite logits fail every numeric check; a run or result that compared nothing is never PASS.
B: CLI, pipeline and library refuse the same option values with the same words.
C: ONNX Runtime sessions compute Q/DQ graphs as written, and reports say what ran.
D: validate never replaces a report file it did not write, and holds its output's lock.
E: strict JSON, escaped Markdown, truthful comparisons, -q, ~ paths, tampered manifests, bad configs, exit codes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from mexport import strict_json
from mexport.cli import app
from mexport.errors import EnvironmentFailure, IntegrityError, MexportError, MissingDependencyError
from mexport.fsutil import check_free_space
from mexport.validate.reports import (
    REFERENCE_LABEL,
    WRITTEN_RECORD,
    BackendInfo,
    ParityResult,
    TaskInfo,
    ValidationReport,
    render_json,
    render_markdown,
    write_reports,
)
from mexport.validate.scoring import QuestionScore
from mexport.validate.verdict import (
    FAIL,
    INCONCLUSIVE,
    check_policy,
    parity_verdict,
    shown_apart,
    skipped_verdict,
)

runner = CliRunner()


def _score(doc: str, logliks: list[float], gold: int = 0) -> QuestionScore:
    return QuestionScore.from_logliks(doc, gold, logliks, [1] * len(logliks))


def _report(results: list[ParityResult], backends: list[BackendInfo] | None = None, **settings: Any) -> ValidationReport:
    backends = backends or [BackendInfo(REFERENCE_LABEL, "reference", "/ckpt", "torch")]
    task = TaskInfo("medqa", "sample", None, "00" * 32, 4, 4)
    return ValidationReport("2025-01-01", {"fail_on": "inconclusive", **settings}, backends, [task], results, {})


# ------------------------------------------------------------------------------------------ A: vacuous verdicts


def test_export_check_fails_when_both_sides_are_nan() -> None:
    from mexport.export.verify import TOLERANCES, case_failure, compare_logits

    nan = np.full((3, 8), np.nan, dtype=np.float32)
    case = compare_logits([nan], [nan.copy()])
    assert case["non_finite_positions"] == 3 and case["max_abs"] is None and case["top1_agreement"] is None
    assert case_failure("prefill", case, TOLERANCES["fp32"]) == "prefill: 3 of 3 positions have NaN/inf logits"
    finite = np.zeros((3, 8), dtype=np.float32)
    assert case_failure("prefill", compare_logits([finite], [finite]), TOLERANCES["fp32"]) is None
    one_inf = finite.copy()
    one_inf[1, 2] = np.inf
    assert compare_logits([finite], [one_inf])["non_finite_positions"] == 1  # the reference side counts too


def test_quantize_check_is_not_finite_when_the_export_side_is_nan() -> None:
    from mexport.optimize.quantize.report import compare_logits, non_finite_message

    good = np.zeros((4, 6), dtype=np.float32)
    bad = good.copy()
    bad[0, 0] = np.nan
    check = compare_logits([bad], [good])
    assert not check["finite"] and check["mean_kl"] is None and check["top1_agreement"] is None
    assert non_finite_message({**check, "prompts": 1}) == "the export model at 1 of 4 positions"
    assert "NaN" not in strict_json.dumps(check)


def test_no_compared_question_is_inconclusive_never_fail() -> None:
    from mexport.validate.stats import compare_metric

    empty = compare_metric("acc", [], [], [], [])
    verdict = parity_verdict([empty], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == INCONCLUSIVE and verdict.reasons == ("no question compared",)
    assert parity_verdict([], 1.0, 0.9).status == INCONCLUSIVE


def test_a_run_that_compared_nothing_never_exits_0() -> None:
    skipped = ParityResult("medqa", "engine", 1.0, 0.9, skipped_verdict("TensorRT is not installed"))
    for fail_on in ("parity", "inconclusive", "any"):
        report = _report([skipped], fail_on=fail_on)
        assert report.exit_code != 0 and report.outcome == "INCONCLUSIVE", fail_on
        assert report.summary()["outcome_note"] == "no candidate was compared with the reference on any question"
    assert _report([skipped], fail_on="parity").exit_code == 4
    assert _report([skipped], fail_on="never").exit_code == 0  # asked never to fail, but still not PASSED
    assert _report([skipped], fail_on="never").outcome == "INCONCLUSIVE"
    assert _report([], fail_on="parity").exit_code == 4


def test_declined_and_nan_reference_questions_are_left_out_of_the_comparison() -> None:
    from mexport.validate.runner import parity_results
    from mexport.validate.scoring import SkippedQuestion

    task = TaskInfo("medqa", "sample", None, "00" * 32, 3, 3)
    reference = [_score("a", [-1.0, -2.0]), _score("b", [math.nan, -2.0]), SkippedQuestion("c", "prompt too long")]
    candidate = [_score("a", [-1.0, -2.5]), _score("b", [-1.0, -2.0]), _score("c", [-1.0, -2.0])]
    candidate_info = BackendInfo("cand", "candidate", "/c", "ort")
    [result] = parity_results([task], [candidate_info], {"medqa": {REFERENCE_LABEL: reference, "cand": candidate}},
                              margin=5.0, recipe_margins={}, agreement_floor=0.9)
    assert result.metrics[0].n == 1
    assert result.skipped_questions == {"prompt too long": 1, "reference log-likelihood NaN/inf": 1}
    nothing = [SkippedQuestion(doc, "prompt too long") for doc in "abc"]
    [empty] = parity_results([task], [candidate_info], {"medqa": {REFERENCE_LABEL: nothing, "cand": candidate}},
                             margin=5.0, recipe_margins={}, agreement_floor=0.9)
    assert empty.verdict.status == INCONCLUSIVE and empty.mean_kl is None and empty.max_abs_loglik_delta is None


def test_a_task_the_reference_scored_nothing_of_is_an_input_error() -> None:
    from mexport.validate.runner import _check_reference_scored
    from mexport.validate.scoring import SkippedQuestion

    declined = [SkippedQuestion("a", "prompt 700 tokens > context 512")] * 2
    with pytest.raises(MexportError, match=r"medqa: the reference scored none of its 2 questions \(2 prompt 700"):
        _check_reference_scored({"medqa": {REFERENCE_LABEL: declined}})


def test_a_nan_candidate_fails_with_finite_drift_figures() -> None:
    from mexport.validate.runner import parity_results

    task = TaskInfo("medqa", "sample", None, "00" * 32, 2, 2)
    reference = [_score("a", [-1.0, -2.0]), _score("b", [-1.0, -2.0])]
    candidate = [_score("a", [math.nan, -2.0]), _score("b", [-1.0, -2.0])]
    candidate_info = BackendInfo("cand", "candidate", "/c", "ort")
    [result] = parity_results([task], [candidate_info], {"medqa": {REFERENCE_LABEL: reference, "cand": candidate}},
                              margin=50.0, recipe_margins={}, agreement_floor=0.0)
    assert result.verdict.status == FAIL and "non-finite" in result.verdict.reasons[0]
    assert result.mean_kl is not None and math.isfinite(result.mean_kl)


# ------------------------------------------------------------------------------------------ B: one option check

BAD_POLICIES = [
    ({"margin_points": math.inf}, "--margin inf: the margin must be a finite number"),
    ({"margin_points": math.nan}, "--margin nan: the margin must be a finite number"),
    ({"margin_points": 100.0}, "--margin 100: the margin must be a finite number"),
    ({"recipe_margins": {"int4wo": 2.0}}, "--margin-for int4wo=2: no quantization recipe 'int4wo'"),
    ({"recipe_margins": {"int4-wo": math.inf}}, "--margin-for int4-wo inf: the margin must be a finite number"),
    ({"agreement_floor": math.nan}, "--agreement-floor nan: expected a share between 0 and 1"),
    ({"fail_on": "sometimes"}, "--fail-on 'sometimes': expected one of"),
]


@pytest.mark.parametrize(("change", "message"), BAD_POLICIES)
def test_policy_values_are_refused_by_the_library(change: dict[str, Any], message: str) -> None:
    policy: dict[str, Any] = {"margin_points": 1.0, "agreement_floor": 0.9, "fail_on": "parity", "recipe_margins": {}}
    with pytest.raises(MexportError, match="^" + message.replace("(", r"\(")):
        check_policy(**{**policy, **change})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--margin-for", "int4wo=2"], "--margin-for int4wo=2: no quantization recipe 'int4wo'"),
        (["--margin", "inf"], "--margin inf: the margin must be a finite number"),
    ],
)
def test_cli_and_pipeline_refuse_the_same_option_values(tmp_path: Path, flags: list[str], message: str) -> None:
    """Refused before any model is opened (the reference path does not even exist), in both entry points."""
    validate = runner.invoke(
        app,
        ["validate", "--reference", str(tmp_path / "none"), "--candidate", str(tmp_path / "none"),
         "--tasks", "medqa", "-o", str(tmp_path / "r"), *flags],
    )
    assert validate.exit_code == 2 and message in validate.output, validate.output
    pipeline = runner.invoke(app, ["pipeline", "--model", "fixture:tiny-gemma2", "-o", str(tmp_path / "p"), *flags])
    assert pipeline.exit_code == 2 and message.split(": ", 1)[1] in pipeline.output, pipeline.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_opset_outside_what_the_exporter_writes_is_refused_everywhere(tmp_path: Path) -> None:
    from mexport.export.exporter import EXPORT_MAX_OPSET
    from mexport.pipeline import config_from

    cli = runner.invoke(app, ["onnx", str(tmp_path), "-o", str(tmp_path / "x"), "--opset", str(EXPORT_MAX_OPSET + 1)])
    assert cli.exit_code == 2 and f"opset {EXPORT_MAX_OPSET + 1} not supported; use 14..{EXPORT_MAX_OPSET}" in cli.output
    with pytest.raises(MexportError, match=f"export.opset: opset {EXPORT_MAX_OPSET + 1} not supported"):
        config_from({"model": "fixture:tiny-gemma2", "output": tmp_path, "opset": EXPORT_MAX_OPSET + 1})


# ------------------------------------------------------------------------------------------ C: the graph's math


def _int8_weight_only_matmul() -> tuple[bytes, np.ndarray, np.ndarray]:
    """DequantizeLinear(int8 weight, per column) -> MatMul, an input, and the product computed in numpy."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(256, 128)).astype(np.float32)
    scale = (np.abs(weight).max(0) / 127).astype(np.float32)
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 128])],
        [numpy_helper.from_array(quantized, "wq"), numpy_helper.from_array(scale, "ws"),
         numpy_helper.from_array(np.zeros(128, np.int8), "wz")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = rng.normal(size=(4, 256)).astype(np.float32)
    return model.SerializeToString(), x, x.astype(np.float64) @ (quantized.astype(np.float64) * scale)


def test_qdq_sessions_compute_the_graph_as_written() -> None:
    import onnxruntime as ort

    from mexport.runtime.ort import ort_session

    model, x, expected = _int8_weight_only_matmul()
    ours = ort_session(model, ["CPUExecutionProvider"], qdq=True).run(None, {"x": x})[0]
    assert np.abs(ours - expected).max() < 1e-4
    # ORT's default session quantizes the activations to int8 (MatMulNBits accuracy level 4): the trap avoided
    default = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(default - expected).max() > 1e-2


def test_fp8_on_an_onnxruntime_that_cannot_load_it_names_the_version() -> None:
    from mexport.runtime.ort import check_fp8_support

    old = types.SimpleNamespace(__version__="1.31.1")
    with pytest.raises(MissingDependencyError, match=r"onnxruntime 1\.31\.1 cannot load float8 Q/DQ") as caught:
        check_fp8_support(old, "fp8")
    assert caught.value.hint == "pip install 'onnxruntime>=1.32'"
    check_fp8_support(old, "int8")
    check_fp8_support(types.SimpleNamespace(__version__="1.32.0"), "fp8")


def test_reports_say_what_compute_ran(tmp_path: Path, tiny_export_fp32: Path) -> None:
    from mexport.runtime.ort import OrtDecoder

    model_dir = tmp_path / "quantized"
    shutil.copytree(tiny_export_fp32, model_dir)
    manifest = json.loads((model_dir / "mexport.json").read_text())
    manifest.update(kind="quantize", recipe={"name": "int8-wo", "params": {"weights": "int8"}})
    (model_dir / "mexport.json").write_text(json.dumps(manifest))
    decoder = OrtDecoder(model_dir)
    assert decoder.precision == (
        "int8-wo Q/DQ weights over fp32, fp32 compute (ONNX Runtime CPU, ORT_ENABLE_BASIC, Q/DQ computed as written)"
    )
    assert decoder.session_settings == {
        "providers": ["CPUExecutionProvider"],
        "graph_optimization": "ORT_ENABLE_BASIC",
        "config": {"session.qdq_matmulnbits_accuracy_level": "0"},
        "compute_dtype": "fp32",
    }
    assert OrtDecoder(tiny_export_fp32).session_settings["graph_optimization"] == "ORT_ENABLE_ALL"


# ------------------------------------------------------------------------------------------ D: no lost report


def test_validate_refuses_a_report_it_did_not_write(tmp_path: Path) -> None:
    from mexport.validate.runner import _check_output

    out = tmp_path / "reports"
    out.mkdir()
    (out / "report.md").write_text("# my own notes\n")
    with pytest.raises(MexportError, match="holds report.md not written by mexport") as caught:
        _check_output(out, overwrite=False)
    assert "--overwrite" in (caught.value.hint or "")
    assert _check_output(out, overwrite=True) == out.resolve()
    assert (out / "report.md").read_text() == "# my own notes\n"  # checking touched nothing


def test_validate_replaces_its_own_report_but_not_an_edited_one(tmp_path: Path) -> None:
    from mexport.validate.runner import _check_output

    out = tmp_path / "reports"
    (out).mkdir()
    (out / "notes.txt").write_text("kept")
    write_reports(_report([]), out)
    assert json.loads((out / WRITTEN_RECORD).read_text()).keys() >= {"report.json", "report.md"}
    assert _check_output(out, overwrite=False) == out.resolve()  # a re-run into its own report directory
    (out / "report.md").write_text("edited by hand\n")
    with pytest.raises(MexportError, match="holds report.md not written by mexport"):
        _check_output(out, overwrite=False)
    assert (out / "notes.txt").read_text() == "kept"


def test_a_second_validate_into_the_same_report_fails_at_once(tmp_path: Path) -> None:
    """Another process holds the report directory's lock (as a running validate does for its whole run)."""
    out = tmp_path / "reports"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import time; from mexport.fsutil import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = runner.invoke(
            app,
            ["validate", "--reference", str(tmp_path / "none"), "--candidate", str(tmp_path / "none"),
             "--tasks", "medqa", "--data", "medqa=sample", "-o", str(out)],
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 3 and "another mexport run is writing this output" in result.output


# ------------------------------------------------------------------------------------------ E: output contract


def _strict_loads(text: str) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_report_json_is_strict_and_says_which_logliks_were_not_finite() -> None:
    reference, candidate = [_score("a", [-1.0, -2.0])], [_score("a", [math.nan, -math.inf])]
    result = ParityResult("medqa", "cand", 1.0, 0.9, parity_verdict([], 1.0, 0.9, 1), (), math.nan, math.inf)
    report = _report([result])
    report.scores = {"medqa": {REFERENCE_LABEL: reference, "cand": candidate}}
    payload = _strict_loads(render_json(report))
    entry = payload["tasks"]["medqa"]["questions"][0]["backends"]["cand"]
    assert entry["logliks"] == [None, None] and entry["non_finite_logliks"] == {"0": "nan", "1": "-inf"}
    assert payload["results"][0]["mean_kl"] is None
    assert _strict_loads(strict_json.dumps({"x": [math.nan, math.inf, 1.5]})) == {"x": [None, None, 1.5]}


def test_manifests_and_cli_json_are_strict(tmp_path: Path) -> None:
    from mexport.manifest import write_manifest

    write_manifest(tmp_path, {"kind": "export", "report": {"max_abs": math.nan}})
    assert _strict_loads((tmp_path / "mexport.json").read_text())["report"]["max_abs"] is None


def test_a_pipe_in_a_candidate_name_stays_in_its_cell() -> None:
    backends = [BackendInfo(REFERENCE_LABEL, "reference", "/ckpt", "torch"),
                BackendInfo("a|b", "candidate", "/x|y", "ort", recipe="int8-wo")]
    markdown = render_markdown(_report([], backends))
    row = next(line for line in markdown.splitlines() if line.startswith("| a"))
    assert row == "| a\\|b | ort | int8-wo | – | – | `/x\\|y` |"
    assert row.replace("\\|", "").count("|") == 7  # six cells


def test_a_comparison_is_shown_with_the_digits_that_make_it_true() -> None:
    assert shown_apart(0.895, 0.90) == ("0.895", "0.900")
    assert shown_apart(0.5, 0.9) == ("0.50", "0.90")
    from mexport.validate.stats import compare_metric

    agree = [1] * 179 + [0] * 21  # 0.895 agreement on 200 questions
    metric = compare_metric("acc", [1] * 200, [1] * 200, [0] * 200, [0 if a else 1 for a in agree])
    verdict = parity_verdict([metric], margin_points=5.0, agreement_floor=0.90)
    assert verdict.status == FAIL and "agreement 0.895 < 0.900" in verdict.reasons


def test_quiet_validate_prints_no_summary_but_keeps_its_exit_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mexport.validate

    failing = ParityResult("medqa", "cand", 1.0, 0.9, parity_verdict([], 1.0, 0.9, non_finite=1))
    monkeypatch.setattr(mexport.validate, "validate", lambda *args, **kwargs: _report([failing]))
    args = ["validate", "--reference", "r", "--candidate", "c", "--tasks", "medqa", "-o", str(tmp_path)]
    loud = runner.invoke(app, args)
    quiet = runner.invoke(app, ["-q", *args])
    assert loud.exit_code == quiet.exit_code == 1
    assert "parity vs reference" in loud.stdout and quiet.stdout == ""


def test_tilde_is_the_home_directory_in_every_path_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["fixture", "tiny-gemma2", "~/fx"])
    assert result.exit_code == 0, result.output
    assert (home / "fx" / "config.json").is_file() and not (work / "~").exists()
    from mexport.pipeline import config_from

    (home / "calib.jsonl").write_text('{"text": "a calibration line"}\n')
    config = config_from({"model": "~/fx", "output": "~/out", "calib": "~/calib.jsonl"})
    assert (config.model, config.output, config.calib) == (str(home / "fx"), home / "out", str(home / "calib.jsonl"))


def test_a_config_with_more_layers_than_weights_is_refused_before_tracing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from mexport.checkpoint import resolve_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    layers = config["num_hidden_layers"]
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 200}))
    with pytest.raises(MexportError, match=f"says 200 layers, the safetensors hold {layers} \\(no weights for layers {layers}-199\\)"):
        resolve_checkpoint(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(MexportError, match="embedding model.embed_tokens.weight is"):
        resolve_checkpoint(checkpoint)


def test_a_manifest_that_no_longer_describes_its_graph_is_exit_3(tmp_path: Path, tiny_export_fp32: Path) -> None:
    from mexport.runtime.ort import OrtDecoder

    model_dir = tmp_path / "tampered"
    shutil.copytree(tiny_export_fp32, model_dir)
    manifest = json.loads((model_dir / "mexport.json").read_text())
    manifest["model_config"]["num_key_value_heads"] += 2
    (model_dir / "mexport.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="mexport.json does not describe this graph"):
        OrtDecoder(model_dir).activate()
    manifest = json.loads((tiny_export_fp32 / "mexport.json").read_text())
    for entry in manifest["io"]["inputs"]:
        if entry["name"].startswith("past_key_values."):
            entry["dtype"] = "float16"
    (model_dir / "mexport.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["generate", str(model_dir), "-p", "hi", "--max-new-tokens", "1"])
    assert result.exit_code == 3 and "dtype float16 in the manifest, float32 in the graph" in result.output


def test_not_enough_disk_space_is_an_environment_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10))
    with pytest.raises(EnvironmentFailure, match="not enough disk space for the export") as caught:
        check_free_space(tmp_path, 1000, "the export")
    assert caught.value.exit_code == 3 and caught.value.hint


def test_an_unreachable_hub_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    result = runner.invoke(app, ["onnx", "org/model", "-o", str(tmp_path / "x")])
    assert result.exit_code == 3, result.output
    assert "the Hugging Face Hub cannot be reached (huggingface.co:443: Connection refused)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
