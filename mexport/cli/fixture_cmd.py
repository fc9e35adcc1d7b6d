"""`mexport fixture`: write a built-in tiny checkpoint of one of the model families."""

from __future__ import annotations

from pathlib import Path

import typer

from mexport.cli import app, echo_summary, emit_json, json_option


@app.command("fixture")
def fixture(
    name: str = typer.Argument(..., help="Fixture to write: tiny-gemma2 (4 layers, hidden 64), wide-gemma2 (vocab 32000, hidden 512), window-gemma2 (2 layers, sliding window 4096), learned-gemma2 (tiny, fine-tuned on the MCQ samples), tiny-llama3 (GQA, llama3 rope scaling, untied head) or tiny-qwen2 (GQA, q/k/v bias, tied, no BOS)."),
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint and tokenizer to."),
    seed: int = typer.Option(0, help="Weight seed (same seed, same bytes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    as_json: bool = json_option(),
) -> None:
    """Write a built-in test checkpoint with its family's real features (GQA, the family's attention and tokenizer)."""
    from mexport.fixtures import write_fixture

    path = write_fixture(name, out_dir, seed=seed, overwrite=overwrite)
    if as_json:
        emit_json({"fixture": name, "path": str(path)})
    else:
        echo_summary(f"wrote {name} to {path}")
