"""`mexport engine`: plan (no TensorRT needed) or build a TensorRT engine from an export / quantize directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mexport import console
from mexport.cli import app, echo_summary, emit_json, json_option

if TYPE_CHECKING:
    from rich.table import Table

    from mexport.optimize.engine import EnginePlan
    from mexport.optimize.engine.profiles import ShapeRange

TARGET_HELP = (
    "Check memory against a named GPU: h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb, l4-24gb, a10g-24gb."
)


def _plan_tables(plan: EnginePlan) -> list[Table]:
    from rich.markup import escape
    from rich.table import Table

    from mexport.fsutil import format_bytes

    shapes = Table(title=f"optimization profiles ({plan.model_dir})")
    for column in ("profile", "input", "min", "opt", "max"):
        shapes.add_column(column)
    for profile in plan.profiles:
        # the 2 x layers KV inputs share one shape range: one row for them
        rows: dict[str, tuple[str, ShapeRange, int]] = {}
        for name, shape in profile.shapes.items():
            key = "past_key_values.*" if name.startswith("past_key_values.") else name
            label, _, count = rows.get(key, (key, shape, 0))
            rows[key] = (label, shape, count + 1)
        for label, shape, count in rows.values():
            label = f"{label} ({count} inputs)" if count > 1 else label
            shapes.add_row(f"{profile.index} {profile.name}", label, str(shape.min), str(shape.opt), str(shape.max))

    build = Table(title="build")
    build.add_column("setting")
    build.add_column("value", overflow="fold")
    mode = plan.mode
    build.add_row("precision", mode.precision + (f" + {mode.recipe}" if mode.recipe else ""))
    build.add_row("network", "strongly typed" if mode.strongly_typed else "weakly typed")
    build.add_row("builder flags", ", ".join(mode.builder_flags) or "none (TF32 off)")
    build.add_row("hardware compatibility", plan.settings.hw_compat)
    tensorrt = plan.tensorrt
    build.add_row("TensorRT", escape(f"{tensorrt.version} ({tensorrt.source}); the graph needs >= {plan.min_tensorrt}"))
    compatibility = plan.compatibility
    checked = compatibility["reason"] if not compatibility["checked"] else f"passes {compatibility['rules']} rules"
    build.add_row("compatibility", escape(checked))
    gap = plan.ort_cuda_gap
    build.add_row("ONNX Runtime CUDA", "runs this model on the GPU" if gap is None else escape(
        f"cannot run it on the GPU ({gap}): validate on the GPU through this engine, or with --backend-device cpu"))
    build.add_row("GPU", f"compute capability >= {mode.min_capability[0]}.{mode.min_capability[1]}")
    for note in mode.notes:
        build.add_row("why", note)

    memory = Table(title="GPU memory estimate")
    memory.add_column("component")
    memory.add_column("bytes", justify="right")
    memory.add_column("detail", overflow="fold")
    estimate = plan.memory
    limits = plan.settings.limits
    memory.add_row("weights", format_bytes(estimate.weights_bytes), estimate.weights_source)
    memory.add_row(
        "KV cache (past + present)",
        format_bytes(2 * estimate.kv_cache_bytes),
        f"2 x {estimate.kv_bytes_per_token:,} B/token x batch {limits.max_batch} x context {limits.max_context}",
    )
    lean = any(profile.symbols.get("logits_length") for profile in plan.profiles)
    logits = f"logits for <= {limits.max_logits} positions" if lean else "logits for every new token"
    memory.add_row(
        "activations",
        format_bytes(estimate.activation_bytes),
        f"{logits} + one layer + attention scores (prefill chunk {limits.chunk})",
    )
    memory.add_row("workspace pool", format_bytes(estimate.workspace_bytes), "--workspace")
    memory.add_row("CUDA reserve", format_bytes(estimate.reserve_bytes), "context and kernels")
    if plan.gpu is None:
        verdict = "not checked: pass --target or --gpu-memory"
    else:
        verdict = f"fits {plan.gpu.name} ({format_bytes(plan.gpu.memory_bytes)})"
    memory.add_row("total", format_bytes(estimate.total_bytes), verdict)
    return [shapes, build, memory]


@app.command("engine")
def engine(
    model_dir: Path = typer.Argument(..., help="Export or quantize output directory (model.onnx + mexport.json)."),
    out: Path = typer.Option(..., "-o", "--output", help="Engine directory to write (or where plan.json goes)."),
    precision: str = typer.Option(
        None, help="bf16, fp16 or fp32 (default: the model's dtype; an fp32 export at bf16 needs TensorRT 10)."
    ),
    max_batch: int = typer.Option(8, help="Largest batch the engine accepts."),
    max_input_len: int = typer.Option(None, help="Longest prompt in tokens (default: min(2048, --max-context))."),
    max_context: int = typer.Option(4096, help="Longest prompt + generated tokens (KV cache length)."),
    prefill_chunk: int = typer.Option(
        None, help="New tokens per engine call; longer prompts run in chunks (default: min(256, --max-input-len))."
    ),
    max_logits: int = typer.Option(64, help="Lean-logits graphs: positions with logits per engine call."),
    opt_batch: int = typer.Option(1, help="Batch size TensorRT tunes kernels for."),
    workspace: float = typer.Option(4.0, help="Builder workspace pool in GB."),
    timing_cache: Path = typer.Option(None, help="Tactic timing cache to read and update (default: OUT/timing.cache)."),
    hw_compat: str = typer.Option("none", help="none, or ampere+ for an engine that runs on any Ampere or newer GPU."),
    plan_only: bool = typer.Option(False, "--plan", help="Only plan (profiles, flags, memory): no TensorRT, no GPU."),
    gpu_memory: float = typer.Option(None, help="Check memory against a GPU of this many GB."),
    target: str = typer.Option(None, help=TARGET_HELP),
    tensorrt_version: str = typer.Option(
        None, help="Plan for this TensorRT (X.Y; default: the installed one, else the newest the [gpu] extra allows)."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="TensorRT's verbose log and tracebacks."),
    as_json: bool = json_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (or its plan.json)."),
) -> None:
    """Build a TensorRT engine (prefill, decode and chunk profiles) from an exported or quantized model directory.

    --plan needs no TensorRT and no GPU: it prints and writes shapes, precision, flags and a memory estimate.
    A plan that cannot fit the chosen GPU (--target / --gpu-memory) is refused with the numbers.
    """
    from mexport.optimize.engine import EngineSettings, build_engine, plan_engine, write_plan

    if verbose:
        console.configure(quiet=console.console.quiet, verbose=True)
    settings = EngineSettings(
        precision=precision,
        max_batch=max_batch,
        max_input_len=max_input_len,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        max_logits=max_logits,
        opt_batch=opt_batch,
        workspace_gb=workspace,
        timing_cache=timing_cache,
        hw_compat=hw_compat,
        gpu_memory_gb=gpu_memory,
        target=target,
        tensorrt_version=tensorrt_version,
    )
    if plan_only:
        plan = plan_engine(model_dir, settings)
        for warning in plan.warnings:
            console.warn(warning)
        if as_json:
            emit_json(plan.to_dict())
            return
        for table in _plan_tables(plan):
            console.console.print(table)
        path = write_plan(plan, out, overwrite=overwrite)
        echo_summary(f"wrote {path}")
        return
    result = build_engine(model_dir, out, settings, overwrite=overwrite)
    if as_json:
        emit_json(result.to_dict())
        return
    for table in _plan_tables(result.plan):
        console.console.print(table)
    echo_summary(
        f"wrote {result.out_dir} (engine {result.engine_bytes:,} bytes, built in {result.build_seconds:.0f} s on "
        f"{result.gpu.name} with TensorRT {result.tensorrt_version})"
    )
