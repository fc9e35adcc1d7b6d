"""`mexport validate`: MCQ accuracy parity of candidates (ONNX / quantized / TensorRT) against the PyTorch model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mexport import console
from mexport.cli import app, emit_json, exit_with, json_option, parse_assignments, parse_margins
from mexport.errors import MexportError
from mexport.validate.verdict import DEFAULT_FAIL_ON, FAIL_ON_HELP

if TYPE_CHECKING:
    from mexport.validate.reports import ValidationReport


@app.command("validate")
def validate_command(
    reference: Path = typer.Option(..., "--reference", help="PyTorch checkpoint directory (run in its own dtype)."),
    candidates: list[Path] = typer.Option(
        ...,
        "--candidate",
        help="Export, quantize or engine directory to compare (repeatable); or another tool's ONNX decoder (its "
        "directory, or the .onnx file).",
    ),
    tasks: str = typer.Option(
        ..., "--tasks", help="Comma-separated tasks: medmcqa, medqa, pubmedqa, afrimedqa, or lm-eval task names."
    ),
    include_path: Path | None = typer.Option(None, "--include-path", help="Directory of extra lm-eval task YAMLs."),
    data: list[str] = typer.Option(
        [],
        "--data",
        help="TASK=FILE (.jsonl/.json/.parquet in the dataset's schema), or TASK=sample (40) / TASK=demo (200).",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Report directory (report.json/.md, junit.xml, png)."),
    limit: int | None = typer.Option(None, "--limit", help="Score a seeded random subset of N questions per task."),
    seed: int = typer.Option(1234, "--seed", help="Seed for --limit and few-shot examples."),
    shots: int = typer.Option(0, "--shots", help="Few-shot examples per prompt."),
    device: str = typer.Option("cpu", "--backend-device", help="cpu or cuda (TensorRT engines need cuda)."),
    margin: float = typer.Option(1.0, "--margin", help="Parity margin in accuracy points (paired 95% CI)."),
    margin_for: list[str] = typer.Option([], "--margin-for", help="RECIPE=POINTS: margin for one quantize recipe."),
    agreement_floor: float = typer.Option(0.90, "--agreement-floor", help="Minimum share of identical answers."),
    fail_on: str = typer.Option(DEFAULT_FAIL_ON, "--fail-on", help=FAIL_ON_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per batched forward."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore scores cached in REPORT_DIR/.cache."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace report files in REPORT_DIR that mexport did not write (others are kept)."
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="K/N: score only shard K of N of every task's questions and write a partial report "
        "(partial.json, no verdict) for `mexport merge-reports`."
    ),
    devices: str | None = typer.Option(
        None, "--devices", help="Comma-separated devices (cuda:0,cuda:1): one shard per device, each in its own "
        "process, merged into one report."
    ),
    as_json: bool = json_option(),
) -> None:
    """Prove MCQ accuracy parity: paired CIs, McNemar, agreement and KL per task.

    Exit 0 when every verdict passes, 1 when parity fails, 4 when the questions cannot resolve the margin
    (inconclusive; see --fail-on).
    """
    from mexport.validate import validate, validate_shard

    options: dict[str, Any] = {
        "output": output,
        "data": parse_assignments(data, "--data", "FILE"),
        "limit": limit,
        "seed": seed,
        "shots": shots,
        "device": device,
        "margin": margin,
        "recipe_margins": parse_margins(margin_for),
        "agreement_floor": agreement_floor,
        "fail_on": fail_on,
        "batch_size": batch_size,
        "resume": not no_resume,
        "include_path": include_path,
        "overwrite": overwrite,
    }
    if shard is not None:
        if devices is not None:
            raise MexportError("--shard and --devices do not go together", hint="--devices shards by itself")
        partial = validate_shard(reference, candidates, tasks.split(","), shard=shard, **options)
        if as_json:
            emit_json({**partial.summary(), "report_dir": str(Path(output).resolve())})
        else:
            console.info(f"shard {partial.shard} scored; partial report in {Path(output).resolve()}")
        return
    device_list = devices.split(",") if devices is not None else None
    report = validate(reference, candidates, tasks.split(","), devices=device_list, **options)
    show_report(report, Path(output), as_json)


def show_report(report: ValidationReport, output: Path, as_json: bool) -> None:
    """Print a finished report (warnings, the summary table or --json) and exit with its code."""

    for task in report.tasks:
        if task.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(task.skipped.items()))
            console.warn(f"{task.name}: dropped {sum(task.skipped.values())} of {task.total_rows} rows ({reasons})")
    if as_json:
        emit_json({**report.summary(), "report_dir": str(Path(output).resolve())})
    elif not console.is_quiet():
        from rich.console import Console

        from mexport.validate.reports import summary_table

        terminal = Console()
        if not terminal.is_terminal:  # CI logs: no line length to fit, keep table rows whole
            terminal.width = max(terminal.width, 160)
        terminal.print(summary_table(report))
        typer.echo(f"reports in {Path(output).resolve()}")
    exit_with(report.exit_code)
