"""The package imports light, the CLI lists every stage, and `doctor` reports this machine."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from mexport import __version__
from mexport.cli import app
from mexport.doctor import Check, check_tensorrt, diagnose
from mexport.hardware import probe

runner = CliRunner()


def test_importing_mexport_and_cli_skips_heavy_modules() -> None:
    code = (
        "import sys, mexport, mexport.cli;"
        "print([m for m in ('torch','onnxruntime','tensorrt','transformers','onnx') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mexport {__version__}"


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("fixture", "doctor"):
        assert command in result.stdout


def test_fixture_unknown_name_is_one_line_error(tmp_path) -> None:
    result = runner.invoke(app, ["fixture", "huge-gemma2", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown fixture 'huge-gemma2'; available: tiny-gemma2" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_doctor_json_reports_this_machine() -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["python"]["status"] == "ok"
    assert checks["onnxruntime"]["status"] == "ok"
    assert {"disk", "ram", "tensorrt", "polygraphy"} <= checks.keys()
    for check in checks.values():
        assert check["status"] in {"ok", "missing", "warn", "info"}
        if check["status"] == "missing":
            assert check["fix"], f"{check['name']} is missing but gives no fix"


def test_doctor_without_gpu_says_what_still_works(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = [c for c in diagnose() if c.name.startswith("cuda")]
    assert cuda == [
        Check(
            "cuda",
            "missing",
            "no CUDA GPU visible (export, quantize, ORT-CPU validation and `engine --plan` still work)",
            "engines need an NVIDIA GPU with CUDA drivers",
        )
    ]


def test_doctor_reports_stub_only_tensorrt_as_not_installed(monkeypatch) -> None:
    import types

    stub = types.ModuleType("tensorrt")  # like the namespace package tensorrt-stubs leaves behind: no __file__
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    trt = next(c for c in check_tensorrt(probe()) if c.name == "tensorrt")
    assert trt.status == "info"  # not a fault: CI installs the stubs for mypy
    assert trt.detail == "TensorRT not installed (only type stubs)"
    assert "mexport[gpu]" in trt.fix


def test_doctor_says_which_recipes_onnx_runtime_cuda_runs() -> None:
    checks = {check.name: check for check in diagnose()}
    bf16 = checks["onnxruntime-cuda recipes (bf16)"]
    assert bf16.status == "info" and "int4-wo" in bf16.detail and "bfloat16 scales" in bf16.detail
    assert "TensorRT engine" in bf16.fix
    # fp16 has no gap, but this machine has no CUDA provider with a GPU: the table is information, not "ok"
    fp16 = checks["onnxruntime-cuda recipes (fp16)"]
    assert fp16.status == "info" and "this machine has no ONNX Runtime CUDA provider with a GPU" in fp16.detail
