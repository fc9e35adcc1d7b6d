"""`mexport pipeline`: export → quantize → engine → validate in one resumable run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mexport.cli import app, emit_json, exit_with, json_option, parse_assignments, parse_margins
from mexport.console import console
from mexport.validate.verdict import FAIL_ON_HELP


@app.command("pipeline")
def pipeline(
    config: Path | None = typer.Argument(None, help="Pipeline TOML file (see examples/pipeline-tiny.toml)."),
    model: str | None = typer.Option(
        None, "--model", help="Checkpoint dir, hub id, or fixture:NAME (tiny-gemma2, learned-gemma2, tiny-llama3, tiny-qwen2, ...)."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Pipeline output directory."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of MODEL."),
    dtype: str | None = typer.Option(None, "--dtype", help="Export dtype: fp32, bf16 or fp16."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset of the export."),
    export_device: str | None = typer.Option(None, "--export-device", help="Export/check device: cpu or cuda."),
    recipe: list[str] | None = typer.Option(
        None, "--recipe", help="Quantization recipe (repeatable): fp8, int8-sq, int8-wo, int4-wo."
    ),
    calib: str | None = typer.Option(None, "--calib", help="Calibration file or task name (default: MCQ samples)."),
    calib_size: int | None = typer.Option(None, "--calib-size", help="Calibration samples."),
    engine: str | None = typer.Option(
        None, "--engine", help="auto (build when TensorRT + GPU, else plan), build, plan or off."
    ),
    precision: str | None = typer.Option(None, "--precision", help="Engine precision: bf16, fp16 or fp32."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Engine profile: largest batch."),
    max_input_len: int | None = typer.Option(None, "--max-input-len", help="Engine profile: longest prompt."),
    max_context: int | None = typer.Option(None, "--max-context", help="Engine profile: longest context."),
    target: str | None = typer.Option(None, "--target", help="Deployment GPU for the memory check, e.g. h100-80gb."),
    gpu_memory: float | None = typer.Option(None, "--gpu-memory", help="Deployment GPU memory in GB."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated: medmcqa,medqa,pubmedqa,afrimedqa."),
    data: list[str] | None = typer.Option(None, "--data", help="TASK=FILE (or TASK=sample, TASK=demo), repeatable."),
    limit: int | None = typer.Option(None, "--limit", help="Questions per task."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed for --limit."),
    device: str | None = typer.Option(None, "--backend-device", help="Scoring device: cpu or cuda."),
    margin: float | None = typer.Option(None, "--margin", help="Parity margin in accuracy points."),
    margin_for: list[str] | None = typer.Option(None, "--margin-for", help="RECIPE=POINTS margin, repeatable."),
    agreement_floor: float | None = typer.Option(None, "--agreement-floor", help="Least answer agreement."),
    fail_on: str | None = typer.Option(None, "--fail-on", help=FAIL_ON_HELP),
    force: bool = typer.Option(False, "--force", help="Redo every step even when its output is up to date."),
    as_json: bool = json_option(),
) -> None:
    """Run export → quantize → engine → validate, skipping steps whose outputs are up to date."""
    from mexport.pipeline import config_from, load_config, run_pipeline

    overrides = {
        "model": model, "output": output, "revision": revision, "dtype": dtype, "opset": opset,
        "export_device": export_device, "recipes": recipe or None, "calib": calib, "calib_size": calib_size,
        "engine": engine, "engine_precision": precision, "max_batch": max_batch, "max_input_len": max_input_len,
        "max_context": max_context, "target": target, "gpu_memory_gb": gpu_memory,
        "tasks": tasks.split(",") if tasks else None,
        "data": parse_assignments(data, "--data", "FILE") if data else None, "limit": limit, "seed": seed,
        "device": device, "margin": margin, "recipe_margins": parse_margins(margin_for) if margin_for else None,
        "agreement_floor": agreement_floor, "fail_on": fail_on,
    }
    settings = load_config(config, overrides) if config else config_from({}, overrides)
    result = run_pipeline(settings, force=force)

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
    exit_with(result.exit_code)
