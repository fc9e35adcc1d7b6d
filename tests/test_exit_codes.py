"""The exit-code contract, for every command: bad input exits 2, I/O and environment failures 3, never with a
traceback unless ``-v``; ``-q`` never hides the error and ``--json`` prints a JSON error object on stdout."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import EXIT_CODES

runner = CliRunner()

# command -> (arguments with {tmp}, a fragment of the one-line error); every command of `mexport --help`
BAD_INPUT = {
    "fixture": (["fixture", "nope", "{tmp}/fx"], "unknown fixture 'nope'"),
    "onnx": (["onnx", "/nonexistent", "-o", "{tmp}/x"], "/nonexistent: no such file or directory"),
    "generate": (["generate", "/nonexistent", "-p", "hi"], "/nonexistent: not a directory"),
    "quantize": (["quantize", "/nonexistent", "-o", "{tmp}/q", "--recipe", "int8-wo"], "/nonexistent: not a directory"),
    "engine": (["engine", "/nonexistent", "-o", "{tmp}/e", "--plan"], "/nonexistent: not a directory"),
    "validate": (
        ["validate", "--reference", "/nonexistent", "--candidate", "/nonexistent", "--tasks", "medqa",
         "--data", "medqa=sample", "-o", "{tmp}/r"],
        "/nonexistent: no such checkpoint directory",
    ),
    "merge-reports": (["merge-reports", "/nonexistent", "-o", "{tmp}/m"], "/nonexistent: no partial report"),
    "pipeline": (["pipeline", "--model", "fixture:nope", "-o", "{tmp}/p"], "unknown fixture 'fixture:nope'"),
    "doctor": (["doctor", "--path", "{tmp}/file"], "is a file; pass the directory"),
    "lm-eval": (["lm-eval", "/nonexistent", "--tasks", "medqa"], "/nonexistent: not a model"),
}


def _args(args: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "file").write_text("a file, not a directory")
    return [arg.replace("{tmp}", str(tmp_path)) for arg in args]


def test_every_command_is_covered() -> None:
    commands = {command.name for command in app.registered_commands}
    assert commands == set(BAD_INPUT)


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_even_quiet(command: str, tmp_path: Path) -> None:
    args, message = BAD_INPUT[command]
    result = runner.invoke(app, ["-q", *_args(args, tmp_path)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and message in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_json_failure_prints_an_error_object_on_stdout(command: str, tmp_path: Path) -> None:
    args, message = BAD_INPUT[command]
    result = runner.invoke(app, [*_args(args, tmp_path), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 2 and error["kind"] == "input" and message in error["message"]
    assert error["hint"], "README promises a hint with every error"


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_verbose_shows_the_traceback(command: str, tmp_path: Path) -> None:
    args, message = BAD_INPUT[command]
    result = runner.invoke(app, ["-v", *_args(args, tmp_path)])
    assert result.exit_code == 2 and "Traceback" in result.stderr and message in result.stderr


def test_usage_errors_exit_2_and_report_json() -> None:
    result = runner.invoke(app, ["doctor", "--bogus", "--json"])
    error = json.loads(result.stdout)["error"]
    assert result.exit_code == 2 and error["kind"] == "usage" and "mexport doctor --help" in error["hint"]


def test_help_and_errors_module_agree_on_the_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert list(EXIT_CODES) == [0, 1, 2, 3, 4, 5]
    text = " ".join(result.output.split())
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in readme


# ---- environment and I/O failures: exit 3, never a traceback ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "hint"),
    [(errno.ENOSPC, "free disk space"), (errno.EACCES, "permissions"), (errno.EROFS, "read-only")],
)
def test_full_read_only_or_forbidden_disk_exits_3(
    code: int, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mexport.fsutil

    def fail(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(mexport.fsutil.Path, "write_bytes", fail)
    result = runner.invoke(app, ["pipeline", "--model", "fixture:tiny-gemma2", "-o", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "environment" and hint in error["hint"] and "Traceback" not in result.output


def test_output_under_a_file_exits_3_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for args in (
        ["fixture", "tiny-gemma2", str(tmp_path / "file" / "out")],
        ["pipeline", "--model", "fixture:tiny-gemma2", "-o", str(tmp_path / "file" / "run")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 3, result.output
        assert "is a file" in result.stderr and "Traceback" not in result.output


def test_truncated_data_file_exits_3(tmp_path: Path, tiny_export_fp32: Path) -> None:
    export = Path(shutil.copytree(tiny_export_fp32, tmp_path / "export"))
    with open(export / "model.onnx.data", "r+b") as handle:
        handle.truncate(1000)
    result = runner.invoke(app, ["quantize", str(export), "-o", str(tmp_path / "q"), "-r", "int8-wo", "--json"])
    assert result.exit_code == 3
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "integrity" and "model.onnx.data: 1000 bytes" in error["message"]


def test_gpu_memory_nan_is_bad_input(tmp_path: Path, tiny_export_fp32: Path) -> None:
    result = runner.invoke(
        app,
        ["engine", str(tiny_export_fp32), "-o", str(tmp_path / "e"), "--plan", "--max-context", "512",
         "--max-input-len", "256", "--gpu-memory", "nan"],
    )
    assert result.exit_code == 2 and "--gpu-memory must be a positive number" in result.stderr
    assert "Traceback" not in result.output


def test_not_enough_disk_space_for_an_export_exits_3(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    result = runner.invoke(app, ["onnx", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "environment" and "not enough disk space" in error["message"] and error["hint"]


def test_a_modified_quantize_input_manifest_exits_3(tmp_path: Path, tiny_export_fp32: Path) -> None:
    export = Path(shutil.copytree(tiny_export_fp32, tmp_path / "export"))
    manifest = json.loads((export / "mexport.json").read_text())
    manifest["io"]["outputs"][0]["name"] = "scores"
    (export / "mexport.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["quantize", str(export), "-o", str(tmp_path / "q"), "-r", "int8-wo", "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "integrity" and "does not describe this graph" in error["message"]
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["onnx", "{tmp}", "-o", "{tmp}/x", "--opset", "24"], "opset 24 not supported; use 14..23"),
        (["validate", "--reference", "{tmp}", "--candidate", "{tmp}", "--tasks", "medqa", "-o", "{tmp}/r",
          "--margin", "inf"], "--margin inf: the margin must be a finite number"),
        (["validate", "--reference", "{tmp}", "--candidate", "{tmp}", "--tasks", "medqa", "-o", "{tmp}/r",
          "--margin-for", "int4wo=2"], "no quantization recipe 'int4wo'"),
    ],
)
def test_option_values_the_pipeline_refuses_are_refused_on_the_cli(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["-q", *_args(args, tmp_path)])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
