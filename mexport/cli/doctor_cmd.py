"""`mexport doctor`: report what this machine can run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mexport.cli import app, emit_json, json_option
from mexport.console import console
from mexport.errors import MexportError

STYLE = {"ok": "green", "missing": "red", "warn": "yellow", "info": "cyan"}


@app.command("doctor")
def doctor(
    path: Path = typer.Option(Path("."), "--path", help="Where exports would be written (checks free disk there)."),
    as_json: bool = json_option(),
) -> None:
    """Check Python, packages, ONNX Runtime providers, GPUs, TensorRT, disk and RAM for each stage."""
    from mexport.doctor import as_dicts, diagnose

    if path.exists() and not path.is_dir():
        raise MexportError(f"--path {path}: is a file; pass the directory exports would be written to")
    checks = diagnose(path)
    if as_json:
        emit_json(as_dicts(checks))
        return
    table = Table(title="mexport doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        style = STYLE.get(check.status, "")
        table.add_row(check.name, f"[{style}]{check.status}[/{style}]", check.detail, check.fix)
    console.print(table, soft_wrap=False)
