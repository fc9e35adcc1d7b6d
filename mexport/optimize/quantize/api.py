"""``quantize()``: an export directory in, a quantized model directory (Q/DQ ONNX + manifest + report) out."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mexport.console import info, phase, warn
from mexport.errors import MexportError
from mexport.export.genai import write_genai_config
from mexport.formats import DATA_FILE, GRAPH_FILE
from mexport.fsutil import check_output_dir, locks_output
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
)
from mexport.models import family_of
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
from mexport.optimize.quantize.int4 import GroupChoice
from mexport.optimize.quantize.numerics import (
    effective_block_size,
    input_channel_absmax,
    smoothquant_factors,
)
from mexport.optimize.quantize.recipes import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_INT4_METHOD,
    DEFAULT_SMOOTHQUANT_ALPHA,
    Recipe,
    get_recipe,
)
from mexport.optimize.quantize.report import (
    compare_logits,
    model_bytes,
    node_counts,
    non_finite_message,
    prompt_logits,
)
from mexport.optimize.quantize.weight_search import (
    UNCALIBRATED_METHOD,
    Int4Plan,
    check_method,
    choose_int8_layers,
    grouped_by_input,
    parse_int8_layers,
    ranks_layers,
    search_int4,
)
from mexport.stage import write_artifact

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


# ---- the recipe ------------------------------------------------------------------------------------------------


def apply_recipe(
    graph: ModelGraph,
    recipe: Recipe,
    layers: list[Linear],
    stats: dict[str, ActivationStats],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    alpha: float = DEFAULT_SMOOTHQUANT_ALPHA,
    quantize: bool = True,
    int4_plan: Int4Plan | None = None,
    int8_layers: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Edit ``graph``: input-channel scaling where the recipe (or the int4 search) asks for it, then Q/DQ on every
    layer. ``int4_plan`` holds the searched int4 weights (None: round-to-nearest); ``int8_layers`` names the
    layers of an int4 recipe kept at int8 weight-only.

    ``quantize=False`` stops after the scaling (a float graph that must compute what the export computes).
    Returns the manifest's per-node record.
    """
    records: dict[str, dict[str, Any]] = {}
    for tensor, group in grouped_by_input(layers).items():
        record: dict[str, Any] = {}
        exported = {layer.name: (layer.weight, layer.transposed) for layer in group}  # before any scaling
        factors = None
        choice = int4_plan.groups.get(tensor) if int4_plan is not None else None
        if recipe.smoothquant:
            weight_absmax = np.max(
                [input_channel_absmax(graph.weight_matrix(layer.weight, layer.transposed)) for layer in group], axis=0
            )
            factors = smoothquant_factors(stats[tensor].absmax, weight_absmax, alpha)
            record["smoothquant_alpha"] = alpha
        elif choice is not None:
            record["awq_alpha"] = choice.alpha
            factors = choice.factors
        if factors is not None:
            record["smoothing"] = scale_input_channels(graph, group, factors)
        if quantize and recipe.activations:
            absmax = stats[tensor].absmax / (factors if factors is not None else 1.0)
            scale = quantize_activation(graph, group, recipe.activations, float(absmax.max()))
            record.update(activation_amax=float(absmax.max()), activation_scale=float(scale.astype(np.float32)))
        for index, layer in enumerate(group):
            weight, transposed = exported[layer.name]
            entry = {
                "weight": weight,
                "weight_transposed": transposed,
                "checkpoint_tensor": layer.checkpoint_name,
                "lm_head": layer.lm_head,
                "parameters": layer.in_features * layer.out_features,
                **record,
            }
            if choice is not None:
                layer_choice = choice.layers[index]
                entry.update(int4_method=layer_choice.method, int4_losses=layer_choice.losses)
                entry["int4_relative_error"] = int4_plan.relative_error[layer.name] if int4_plan else None
            if quantize:
                entry.update(_quantize_weight(graph, recipe, layer, block_size, choice, index, int8_layers))
            records[layer.name] = entry
    return records


