"""`mexport engine`: plan (no TensorRT needed) or build a TensorRT engine from an export / quantize directory."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mexport import console
from mexport.cli import app, echo_summary, emit_json, json_option
from mexport.fsutil import format_bytes
from mexport.trt_common import EngineSettings

if TYPE_CHECKING:
    from rich.table import Table

    from mexport.optimize.engine import EnginePlan
    from mexport.optimize.engine.profiles import ShapeRange



def with_engine_settings(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one option per :class:`EngineSettings` field (default, help and flag declared there) in
    place of its ``settings`` parameter, which receives the settings those options make."""
    types = typing.get_type_hints(EngineSettings)
    options = [
        inspect.Parameter(
            setting.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(setting.default, *filter(None, [setting.metadata["flag"]]),
                                 help=setting.metadata["help"]),
            annotation=types[setting.name],
        )
        for setting in dataclasses.fields(EngineSettings)
    ]
    names = [option.name for option in options]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        settings = EngineSettings(**{name: kwargs.pop(name) for name in names})
        command(*args, settings=settings, **kwargs)

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    arguments = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keywords = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in arguments]
    wrapper.__signature__ = inspect.Signature([*arguments, *options, *keywords])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*arguments, *options, *keywords]}
    return wrapper


def _plan_tables(plan: EnginePlan) -> list[Table]:
    from rich.markup import escape
    from rich.table import Table

    from mexport.optimize.engine import GPU_TARGETS

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
    targets = Table(title="fits per GPU (--target)")
    targets.add_column("target")
    targets.add_column("GPU")
    targets.add_column("memory", justify="right")
    targets.add_column("fits")
    for name, reason in plan.fits_per_gpu.items():
        gpu = GPU_TARGETS[name]
        targets.add_row(name, gpu.name, format_bytes(gpu.memory_bytes), "yes" if reason is None else f"no: {reason}")
    return [shapes, build, memory, targets]


@app.command("engine")
@with_engine_settings
def engine(
    model_dir: Path = typer.Argument(..., help="Export or quantize output directory (model.onnx + mexport.json)."),
    out: Path = typer.Option(..., "-o", "--output", help="Engine directory to write (or where plan.json goes)."),
    *,
    settings: EngineSettings,
    plan_only: bool = typer.Option(False, "--plan", help="Only plan (profiles, flags, memory): no TensorRT, no GPU."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="TensorRT's verbose log and tracebacks."),
    as_json: bool = json_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (or its plan.json)."),
) -> None:
    """Build a TensorRT engine (prefill, decode and chunk profiles) from an exported or quantized model directory.

    --plan needs no TensorRT and no GPU: it prints and writes shapes, precision, flags and a memory estimate.
    A plan that cannot fit the chosen GPU (--target / --gpu-memory) is refused with the numbers.
    """
    from mexport.optimize.engine import build_engine, plan_engine, write_plan

    if verbose:
        console.configure(quiet=console.console.quiet, verbose=True)
    if plan_only:
        plan = plan_engine(model_dir, settings)
        for note in plan.notes:
            console.info(note)
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
    for note in result.plan.notes:
        console.info(note)
    if as_json:
        emit_json(result.to_dict())
        return
    for table in _plan_tables(result.plan):
        console.console.print(table)
    echo_summary(
        f"wrote {result.out_dir} (engine {result.engine_bytes:,} bytes, built in {result.build_seconds:.0f} s on "
        f"{result.gpu.name} with TensorRT {result.tensorrt_version})"
    )
