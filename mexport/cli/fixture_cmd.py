"""`mexport fixture`: write a built-in tiny Gemma2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from mexport.cli import app, emit_json, run


@app.command("fixture")
def fixture(
    name: str = typer.Argument(..., help="Fixture to write: tiny-gemma2 (4 layers, hidden 64) or wide-gemma2."),
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint and tokenizer to."),
    seed: int = typer.Option(0, help="Weight seed (same seed, same bytes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Write a built-in Gemma2-architecture test checkpoint (GQA, sliding window, softcaps, tied embeddings)."""
    from mexport.fixtures.tiny_gemma2 import make_fixture

    path = run(lambda: make_fixture(out_dir, name=name, seed=seed, overwrite=overwrite))
    if as_json:
        emit_json({"fixture": name, "path": str(path)})
    else:
        typer.echo(f"wrote {name} to {path}")
