"""First use, as a new user meets it: every error has a hint, defaults fit the model they are used on (and say
so), the terminal shows what a model wrote without obeying it, plots show the differences that decide a verdict,
and every figure README and docs quote is the one the regeneration script renders."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mexport import errors
from mexport.cli import app
from mexport.console import printable
from mexport.hardware import GpuInfo, Probe

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _json_error(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code != 0, result.output
    return json.loads(result.stdout)["error"]


# ---- every error carries a hint -------------------------------------------------------------------------------


def test_every_error_class_has_a_default_hint() -> None:
    classes = [value for value in vars(errors).values()
               if inspect.isclass(value) and issubclass(value, errors.MexportError)]
    assert len(classes) >= 5
    for cls in classes:
        assert cls("something went wrong").hint, cls.__name__
        assert cls("x", hint="do this").hint == "do this"


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["onnx", "/nonexistent/model", "-o", "{tmp}/x"], "no such file or directory", "local checkpoint directory"),
        (["quantize", "{export}", "-o", "{tmp}/q", "--recipe", "int9"], "unknown quantization recipe", "docs/quantize"),
        (["engine", "{export}", "-o", "{tmp}/e", "--plan", "--max-context", "100000"], "exceeds the model's",
         "--max-context 512 or less"),
    ],
)
def test_the_errors_readme_promises_hints_for_have_them(
    args: list[str], message: str, hint: str, tmp_path: Path, tiny_export_fp32: Path
) -> None:
    args = [arg.replace("{tmp}", str(tmp_path)).replace("{export}", str(tiny_export_fp32)) for arg in args]
    error = _json_error(args)
    assert message in error["message"] and hint in error["hint"], error


def test_a_hub_id_that_cannot_be_fetched_has_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Failed to resolve 'huggingface.co'\nTraceback line 2")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    error = _json_error(["onnx", "no-such-org/no-such-model", "-o", str(tmp_path / "x")])
    assert "the Hugging Face Hub cannot be reached" in error["message"] and "\n" not in error["message"]
    assert "huggingface-cli download" in error["hint"]


# ---- defaults adapt to the model, and say so --------------------------------------------------------------------


def test_engine_plan_on_the_fixture_works_with_default_options(tiny_export_fp32: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["engine", str(tiny_export_fp32), "-o", str(tmp_path / "plan"), "--plan", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["settings"]["max_context"] == 512  # the fixture's max_position_embeddings, not 4096
    assert any("--max-context defaults to 512" in note for note in plan["notes"])
    text = runner.invoke(app, ["engine", str(tiny_export_fp32), "-o", str(tmp_path / "plan2"), "--plan"])
    assert text.exit_code == 0 and "--max-context defaults to 512" in text.stderr


def test_int4_default_block_is_the_largest_that_fits_every_width(capsys: pytest.CaptureFixture[str]) -> None:
    from mexport.optimize.quantize.api import default_block_size

    def layers(*widths: int) -> list:
        return [SimpleNamespace(in_features=width) for width in widths]

    assert default_block_size(layers(3584, 14336)) == 128  # the 9B: the default itself, said nothing
    assert default_block_size(layers(64, 256)) == 128  # narrower than a block: one block per row
    assert capsys.readouterr().err == ""
    assert default_block_size(layers(96, 288)) == 32
    assert "--block-size defaults to 32: 128 does not divide the input width of 96, 288" in capsys.readouterr().err
    assert default_block_size(layers(200)) == 8


def test_onnx_defaults_to_bf16_everywhere() -> None:
    from mexport.export import export_onnx
    from mexport.formats import DEFAULT_EXPORT_DTYPE
    from mexport.pipeline import PipelineConfig

    assert DEFAULT_EXPORT_DTYPE == "bf16"
    assert inspect.signature(export_onnx).parameters["dtype"].default == DEFAULT_EXPORT_DTYPE
    assert PipelineConfig.model_fields["dtype"].default == DEFAULT_EXPORT_DTYPE
    help_text = " ".join(runner.invoke(app, ["onnx", "--help"]).output.split())
    assert "bf16 (default" in help_text


# ---- what the terminal shows ----------------------------------------------------------------------------------


def test_doctor_prints_the_gpu_extra_and_never_calls_ort_cuda_ok_without_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mexport import console, doctor

    monkeypatch.setattr(console.console, "width", 400)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0
    assert "pip install 'mexport[gpu]'" in result.stderr  # rich markup must not eat "[gpu]"
    no_cuda = Probe((), ("CPUExecutionProvider",), None, None, None)
    cuda = Probe((GpuInfo("NVIDIA L4", 23034 << 20, (8, 9)),), ("CUDAExecutionProvider",), None, None, None)
    assert {check.status for check in doctor.check_ort_cuda_recipes(no_cuda)} == {"info"}
    with_cuda = {check.name: check.status for check in doctor.check_ort_cuda_recipes(cuda)}
    assert with_cuda["onnxruntime-cuda recipes (fp16)"] == "ok"


def test_generate_escapes_what_a_terminal_would_obey(monkeypatch: pytest.MonkeyPatch, tiny_export_fp32: Path) -> None:
    from mexport import export
    from mexport.export.generate import GenerationResult

    assert printable("a\x1b[2Jb\x07\u202e\nc\td") == "a\\x1b[2Jb\\x07\\u202e\nc\td"
    raw = GenerationResult("hi", " \x1b]0;pwned\x07 done", 2, 3, 0.1, "fp32")
    monkeypatch.setattr(export, "generate_text", lambda *args, **kwargs: raw)
    result = runner.invoke(app, ["generate", str(tiny_export_fp32), "-p", "hi"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\\x1b]0;pwned\\x07 done" in result.stdout


# ---- plots show what decides a verdict ------------------------------------------------------------------------


def _report_with_acc_norm():  # type: ignore[no-untyped-def]
    from test_reports import make_report

    report = make_report()
    report.tasks = [dataclasses.replace(task, metrics=("acc", "acc_norm")) for task in report.tasks]
    report.results = [
        dataclasses.replace(r, metrics=(*r.metrics, dataclasses.replace(r.metrics[0], metric="acc_norm")))
        if r.metrics else r
        for r in report.results
    ]
    return report


def test_parity_plot_tells_candidates_apart_by_colour_and_gives_margins_and_acc_norm() -> None:
    from mexport.validate.reports import _MARKERS, parity_figure

    axes = parity_figure(_report_with_acc_norm()).axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend[:3] == ["good (±5 pts)", "broken (±5 pts)", "unsure (±5 pts)"]
    handles = axes.get_legend().legend_handles
    assert len({handle.get_color() for handle in handles[:3]}) == 3  # colours, not only marker shapes
    points = [line for line in axes.lines if line.get_marker() in _MARKERS]  # not the error bars' caps
    hollow = [line for line in points if line.get_markerfacecolor() == "white"]
    assert hollow and len(hollow) == len(points) - len(hollow)  # one acc_norm point beside each acc point
    verdict_letters = {text.get_text() for text in axes.texts}
    assert verdict_letters == {"P", "F", "I"}


def test_accuracy_plot_zooms_to_the_data() -> None:
    from mexport.validate.reports import accuracy_figure

    axes = accuracy_figure(_report_with_acc_norm()).axes[0]
    low, high = axes.get_ylim()
    assert low > 0 or high < 100  # not the 0-100 % axis that hides a 2-point difference
    assert "zoomed" in axes.get_ylabel()


# ---- README ----------------------------------------------------------------------------------------------------


def test_quick_start_installs_the_cpu_build_of_torch_first() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("## The stages")]
    cpu_line = quick_start.index("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert cpu_line < quick_start.index("pip install -e '.[dev]'")


# ---- quoted figures are the rendered ones ----------------------------------------------------------------------


def _regenerator():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("regenerate_figures", ROOT / "tools" / "regenerate_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_quoted_figure_is_what_figures_json_renders() -> None:
    """README/docs figures live in marked regions written by tools/regenerate_figures.py from docs/figures.json; a
    hand edit or a stale region fails here (regenerate with the script, see its docstring)."""
    regenerate = _regenerator()
    figures = json.loads(regenerate.FIGURES.read_text())
    found = set()
    for document in regenerate.DOCUMENTS:
        text = document.read_text()
        assert regenerate.render_regions(text, figures) == text, f"{document.name}: a figure region is stale"
        found |= set(regenerate.regions(text))
    assert found == set(regenerate.RENDERERS)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MEXPORT_CHECK_FIGURES") != "1",
    reason="re-runs the README demo and the quantize table (minutes on 2 cores): set MEXPORT_CHECK_FIGURES=1, or run "
    "`python tools/regenerate_figures.py --check`",
)
def test_regenerated_figures_match_the_recorded_ones() -> None:
    """Re-runs the demo and the quantize table and compares every deterministic figure with docs/figures.json."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "regenerate_figures.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
