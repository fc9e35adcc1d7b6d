"""``quantize()``: an export directory in, a quantized model directory (Q/DQ ONNX + manifest + report) out."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mexport.console import phase, warn
from mexport.errors import MexportError, ValidationFailedError
from mexport.export.genai import write_genai_config
from mexport.formats import DATA_FILE, GRAPH_FILE
from mexport.fsutil import check_free_space, check_output_dir, locks_output, staged_output_dir
from mexport.lazy import require
from mexport.manifest import (
    MANIFEST_NAME,
    STAMP_NAME,
    check_graph_io,
    file_records,
    io_signature,
    new_manifest,
    read_manifest,
    settings_hash,
    verified_input,
    write_manifest,
)
from mexport.optimize.quantize.calibration import (
    MAX_CALIBRATION_TOKENS,
    ActivationStats,
    CalibrationSet,
    collect_activation_stats,
    default_texts,
    load_calibration,
    tokenize,
)
from mexport.optimize.quantize.edits import quantize_activation, quantize_layer_weight, scale_input_channels
from mexport.optimize.quantize.graph import Linear, ModelGraph, copy_model_side_files
from mexport.optimize.quantize.numerics import (
    awq_search,
    effective_block_size,
    input_channel_absmax,
    smoothquant_factors,
)
from mexport.optimize.quantize.recipes import DEFAULT_BLOCK_SIZE, DEFAULT_SMOOTHQUANT_ALPHA, Recipe, get_recipe
from mexport.optimize.quantize.report import (
    compare_logits,
    model_bytes,
    node_counts,
    non_finite_message,
    prompt_logits,
)

CHECK_PROMPT_TOKENS = 64
MODEL_FILES = (GRAPH_FILE, DATA_FILE)


@dataclass
class QuantizeResult:
    output: Path
    manifest: dict[str, Any]

    @property
    def report(self) -> dict[str, Any]:
        return self.manifest["report"]

    def summary(self) -> dict[str, Any]:
        """The JSON the CLI prints: where, what, and the report."""
        return {
            "output": str(self.output),
            "recipe": self.manifest["recipe"],
            "status": self.manifest["status"],
            "opset": self.manifest["opset"],
            "calibration": self.manifest["calibration"],
            "report": self.report,
        }


# ---- inputs ----------------------------------------------------------------------------------------------------


def read_export(model_dir: Path) -> dict[str, Any]:
    """The export manifest, with one-line errors for directories quantize cannot take."""
    if model_dir.is_dir() and not (model_dir / MANIFEST_NAME).is_file() and (model_dir / GRAPH_FILE).is_file():
        raise MexportError(
            f"{model_dir}: has {GRAPH_FILE} but no {MANIFEST_NAME} (an Optimum export, or not made by mexport)",
            hint="export it with `mexport onnx MODEL -o DIR`; quantize reads the export manifest, it never guesses",
        )
    manifest = read_manifest(model_dir, expected_kind=("export",), verify=True)
    if not (model_dir / GRAPH_FILE).is_file():
        raise MexportError(f"{model_dir}: no {GRAPH_FILE}", hint="re-run the export into a fresh directory")
    missing = [key for key in ("dtype", "io", "model_config", "opset") if key not in manifest]
    if missing:
        raise MexportError(f"{model_dir}: export manifest lacks {', '.join(missing)} (written by an older mexport?)")
    return manifest


def weights_map(manifest: dict[str, Any]) -> dict[str, str]:
    """Initializer name -> checkpoint tensor name, as the export recorded it."""
    entries = (manifest.get("weights") or {}).get("map") or {}
    return {name: entry["source"] for name, entry in entries.items() if entry.get("source")}


def _matches(pattern: str, names: tuple[str, ...]) -> bool:
    """fnmatch on the whole name, or a regular expression found anywhere in it."""
    if any(fnmatch.fnmatchcase(name, pattern) for name in names):
        return True
    try:
        expression = re.compile(pattern)
    except re.error:
        return False
    return any(expression.search(name) for name in names)


def select_layers(
    linears: list[Linear], exclude: tuple[str, ...], include_lm_head: bool
) -> tuple[list[Linear], dict[str, dict[str, Any]]]:
    """Layers to quantize, and the excluded ones with the reason; warns about patterns that match nothing."""
    selected: list[Linear] = []
    excluded: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for layer in linears:
        patterns = [pattern for pattern in exclude if _matches(pattern, layer.match_names())]
        used.update(patterns)
        if patterns:
            reason = "--exclude " + " ".join(patterns)
        elif layer.lm_head and not include_lm_head:
            reason = "LM head kept in high precision (--include-lm-head quantizes it)"
        else:
            selected.append(layer)
            continue
        excluded[layer.name] = {"weight": layer.weight, "checkpoint_tensor": layer.checkpoint_name, "reason": reason}
    for pattern in exclude:
        if pattern not in used:
            warn(f"--exclude {pattern!r} matched no linear layer (node, weight or checkpoint tensor name)")
    return selected, excluded


def _grouped_by_input(layers: list[Linear]) -> dict[str, list[Linear]]:
    groups: dict[str, list[Linear]] = {}
    for layer in layers:
        groups.setdefault(layer.input, []).append(layer)
    return groups


# ---- the recipe ------------------------------------------------------------------------------------------------


def apply_recipe(
    graph: ModelGraph,
    recipe: Recipe,
    layers: list[Linear],
    stats: dict[str, ActivationStats],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    awq: bool = False,
    alpha: float = DEFAULT_SMOOTHQUANT_ALPHA,
    quantize: bool = True,
) -> dict[str, dict[str, Any]]:
    """Edit ``graph``: input-channel scaling where the recipe asks for it, then Q/DQ on every layer.

    ``quantize=False`` stops after the scaling (a float graph that must compute what the export computes).
    Returns the manifest's per-node record.
    """
    records: dict[str, dict[str, Any]] = {}
    for tensor, group in _grouped_by_input(layers).items():
        record: dict[str, Any] = {}
        exported = {layer.name: (layer.weight, layer.transposed) for layer in group}  # before any scaling
        factors = None
        if recipe.smoothquant:
            weight_absmax = np.max(
                [input_channel_absmax(graph.weight_matrix(layer.weight, layer.transposed)) for layer in group], axis=0
            )
            factors = smoothquant_factors(stats[tensor].absmax, weight_absmax, alpha)
            record["smoothquant_alpha"] = alpha
        elif awq:
            rows = stats[tensor].rows
            if rows is None:
                raise RuntimeError("AWQ needs activation rows: calibrate with keep_rows=True")
            weights = [np.asarray(graph.weight_matrix(layer.weight, layer.transposed), np.float32) for layer in group]
            block = effective_block_size(group[0].in_features, block_size)
            choice = awq_search(rows, stats[tensor].mean_abs, weights, block, graph.numpy_dtype(group[0].weight))
            record.update(awq_alpha=choice.alpha, awq_loss=choice.loss, rtn_loss=choice.baseline_loss)
            factors = choice.factors if choice.alpha > 0 else None
        if factors is not None:
            record["smoothing"] = scale_input_channels(graph, group, factors)
        if quantize and recipe.activations:
            absmax = stats[tensor].absmax / (factors if factors is not None else 1.0)
            scale = quantize_activation(graph, group, recipe.activations, float(absmax.max()))
            record.update(activation_amax=float(absmax.max()), activation_scale=float(scale.astype(np.float32)))
        for layer in group:
            weight, transposed = exported[layer.name]
            entry = {
                "weight": weight,
                "weight_transposed": transposed,
                "checkpoint_tensor": layer.checkpoint_name,
                "lm_head": layer.lm_head,
                **record,
            }
            if quantize:
                layer_block = effective_block_size(layer.in_features, block_size) if recipe.blocked else None
                tensors = quantize_layer_weight(graph, layer, recipe.weights, layer_block)
                entry.update(
                    tensors=tensors,
                    weights=recipe.weights,
                    activations=recipe.activations,
                    granularity="per-channel" if layer_block is None else f"block-{layer_block}",
                    activation_granularity="per-tensor" if recipe.activations else None,
                )
            records[layer.name] = entry
    return records


# ---- the stage -------------------------------------------------------------------------------------------------


def _check_options(recipe: Recipe, block_size: int | None, awq: bool, calib_size: int) -> int:
    """The block size to use (refused or warned about, never silently changed)."""
    if awq and not recipe.blocked:
        raise MexportError(f"--awq applies to int4-wo only, not {recipe.name}")
    if calib_size < 1:
        raise MexportError(f"--calib-size must be at least 1, got {calib_size}")
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    if block_size < 2:
        raise MexportError(f"--block-size must be at least 2, got {block_size}")
    if not recipe.blocked:
        warn(f"--block-size ignored: {recipe.name} quantizes weights per channel, not in blocks")
    return block_size


def _check_block_size(layers: list[Linear], block_size: int) -> None:
    """Each blocked layer needs whole blocks: ``block_size`` divides its input width, or the width is narrower and
    divides it (one block per row). Any other size would quietly become a smaller block, so it is refused."""
    widths = sorted(
        {layer.in_features for layer in layers if effective_block_size(layer.in_features, block_size)
         not in (block_size, layer.in_features)}
    )
    if widths:
        common = int(np.gcd.reduce([layer.in_features for layer in layers]))
        raise MexportError(
            f"--block-size {block_size} does not fit the input width of {', '.join(map(str, widths))}: "
            "it must divide each layer's width (or be a multiple of a narrower one)",
            hint=f"use a power of two that divides {common}",
        )


def _check_prompts(model_dir: Path, count: int, seed: int, max_position_embeddings: int) -> list[np.ndarray]:
    texts = default_texts()
    rng = np.random.default_rng(seed + 1)  # not the calibration draw
    picked = [texts[i] for i in sorted(rng.choice(len(texts), size=min(count, len(texts)), replace=False))]
    return tokenize(model_dir, picked, min(CHECK_PROMPT_TOKENS, max_position_embeddings))


def _numeric_check(
    parent_dir: Path, out_dir: Path, count: int, seed: int, config: dict[str, Any]
) -> dict[str, Any] | None:
    if count <= 0:
        return None
    try:
        prompts = _check_prompts(parent_dir, count, seed, int(config.get("max_position_embeddings") or 512))
    except MexportError as exc:
        warn(f"numeric check skipped: no prompts ({exc})")
        return None
    reference, reference_compute = prompt_logits(parent_dir, prompts, "checking: export")
    candidate, candidate_compute = prompt_logits(out_dir, prompts, "checking: quantized")
    compute = {"export": reference_compute, "quantized": candidate_compute}
    return {"prompts": len(prompts), "compute": compute, **compare_logits(reference, candidate)}


@locks_output("output")
def quantize(
    model_dir: str | Path,
    output: str | Path,
    recipe: str,
    *,
    calib: str | Path | None = None,
    calib_size: int = 64,
    seed: int = 0,
    exclude: tuple[str, ...] | list[str] = (),
    block_size: int | None = None,
    awq: bool = False,
    include_lm_head: bool = False,
    overwrite: bool = False,
    check_prompts: int = 4,
) -> QuantizeResult:
    """Quantize an mexport export directory with ``recipe`` (fp8, int8-sq, int8-wo, int4-wo) into ``output``.

    Linear layers (MatMuls with stored weights) get Q/DQ; embeddings, norms, attention, softmax and softcapping
    stay in the export's precision, and so does the tied LM head unless ``include_lm_head``. ``exclude`` patterns
    (fnmatch or regex) keep matching layers unquantized. Recipes with activation quantization (and AWQ) calibrate
    on ``calib`` (a JSONL/text file or a task name; default: the shipped MCQ samples). The output directory gets
    the graph, one data file, the tokenizer/config files, and a manifest with the report.
    """
    model_dir, output = Path(model_dir), Path(output)
    spec = get_recipe(recipe)
    exclude = tuple(exclude)
    block_size = _check_options(spec, block_size, awq, calib_size)
    parent = read_export(model_dir)
    verified = verified_input(model_dir, parent)
    if parent.get("status") == "failed":
        warn(f"{model_dir}: the export failed its own logit check (status 'failed'); quantizing it anyway")
    if output.resolve() == model_dir.resolve():
        raise MexportError(f"{output}: the output must be a different directory from the export")
    check_output_dir(output, overwrite)

    graph = ModelGraph(model_dir, weights_map(parent), parent["model_config"].get("vocab_size"))
    check_graph_io(parent, graph.model, model_dir)
    layers, excluded = select_layers(graph.linears(), exclude, include_lm_head)
    if not layers:
        raise MexportError("nothing to quantize: every linear layer is excluded")
    if spec.blocked:
        _check_block_size(layers, block_size)

    calibration: CalibrationSet | None = None
    stats: dict[str, ActivationStats] = {}
    if spec.needs_calibration(awq):
        calibration = load_calibration(calib, calib_size, seed)
        max_tokens = min(MAX_CALIBRATION_TOKENS, int(parent["model_config"].get("max_position_embeddings") or 512))
        token_ids = tokenize(model_dir, calibration.texts, max_tokens)
        inputs = {layer.input: layer.in_features for layer in layers}
        stats = collect_activation_stats(graph, parent, inputs, token_ids, keep_rows=awq, seed=seed)
    elif calib is not None:
        load_calibration(calib, calib_size, seed)  # a --calib that names nothing is an error even when unused
        warn(f"--calib ignored: {spec.name} needs no calibration")

    with phase(f"applying {spec.name}"):
        records = apply_recipe(graph, spec, layers, stats, block_size=block_size, awq=awq)
    raised_from = graph.require_opset(spec.opset_for(parent["dtype"]))
    bytes_before = model_bytes(model_dir, MODEL_FILES)
    check_free_space(output.resolve().parent, bytes_before, "the quantized model")

    params: dict[str, Any] = {
        "weights": spec.weights,
        "activations": spec.activations,
        "exclude": list(exclude),
        "include_lm_head": include_lm_head,
    }
    if spec.blocked:
        params.update(block_size=block_size, awq=awq)
    if spec.smoothquant:
        params["smoothquant_alpha"] = DEFAULT_SMOOTHQUANT_ALPHA
    with staged_output_dir(output, overwrite) as staging:
        graph.save(staging)
        copy_model_side_files(model_dir, staging, skip=(*MODEL_FILES, MANIFEST_NAME, STAMP_NAME))
        write_genai_config(staging, parent["model_config"], io_signature(graph.model))
        onnx = require("onnx")
        with phase("checking the graph (onnx.checker)"):
            onnx.checker.check_model(str(staging / GRAPH_FILE), full_check=True)
        manifest = new_manifest(
            "quantize",
            status="not_validated",
            dtype=parent["dtype"],
            opset=graph.opset,
            opset_raised_from=raised_from,
            model_config=parent["model_config"],
            io=io_signature(graph.model),
            recipe={
                "name": spec.name,
                "params": params,
                "settings_hash": settings_hash({"recipe": spec.name, **params}),
            },
            calibration=calibration.describe() if calibration else None,
            quantized=records,
            excluded=excluded,
            source={"export_dir": str(model_dir.resolve())},
            verified_inputs=[verified],
            parent=parent,
        )
        write_manifest(staging, manifest)  # the numeric check reads it through OrtDecoder
        check = _numeric_check(model_dir, staging, check_prompts, seed, parent["model_config"])
        manifest["report"] = {
            "counts": node_counts(graph.model, records),
            "excluded_layers": len(excluded),
            "bytes": {"before": bytes_before, "after": model_bytes(staging, MODEL_FILES)},
            "numeric_check": check,
        }
        manifest["files"] = file_records(staging)
        if check is not None and not check["finite"]:
            manifest["status"] = "failed"
            write_manifest(staging, manifest)
            raise ValidationFailedError(f"{spec.name}: NaN/inf logits from {non_finite_message(check)}")
        write_manifest(staging, manifest)
    return QuantizeResult(output, manifest)
