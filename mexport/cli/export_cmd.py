"""`mexport onnx` (checkpoint -> ONNX model directory) and `mexport generate` (greedy text from an export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mexport import console
from mexport.cli import app, emit_json, json_option
from mexport.formats import DEFAULT_EXPORT_DTYPE
from mexport.fsutil import format_bytes


def _validation_table(result: Any) -> Any:
    from rich.table import Table

    validation = result.validation
    tolerance = validation["tolerance"]
    table = Table(title=f"{result.path}: logits vs PyTorch ({validation['status']})")
    table.add_column("case")
    table.add_column("positions", justify="right")
    table.add_column("max |diff|", justify="right")
    table.add_column("max rel", justify="right")
    table.add_column("top-1 agree", justify="right")
    for name, case in validation["cases"].items():
        if case.get("non_finite_positions"):
            table.add_row(name, str(case["positions"]), f"NaN/inf at {case['non_finite_positions']}", "–", "–")
            continue
        table.add_row(
            name, str(case["positions"]), f"{case['max_abs']:.3g}", f"{case['max_rel']:.3g}",
            f"{case['top1_agreement']:.1%}",
        )
    table.caption = (
        f"tolerance: max |diff| <= {tolerance['max_abs']:g}, top-1 >= {tolerance['min_top1']:.0%} "
        f"({tolerance['basis']}); ONNX: {validation['runtime']}; reference: {validation['reference']}"
    )
    return table


@app.command("onnx")
def onnx_export(
    model: str = typer.Argument(..., help="Checkpoint directory (config.json + *.safetensors) or Hugging Face hub id."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write model.onnx, model.onnx.data, manifest."),
    dtype: str = typer.Option(
        DEFAULT_EXPORT_DTYPE,
        help="Float dtype of weights and activations: bf16 (default: the checkpoint's own, and what TensorRT 11 "
        "builds from), fp32 or fp16.",
    ),
    opset: int = typer.Option(18, help="ONNX opset version (14..23)."),
    revision: str = typer.Option(None, help="Hub revision (branch, tag or commit) when MODEL is a hub id."),
    device: str = typer.Option("cpu", help="Where validation runs: cpu or cuda."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the logit comparison with PyTorch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT directory."),
    untie_embeddings: bool = typer.Option(
        False, "--untie-embeddings", help="Store the LM head as its own transposed matrix (tied models store it once)."
    ),
    full_logits: bool = typer.Option(
        False, "--full-logits", help="Compute logits at every position (default: only where logits_indices asks)."
    ),
    long_check: bool = typer.Option(
        False, "--long-check", help="Check past the sliding window even when that run is costly (GPU or patience)."
    ),
    as_json: bool = json_option(),
) -> None:
    """Export a Gemma2, Llama or Qwen2 checkpoint to ONNX (text generation with KV cache) and check its logits against PyTorch.

    Weights are streamed from the safetensors files into one model.onnx.data, never all in memory.
    """
    from mexport.export import export_onnx

    result = export_onnx(
        model, output, dtype=dtype, opset=opset, revision=revision, device=device, validate=not no_validate,
        overwrite=overwrite, untie_embeddings=untie_embeddings, full_logits=full_logits, long_check=long_check,
    )
    if as_json:
        emit_json(result.manifest)
        return
    if result.validation is not None:
        console.console.print(_validation_table(result))
    weights = result.manifest["weights"]
    console.info(
        f"exported {model} -> {result.path} ({result.manifest['dtype']}, {format_bytes(weights['bytes'])} in "
        f"{weights['tensors']} tensors, {result.timings['total_s']:.1f}s, status {result.status})"
    )


@app.command("generate")
def generate(
    model_dir: Path = typer.Argument(..., help="Export directory (from `mexport onnx`)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Most tokens to generate (stops at EOS)."),
    device: str = typer.Option("cpu", help="ONNX Runtime device: cpu or cuda."),
    as_json: bool = json_option(),
) -> None:
    """Greedy continuation of a prompt with ONNX Runtime and the KV cache, with tokens per second."""
    from mexport.export import generate_text

    result = generate_text(model_dir, prompt, max_new_tokens, device=device)
    if as_json:
        emit_json({**result.__dict__, "tokens_per_s": result.tokens_per_s})
        return
    typer.echo(console.printable(prompt + result.text))  # a model's output may hold terminal escapes
    console.info(
        f"{result.new_tokens} new tokens in {result.seconds:.2f}s ({result.tokens_per_s:.1f} tokens/s; "
        f"{result.precision})"
    )
