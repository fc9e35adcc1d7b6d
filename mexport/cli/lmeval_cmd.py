"""`mexport lm-eval`: lm-evaluation-harness tasks on any mexport model (checkpoint, export, quantized, engine)."""

from __future__ import annotations

from pathlib import Path

import typer

from mexport import console
from mexport.cli import app, emit_json, json_option


@app.command("lm-eval")
def lmeval_command(
    model_dir: Path = typer.Argument(..., help="Checkpoint (PyTorch), export or quantize dir (ONNX Runtime), engine."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task (or group) names."),
    include_path: Path | None = typer.Option(None, "--include-path", help="Directory of extra lm-eval task YAMLs."),
    output_path: Path | None = typer.Option(
        None, "--output-path", help="Write lm-eval's results JSON (and samples) here, as lm_eval does."
    ),
    limit: float | None = typer.Option(None, "--limit", help="Documents per task (a fraction when < 1)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per batched forward."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Few-shot examples (task default if unset)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (ONNX Runtime also tensorrt)."),
    as_json: bool = json_option(),
) -> None:
    """Run lm-eval's own evaluator with mexport's runtime and prompt-cached scoring; print lm-eval's table."""
    from mexport.validate.backends import detect_kind

    detect_kind(model_dir)  # a wrong path is bad input (exit 2) even where lm-eval is not installed
    from mexport.lmeval import results_tables, run_lm_eval, serializable

    results = run_lm_eval(
        model_dir,
        [task for task in tasks.split(",") if task],
        include_path=include_path,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        device=device,
        output_path=output_path,
    )
    results.pop("samples")  # per-document logs: in --output-path, not on the terminal
    if as_json:
        emit_json(serializable(results))
    elif not console.is_quiet():
        typer.echo(results_tables(results))
