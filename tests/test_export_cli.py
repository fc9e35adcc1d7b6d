"""`mexport onnx` / `mexport generate`: help text, one-line errors with exit 2, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mexport.cli import app

runner = CliRunner()


def test_onnx_help_lists_the_options() -> None:
    result = runner.invoke(app, ["onnx", "--help"], terminal_width=200)
    assert result.exit_code == 0
    options = ("--output", "--dtype", "--opset", "--revision", "--device", "--no-validate", "--overwrite", "--json")
    for option in (*options, "--full-logits", "--long-check"):
        assert option in result.output
    assert "Export a Gemma2, Llama or Qwen2 checkpoint to ONNX" in result.output


def test_generate_help() -> None:
    result = runner.invoke(app, ["generate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--prompt" in result.output and "--max-new-tokens" in result.output


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["onnx", "{tmp}/missing", "-o", "{tmp}/out"], "no such file or directory"),
        (["onnx", "{tmp}", "-o", "{tmp}/out"], "no config.json"),
        (["onnx", "{ckpt}", "-o", "{tmp}/out", "--dtype", "int4"], "unknown dtype 'int4'"),
        (["generate", "{tmp}", "--prompt", "hi"], "no mexport.json"),
    ],
)
def test_errors_are_one_line_with_exit_2(tiny_checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    filled = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in args]
    result = runner.invoke(app, filled, terminal_width=400)
    assert result.exit_code == 2, result.output
    errors = _error_lines(result.output)
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output


def test_existing_output_needs_overwrite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["onnx", str(tiny_checkpoint), "-o", str(tmp_path / "out")], terminal_width=400)
    assert result.exit_code == 2
    assert "output directory exists and is not empty" in _error_lines(result.output)[0]
    assert "--overwrite" in result.output


@pytest.mark.slow
def test_onnx_json_without_validation(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["-q", "onnx", str(tiny_checkpoint), "-o", str(out), "--no-validate", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["status"] == "not_validated" and manifest["validation"] is None
    assert manifest == json.loads((out / "mexport.json").read_text())


@pytest.mark.slow
def test_generate_prints_a_continuation_and_speed(tiny_export_bf16: Path) -> None:
    result = runner.invoke(app, ["generate", str(tiny_export_bf16), "--prompt", "The patient", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The patient")
    assert "tokens/s" in result.output
    as_json = runner.invoke(
        app, ["generate", str(tiny_export_bf16), "--prompt", "The patient", "--max-new-tokens", "5", "--json"]
    )
    payload = json.loads(as_json.stdout)
    assert 1 <= payload["new_tokens"] <= 5 and payload["tokens_per_s"] > 0