def _quantize_weight(
    graph: ModelGraph,
    recipe: Recipe,
    layer: Linear,
    block_size: int,
    choice: GroupChoice | None,
    index: int,
    int8_layers: tuple[str, ...],
) -> dict[str, Any]:
    """Q/DQ on one layer's weight; returns its manifest fields."""
    scheme, layer_block, searched = recipe.weights, None, None
    if recipe.blocked and layer.name in int8_layers:
        scheme = "int8"
    elif recipe.blocked:
        layer_block = effective_block_size(layer.in_features, block_size)
        if choice is not None:
            searched = choice.layers[index].quantized
            scheme = searched.scheme
    tensors = quantize_layer_weight(graph, layer, scheme, layer_block, searched)
    return {
        "tensors": tensors,
        "weights": scheme,
        "activations": recipe.activations,
        "granularity": "per-channel" if layer_block is None else f"block-{layer_block}",
        "activation_granularity": "per-tensor" if recipe.activations else None,
    }


# ---- the stage -------------------------------------------------------------------------------------------------


def _check_options(
    recipe: Recipe, block_size: int | None, method: str, calib_size: int, int8_layers: Any, asymmetric: bool
) -> int | None:
    """The block size asked for (refused or warned about, never silently changed); None when unset (see
    default_block_size)."""
    check_method(method)
    if not recipe.blocked:
        for given, option in ((method != DEFAULT_INT4_METHOD, "--method"), (int8_layers is not None, "--int8-layers"),
                              (asymmetric, "--asymmetric")):
            if given:
                raise MexportError(
                    f"{option} applies to int4-wo only, not {recipe.name}", hint=f"drop {option}, or use --recipe int4-wo"
                )
    if asymmetric and method not in (DEFAULT_INT4_METHOD, "clip"):
        raise MexportError(f"--asymmetric searches clipping only; it does not combine with --method {method}")
    if calib_size < 1:
        raise MexportError(f"--calib-size must be at least 1, got {calib_size}", hint="pass --calib-size N with N >= 1")
    if block_size is None:
        return None
    if block_size < 2:
        raise MexportError(f"--block-size must be at least 2, got {block_size}", hint="use a power of two such as 128")
    if not recipe.blocked:
        warn(f"--block-size ignored: {recipe.name} quantizes weights per channel, not in blocks")
    return block_size


def _misfit_widths(layers: list[Linear], block_size: int) -> list[int]:
    """Input widths that ``block_size`` does not cut into whole blocks (it divides neither the width nor is the
    width a narrower divisor of it: any other size would quietly become a smaller block)."""
    return sorted(
        {layer.in_features for layer in layers if effective_block_size(layer.in_features, block_size)
         not in (block_size, layer.in_features)}
    )


def default_block_size(layers: list[Linear]) -> int:
    """The largest power of two up to DEFAULT_BLOCK_SIZE that fits every layer's input width (said aloud when it
    is not the default itself)."""
    size = DEFAULT_BLOCK_SIZE
    while size > 2 and _misfit_widths(layers, size):
        size //= 2
    if size != DEFAULT_BLOCK_SIZE and not _misfit_widths(layers, size):
        widths = ", ".join(map(str, _misfit_widths(layers, DEFAULT_BLOCK_SIZE)))
        info(f"--block-size defaults to {size}: {DEFAULT_BLOCK_SIZE} does not divide the input width of {widths}")
    return size


def _check_block_size(layers: list[Linear], block_size: int) -> None:
    """Each blocked layer needs whole blocks (see _misfit_widths), else the size is refused."""
    widths = _misfit_widths(layers, block_size)
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


