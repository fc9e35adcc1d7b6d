"""`mexport quantize`: an export directory -> a Q/DQ ONNX model directory (fp8, int8-sq, int8-wo, int4-wo)."""

from __future__ import annotations

from pathlib import Path

import typer

from mexport import console
from mexport.cli import app, emit_json, json_option
from mexport.fsutil import format_bytes
from mexport.optimize.quantize.recipes import DEFAULT_BLOCK_SIZE, DEFAULT_INT4_METHOD, RECIPES


@app.command("quantize")
def quantize_command(
    export_dir: Path = typer.Argument(..., help="Export directory (from `mexport onnx`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the quantized model directory."),
    recipe: str = typer.Option(..., "--recipe", "-r", help=f"One of: {', '.join(RECIPES)} (see docs/quantize.md)."),
    calib: str = typer.Option(
        None,
        "--calib",
        help="Calibration text: JSONL ('text' field) or plain-text file, or a task name "
        "(its shipped sample). Default: all shipped MCQ samples with answers.",
    ),
    calib_size: int = typer.Option(64, "--calib-size", help="Number of calibration samples."),
    seed: int = typer.Option(0, help="Seed for drawing calibration samples and check prompts."),
    exclude: list[str] = typer.Option(
        [],
        "--exclude",
        help="Keep layers matching this fnmatch/regex pattern (node, weight or checkpoint tensor "
        "name) unquantized; repeatable.",
    ),
    block_size: int = typer.Option(
        None, "--block-size", help=f"int4-wo block size along the input dim (default {DEFAULT_BLOCK_SIZE}); must divide it."
    ),
    method: str = typer.Option(
        DEFAULT_INT4_METHOD,
        "--method",
        help="int4-wo weight search: auto (per layer the best of clipped scales, GPTQ, GPTQ act-order, with or "
        "without AWQ scaling, by calibrated output error), gptq, awq, clip, or rtn (round-to-nearest, no "
        "calibration).",
    ),
    int8_layers: str = typer.Option(
        None,
        "--int8-layers",
        help="int4-wo: keep layers at int8 weight-only: auto (those whose int4 output error is an outlier), N "
        "(the N worst), or a name pattern.",
    ),
    asymmetric: bool = typer.Option(
        False,
        "--asymmetric",
        help="int4-wo: uint4 with zero points, for ONNX Runtime deployments only (TensorRT refuses zero points).",
    ),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="Quantize the LM head too."),
    check_prompts: int = typer.Option(
        4, "--check-prompts", help="Prompts for the numeric check vs the export (0: skip)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT directory."),
    as_json: bool = json_option(),
) -> None:
    """Quantize an exported model's linear layers into Q/DQ ONNX that TensorRT builds low-precision engines from.

    Embeddings, norms, attention, softcapping and (unless asked) the LM head stay in the export's precision.
    """
    from mexport.optimize import quantize
    from mexport.optimize.quantize.report import report_tables

    result = quantize(
        export_dir,
        output,
        recipe,
        calib=calib,
        calib_size=calib_size,
        seed=seed,
        exclude=tuple(exclude),
        block_size=block_size,
        method=method,
        int8_layers=int8_layers,
        asymmetric=asymmetric,
        include_lm_head=include_lm_head,
        overwrite=overwrite,
        check_prompts=check_prompts,
    )
    if as_json:
        emit_json(result.summary())
        return
    for table in report_tables(result.report):
        console.console.print(table)
    size = result.report["bytes"]
    console.info(
        f"quantized {export_dir} -> {result.output} ({recipe}, opset {result.manifest['opset']}, "
        f"{format_bytes(size['before'])} -> {format_bytes(size['after'])}, status {result.manifest['status']})"
    )
