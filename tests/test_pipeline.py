"""`mexport pipeline`: config parsing, the run on the learned tiny model end to end, resume and --force."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import MexportError
from mexport.pipeline import PipelineConfig, config_from, load_config, run_pipeline

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_configs_parse_with_every_table() -> None:
    tiny = load_config(EXAMPLES / "pipeline-tiny.toml")
    assert tiny.model == "fixture:learned-gemma2"
    assert tiny.recipes == ["fp8", "int8-sq", "int8-wo", "int4-wo"]
    assert tiny.max_context == 512 and tiny.target == "l4-24gb"
    assert tiny.data == {task: "demo" for task in ("medmcqa", "medqa", "pubmedqa", "afrimedqa")}
    assert tiny.margin == 5.0 and tiny.recipe_margins == {"int4-wo": 2.0} and tiny.fail_on == "inconclusive"
    assert tiny.output == (EXAMPLES.parent / "out" / "pipeline-tiny").resolve()
    real = load_config(EXAMPLES / "pipeline-meditron.toml")
    assert real.model == "OpenMeditron/Meditron3-Gemma2-9B" and real.engine == "build" and real.data == {}


def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    config = load_config(EXAMPLES / "pipeline-tiny.toml", {"dtype": "fp32", "recipes": ["int8-wo"], "limit": None})
    assert config.dtype == "fp32" and config.recipes == ["int8-wo"] and config.limit is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model = "x"\noutput = "o"\n[export]\ndtpye = "bf16"\n', "unknown setting 'export.dtpye'"),
        ('model = "x"\n[export\n', "invalid TOML"),
        ('[export]\ndtype = "bf16"\n', "pipeline needs model and output"),
        ('model = "fixture:huge"\noutput = "o"\n', "unknown fixture 'fixture:huge'"),
        ('model = "x"\noutput = "o"\n[engine]\nmode = "sometimes"\n', "engine mode 'sometimes' is not one of"),
        ('model = "x"\noutput = "o"\n[quantize]\nrecipes = ["int3"]\n', "unknown quantization recipe 'int3'"),
        ('model = "x"\noutput = "o"\n[validate]\ntasks = ["usmle"]\n', "unknown task 'usmle'"),
        ('model = "x"\noutput = "o"\n[export]\ndtype = "int8"\n', "unknown dtype 'int8'"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MexportError, match=message):
        load_config(path)
    result = runner.invoke(app, ["pipeline", str(path)])
    assert result.exit_code == 2
    assert message.split("'")[0] in result.output and "Traceback" not in result.output


def test_refuses_an_output_that_is_not_a_pipeline_output(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(MexportError, match="holds no pipeline-state.json"):
        run_pipeline(PipelineConfig(model="fixture:tiny-gemma2", output=tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _small(output: Path, **changes: object) -> PipelineConfig:
    values = {
        "model": "fixture:learned-gemma2", "output": output, "dtype": "fp32", "recipes": ["int8-wo"],
        "engine": "auto", "max_batch": 4, "max_input_len": 256, "max_context": 512, "tasks": ["medmcqa"],
        "data": {"medmcqa": "sample"}, "limit": 12, "recipe_margins": {"int8-wo": 50.0}, "agreement_floor": 0.75,
        "margin": 50.0,  # 8 to 12 questions resolve ±24 to ±32 points at best
    }
    return config_from({**values, **changes})


@pytest.mark.slow
def test_pipeline_end_to_end_then_resume_after_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    # the first run crashes in the validate step: everything before it is finished
    import mexport.validate

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash during scoring")

    with monkeypatch.context() as patch:
        patch.setattr(mexport.validate, "validate", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_pipeline(_small(out))
    state = json.loads((out / "pipeline-state.json").read_text())["steps"]
    assert state["quantize:int8-wo"]["status"] == "done" and state["validate"]["status"] == "running"

    result = run_pipeline(_small(out))
    statuses = {step.name: step.status for step in result.steps}
    assert statuses["checkpoint"] == "resumed" and statuses["export"] == "resumed"
    assert statuses["quantize:int8-wo"] == "resumed" and statuses["validate"] == "done"
    # no TensorRT here: plans are written and the engine builds are reported as skipped with the reason
    assert statuses["engine-plan:onnx-fp32"] == "resumed"  # written before the crash
    skipped = next(step for step in result.steps if step.name == "engine:onnx-fp32")
    assert skipped.status == "skipped" and "TensorRT" in skipped.detail
    assert (out / "engine-onnx-fp32" / "plan.json").is_file()
    assert not result.failed
    verdicts = {(row["task"], row["candidate"]): row["verdict"] for row in result.validation["results"]}
    assert set(verdicts.values()) == {"pass"}, verdicts

    # combined reports: Markdown with the steps and the parity tables, JUnit with one case per step
    markdown = (out / "pipeline.md").read_text()
    assert "| export | resumed |" in markdown and "medmcqa" in markdown
    suite = ElementTree.parse(out / "pipeline-junit.xml").getroot()
    assert int(suite.get("tests")) == len(result.steps)
    assert int(suite.get("skipped")) == sum(step.status == "skipped" for step in result.steps)
    assert (out / "report" / "junit.xml").is_file() and (out / "report" / "report.md").is_file()

    # a re-run does nothing; changing one setting redoes that step and what depends on it only
    again = run_pipeline(_small(out))
    assert {s.status for s in again.steps if s.name != "engine:onnx-fp32" and s.name != "engine:quant-int8-wo"} == {
        "resumed"
    }
    # a damaged output is never trusted from its marker: the step runs again
    (out / "quant-int8-wo" / "model.onnx").unlink()
    with open(out / "onnx-fp32" / "model.onnx.data", "r+b") as handle:
        handle.truncate(100)
    repaired = {s.name: s.status for s in run_pipeline(_small(out)).steps}
    assert repaired["export"] == "done" and repaired["quantize:int8-wo"] == "done"
    changed = {s.name: s.status for s in run_pipeline(_small(out, limit=8)).steps}
    assert changed["export"] == "resumed" and changed["quantize:int8-wo"] == "resumed"
    assert changed["validate"] == "done"

    # --force through the CLI redoes everything and prints JSON
    cli = runner.invoke(
        app,
        ["pipeline", "--model", "fixture:learned-gemma2", "-o", str(out), "--dtype", "fp32", "--recipe", "int8-wo",
         "--max-batch", "4", "--max-input-len", "256", "--max-context", "512", "--tasks", "medmcqa",
         "--data", "medmcqa=sample", "--limit", "8", "--margin", "50", "--margin-for", "int8-wo=50",
         "--agreement-floor", "0.75",
         "--force", "--json"],
    )
    assert cli.exit_code == 0, cli.output
    payload = json.loads(cli.stdout)
    assert {s["status"] for s in payload["steps"]} <= {"done", "skipped"}
    assert payload["failed"] is False


def test_every_config_problem_is_listed_before_any_step(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'model = "no/such/dir"\noutput = "o"\n[quantize]\nrecipes = "int8-wo"\ncalib = "missing.jsonl"\n'
        '[engine]\nmax_batch = 1.5\nmax_context = 0\ngpu_memory_gb = nan\n'
        '[validate]\nmargin = -1.0\ntasks = ["medqa"]\ndata = { medqa = "missing.jsonl" }\nlimit = "ten"\n'
    )
    result = runner.invoke(app, ["pipeline", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    for problem in (
        "pipeline config has 8 problems",
        "model: no/such/dir: no such checkpoint directory",
        "quantize.calib: calibration file not found",
        "engine.max_batch: Input should be a valid integer (got 1.5)",
        "engine.max_context: Input should be greater than or equal to 1 (got 0)",
        "engine.gpu_memory_gb: Input should be a finite number",
        "validate.margin: margin -1: the margin must be a finite number of accuracy points above 0 and below 100",
        "validate.data: data file for medqa not found",
        "validate.limit: Input should be a valid integer (got 'ten')",
    ):
        assert problem in result.output, (problem, result.output)
    assert not (tmp_path / "o").exists()


def test_one_recipe_as_a_string_and_flags_share_the_checks(tmp_path: Path) -> None:
    config = config_from({"model": "fixture:tiny-gemma2", "output": tmp_path, "recipes": "int8-wo"})
    assert config.recipes == ["int8-wo"]
    with pytest.raises(MexportError, match="config: --max-input-len 600 is larger than --max-context 512"):
        config_from({"model": "fixture:tiny-gemma2", "output": tmp_path}, {"max_input_len": 600, "max_context": 512})
    cli = runner.invoke(app, ["pipeline", "--model", "fixture:tiny-gemma2", "-o", str(tmp_path / "o"),
                              "--gpu-memory", "nan", "--max-batch", "0", "--json"])
    assert cli.exit_code == 2
    error = json.loads(cli.stdout)["error"]
    assert "engine.gpu_memory_gb" in error["message"] and "engine.max_batch" in error["message"]


def test_corrupt_pipeline_state_is_an_environment_failure(tmp_path: Path) -> None:
    (tmp_path / "pipeline-state.json").write_text("{not json")
    result = runner.invoke(app, ["pipeline", "--model", "fixture:tiny-gemma2", "-o", str(tmp_path)])
    assert result.exit_code == 3 and "corrupt pipeline state" in result.output and "Traceback" not in result.output


def test_resume_verifies_outputs_and_reruns_damaged_steps(tmp_path: Path) -> None:
    from mexport.manifest import file_records, write_manifest
    from mexport.pipeline import _Runner

    config = config_from({"model": "fixture:tiny-gemma2", "output": tmp_path / "run"})
    target = tmp_path / "run" / "artifact"
    runs: list[str] = []

    def write(content: bytes = b"weights") -> str:
        runs.append("ran")
        target.mkdir(parents=True, exist_ok=True)
        (target / "model.onnx.data").write_bytes(content)
        write_manifest(target, {"kind": "export", "files": file_records(target)})
        return "written"

    def run_step(action=write) -> tuple[str, str]:  # (status, hash handed downstream)
        runner_ = _Runner(config, force=False)
        digest = runner_.step("export", {"a": 1}, target, action)
        return runner_.steps[-1].status, digest

    first = run_step()
    assert first[0] == "done" and run_step() == ("resumed", first[1]) and len(runs) == 1
    with open(target / "model.onnx.data", "r+b") as handle:
        handle.truncate(3)
    assert run_step() == ("done", first[1]) and len(runs) == 2  # truncated: ran again, same result downstream
    (target / "model.onnx.data").unlink()
    changed = run_step(lambda: write(b"other weights"))
    assert changed[0] == "done" and changed[1] != first[1]  # a different output invalidates what depends on it
    (target / "mexport.json").unlink()
    assert run_step()[0] == "done"


@pytest.mark.parametrize(
    ("outcome", "failed", "step_status", "code"),
    [("passed", False, "done", 0), ("inconclusive", True, "done", 4), ("failed", True, "done", 1),
     ("inconclusive", True, "failed", 1), ("inconclusive", False, "done", 0)],
)
def test_pipeline_exit_code_follows_the_validation_outcome(
    tmp_path: Path, outcome: str, failed: bool, step_status: str, code: int
) -> None:
    from mexport.pipeline import PipelineResult, StepRecord

    result = PipelineResult(tmp_path, [StepRecord("export", step_status)], {"outcome": outcome}, failed)
    assert result.exit_code == code


def test_gpu_validation_routes_quantized_models_cuda_cannot_run_to_their_engines(tmp_path: Path) -> None:
    from mexport.pipeline import _Runner, _runs_on_validate_device

    runner_ = _Runner(config_from({"model": "fixture:tiny-gemma2", "output": tmp_path, "device": "cuda"}), False)
    assert _runs_on_validate_device(runner_, runner_.config, "onnx-bf16", has_engine=True)
    assert not _runs_on_validate_device(runner_, runner_.config, "quant-fp8", has_engine=True)
    assert not _runs_on_validate_device(runner_, runner_.config, "quant-int4-wo", has_engine=False)
    skipped = {step.name: step.detail for step in runner_.steps}
    assert "bfloat16 scales" in skipped["validate-ort:quant-fp8"]
    assert skipped["validate-ort:quant-fp8"].endswith("its TensorRT engine is validated instead")
    assert skipped["validate-ort:quant-int4-wo"].endswith("no engine was built (engine.mode)")
    on_cpu = _Runner(config_from({"model": "fixture:tiny-gemma2", "output": tmp_path / "cpu"}), False)
    assert _runs_on_validate_device(on_cpu, on_cpu.config, "quant-fp8", has_engine=False) and not on_cpu.steps
