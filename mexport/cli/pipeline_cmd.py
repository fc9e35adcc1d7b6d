"""`mexport pipeline`: export → quantize → engine → validate in one resumable run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mexport.cli import app, emit_json, run
from mexport.console import console
from mexport.errors import EXIT_PARITY_FAILED


def _parse_pairs(pairs: list[str] | None, what: str, cast=str) -> dict | None:
    if not pairs:
        return None
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"{what} must look like KEY=VALUE, got {pair!r}")
        parsed[key] = cast(value)
    return parsed


@app.command("pipeline")
def pipeline(
    config: Path | None = typer.Argument(None, help="Pipeline TOML file (see examples/pipeline-tiny.toml)."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint dir, hub id, or fixture:tiny-gemma2 / fixture:learned-gemma2."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Pipeline output directory."),
    dtype: str | None = typer.Option(None, "--dtype", help="Export dtype: fp32, bf16 or fp16."),
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Quantization recipe (repeatable): fp8, int8-sq, int8-wo, int4-wo."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration JSONL/text file (default: the shipped MCQ samples)."),
    engine: str | None = typer.Option(None, "--engine", help="auto (build when TensorRT + GPU, else plan), build, plan or off."),
    target: str | None = typer.Option(None, "--target", help="Deployment GPU for the engine memory check, e.g. h100-80gb."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks: medmcqa,medqa,pubmedqa,afrimedqa."),
    data: list[str] | None = typer.Option(None, "--data", help="TASK=FILE (or TASK=sample), repeatable."),
    limit: int | None = typer.Option(None, "--limit", help="Questions per task."),
    device: str | None = typer.Option(None, "--backend-device", help="Scoring device: cpu or cuda."),
    margin: float | None = typer.Option(None, "--margin", help="Parity margin in accuracy points."),
    fail_on: str | None = typer.Option(None, "--fail-on", help="parity, any or never."),
    force: bool = typer.Option(False, "--force", help="Redo every step even when its output is up to date."),
    as_json: bool = typer.Option(False, "--json", help="Print the pipeline result as JSON on stdout."),
) -> None:
    """Run export → quantize → engine → validate, skipping steps whose outputs are up to date."""
    from mexport.pipeline import config_from, load_config, run_pipeline

    overrides = {
        "model": model, "output": output, "dtype": dtype, "recipes": recipe or None, "calib": calib,
        "engine": engine, "target": target, "tasks": tasks.split(",") if tasks else None,
        "data": _parse_pairs(data, "--data"), "limit": limit, "device": device, "margin": margin,
        "fail_on": fail_on,
    }

    def _run():
        settings = load_config(config, overrides) if config else config_from({}, overrides)
        return run_pipeline(settings, force=force)

    result = run(_run)
    if as_json:
        emit_json(result.to_dict())
    else:
        table = Table(title=f"mexport pipeline → {result.output}")
        for column in ("step", "status", "seconds", "detail"):
            table.add_column(column, overflow="fold")
        for step in result.steps:
            table.add_row(step.name, step.status, f"{step.seconds:.1f}", step.detail)
        console.print(table)
        console.print(f"reports: {result.output / 'pipeline.md'}, {result.output / 'report'}")
    if result.failed:
        raise typer.Exit(EXIT_PARITY_FAILED)