def _read_input(model_dir: Path, output: Path, overwrite: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The export's manifest, verified, and the record of that verification; ``output`` checked writable."""
    parent = read_export(model_dir)
    verified = verified_input(model_dir, parent)
    if parent.get("status") == "failed":
        warn(f"{model_dir}: the export failed its own logit check (status 'failed'); quantizing it anyway")
    if output.resolve() == model_dir.resolve():
        raise MexportError(f"{output}: the output must be a different directory from the export")
    check_output_dir(output, overwrite)
    return parent, verified


def _report(
    graph: ModelGraph,
    records: dict[str, dict[str, Any]],
    excluded: dict[str, dict[str, Any]],
    bytes_before: int,
    staging: Path,
    check: dict[str, Any] | None,
    kept_int8: tuple[str, ...] | None,
) -> dict[str, Any]:
    """The manifest's ``report``: node counts, excluded layers, sizes before and after, the numeric check, and
    for blocked recipes what ``--int8-layers`` kept."""
    report = {
        "counts": node_counts(graph.model, records),
        "excluded_layers": len(excluded),
        "bytes": {"before": bytes_before, "after": model_bytes(staging, MODEL_FILES)},
        "numeric_check": check,
    }
    if kept_int8 is not None:
        report["int8_layers"] = int8_layer_cost(records, kept_int8)
    return report


def _write_quantized_files(graph: ModelGraph, model_dir: Path, staging: Path, model_config: dict[str, Any]) -> None:
    """The quantized graph and its data file, the export's side files and the genai config, checked by ONNX."""
    graph.save(staging)
    copy_model_side_files(model_dir, staging, skip=(*MODEL_FILES, MANIFEST_NAME, STAMP_NAME))
    write_genai_config(staging, model_config, io_signature(graph.model))
    onnx = require("onnx")
    with phase("checking the graph (onnx.checker)"):
        onnx.checker.check_model(str(staging / GRAPH_FILE), full_check=True)


def _recipe_params(
    spec: Recipe,
    exclude: tuple[str, ...],
    include_lm_head: bool,
    block_size: int | None,
    int4_options: dict[str, Any],
) -> dict[str, Any]:
    """The recipe settings the manifest records (and hashes)."""
    params: dict[str, Any] = {
        "weights": spec.weights,
        "activations": spec.activations,
        "exclude": list(exclude),
        "include_lm_head": include_lm_head,
    }
    if spec.blocked:
        params.update(block_size=block_size, **int4_options)
    if spec.smoothquant:
        params["smoothquant_alpha"] = DEFAULT_SMOOTHQUANT_ALPHA
    return params


def _calibrate(
    graph: ModelGraph,
    parent: dict[str, Any],
    spec: Recipe,
    layers: list[Linear],
    calib: str | Path | None,
    calib_size: int,
    seed: int,
    block_size: int,
    method: str,
    int8_layers: str | int | None,
    asymmetric: bool,
) -> tuple[CalibrationSet | None, dict[str, ActivationStats], Int4Plan | None]:
    """Calibration texts, activation statistics (W8A8 recipes) and the int4 search (int4-wo), as the recipe needs."""
    searched = spec.blocked and (method != UNCALIBRATED_METHOD or ranks_layers(int8_layers))
    if spec.weight_only and not searched:
        if calib is not None:
            load_calibration(calib, calib_size, seed)  # a --calib that names nothing is an error even when unused
            which = f"{spec.name} --method {method}" if spec.blocked else spec.name
            warn(f"--calib ignored: {which} needs no calibration")
        return None, {}, None
    calibration = load_calibration(calib, calib_size, seed)
    max_tokens = min(MAX_CALIBRATION_TOKENS, int(parent["model_config"].get("max_position_embeddings") or 512))
    token_ids = tokenize(graph.model_dir, calibration.texts, max_tokens)
    if searched:
        search_method = DEFAULT_INT4_METHOD if method == UNCALIBRATED_METHOD else method
        plan = search_int4(graph, parent, layers, token_ids, block_size, search_method, seed, asymmetric)
        if method == UNCALIBRATED_METHOD:  # calibrated only to rank the layers for --int8-layers
            plan = Int4Plan({}, plan.relative_error)
        return calibration, {}, plan
    inputs = {layer.input: layer.in_features for layer in layers}
    return calibration, collect_activation_stats(graph, parent, inputs, token_ids, seed=seed), None


def int8_layer_cost(records: dict[str, dict[str, Any]], kept_int8: tuple[str, ...]) -> dict[str, Any]:
    """What ``--int8-layers`` kept and what it costs: the weight bytes over storing those layers in int4."""
    int8_parameters = sum(records[name]["parameters"] for name in kept_int8)
    all_parameters = sum(entry["parameters"] for entry in records.values())
    return {
        "layers": list(kept_int8),
        "count": len(kept_int8),
        "extra_bytes": int8_parameters // 2,  # one byte per weight instead of half a byte (scales aside)
        "share_of_weights": int8_parameters / max(all_parameters, 1),
    }


def _open_graph(
    model_dir: Path,
    parent: dict[str, Any],
    spec: Recipe,
    exclude: tuple[str, ...],
    include_lm_head: bool,
    block_size: int | None,
) -> tuple[ModelGraph, list[Linear], dict[str, dict[str, Any]], int]:
    """The export's graph (checked against its manifest), the layers to quantize, the excluded ones, and the block
    size (the largest that fits every layer when none was given)."""
    graph = ModelGraph(
        model_dir, weights_map(parent), parent["model_config"].get("vocab_size"),
        family_of(parent["model_config"]).norm_form,
    )
    check_graph_io(parent, graph.model, model_dir)
    layers, excluded = select_layers(graph.linears(), exclude, include_lm_head)
    if not layers:
        raise MexportError("nothing to quantize: every linear layer is excluded")
    if block_size is None:
        block_size = default_block_size(layers) if spec.blocked else DEFAULT_BLOCK_SIZE
    if spec.blocked:
        _check_block_size(layers, block_size)
    return graph, layers, excluded, block_size


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
    method: str = DEFAULT_INT4_METHOD,
    int8_layers: str | int | None = None,
    asymmetric: bool = False,
    include_lm_head: bool = False,
    overwrite: bool = False,
    check_prompts: int = 4,
) -> QuantizeResult:
    """Quantize an mexport export directory with ``recipe`` (fp8, int8-sq, int8-wo, int4-wo) into ``output``.

    Linear layers (MatMuls with stored weights) get Q/DQ; embeddings, norms, attention, softmax and softcapping
    stay in the export's precision, and so does the tied LM head unless ``include_lm_head``. ``exclude`` patterns
    (fnmatch or regex) keep matching layers unquantized. Recipes with activation quantization, and int4-wo's
    searched ``method``s (all but "rtn"), calibrate on ``calib`` (a JSONL/text file or a task name; default: the
    shipped MCQ samples). int4-wo only: ``int8_layers`` ("auto", a count, or a name pattern) keeps the layers
    whose int4 output error is largest at int8 weight-only; ``asymmetric`` stores uint4 with zero points (ONNX
    Runtime only: TensorRT refuses zero points). The output directory gets the graph, one data file, the
    tokenizer/config files, and a manifest with the report.
    """
    model_dir, output = Path(model_dir), Path(output)
    spec = get_recipe(recipe)
    exclude = tuple(exclude)
    int8_layers = parse_int8_layers(int8_layers)
    block_size = _check_options(spec, block_size, method, calib_size, int8_layers, asymmetric)
    parent, verified = _read_input(model_dir, output, overwrite)

    graph, layers, excluded, block_size = _open_graph(model_dir, parent, spec, exclude, include_lm_head, block_size)

    calibration, stats, plan = _calibrate(
        graph, parent, spec, layers, calib, calib_size, seed, block_size, method, int8_layers, asymmetric
    )
    kept_int8 = tuple(choose_int8_layers(layers, int8_layers, plan.relative_error if plan else {}, _matches))
    with phase(f"applying {spec.name}"):
        records = apply_recipe(
            graph, spec, layers, stats, block_size=block_size, int4_plan=plan, int8_layers=kept_int8
        )
    raised_from = graph.require_opset(spec.opset_for(parent["dtype"]))
    bytes_before = model_bytes(model_dir, MODEL_FILES)
    int4_options = {"method": method, "int8_layers": int8_layers, "asymmetric": asymmetric}
    params = _recipe_params(spec, exclude, include_lm_head, block_size, int4_options)
    with write_artifact(output, overwrite=overwrite, needs_bytes=bytes_before, what="the quantized model") as artifact:
        _write_quantized_files(graph, model_dir, artifact.path, parent["model_config"])
        manifest = new_manifest(
            "quantize",
            status="not_validated",
            dtype=parent["dtype"],
            opset=graph.opset,
            opset_raised_from=raised_from,
            model_config=parent["model_config"],
            io=io_signature(graph.model),
            recipe={"name": spec.name, "params": params, "settings_hash": settings_hash({"recipe": spec.name, **params})},
            calibration=calibration.describe() if calibration else None,
            quantized=records,
            excluded=excluded,
            source={"export_dir": str(model_dir.resolve())},
            verified_inputs=[verified],
            parent=parent,
        )
        artifact.record(manifest)  # the numeric check reads it through OrtDecoder
        check = _numeric_check(model_dir, artifact.path, check_prompts, seed, parent["model_config"])
        blocked_int8 = kept_int8 if spec.blocked else None
        manifest["report"] = _report(graph, records, excluded, bytes_before, artifact.path, check, blocked_int8)
        manifest["files"] = file_records(artifact.path)
        if check is not None and not check["finite"]:
            artifact.fail(f"{spec.name}: NaN/inf logits from {non_finite_message(check)}")
        artifact.record()
    return QuantizeResult(output, manifest)
