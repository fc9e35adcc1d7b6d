"""``export_onnx``: a checkpoint of a supported family (mexport.models) to a self-contained ONNX model directory,
without loading its weights.

Phases: trace a weightless graph (:mod:`mexport.export.graph`), stream the checkpoint's tensors into one
external-data file (:mod:`mexport.export.weights`), copy config and tokenizer, write ``mexport.json``, then
check the logits against PyTorch (:mod:`mexport.export.verify`). Everything is written into a staging directory
that only becomes ``output`` when the export finished (or ran and failed validation, kept for inspection).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport import console
from mexport.checkpoint import (
    TOKENIZER_FILES,
    Checkpoint,
    TensorLocation,
    copy_side_files,
    has_tokenizer,
    resolve_checkpoint,
    side_files_bytes,
)
from mexport.errors import MexportError
from mexport.export.genai import write_genai_config
from mexport.export.graph import (
    StoredTensor,
    TracedGraph,
    assign_offsets,
    attach_initializers,
    externalize_parameters,
    trace_graph,
)
from mexport.export.verify import check_validation_memory, fp16_overflow_probe, validate_export
from mexport.export.weights import WeightsWritten, write_weights
from mexport.formats import (
    DATA_FILE,
    DEFAULT_EXPORT_DTYPE,
    EXPORT_DTYPES,
    GRAPH_FILE,
    LARGE_ALIGNMENT,
    SMALL_ALIGNMENT,
    TASK,
)
from mexport.fsutil import check_output_dir, locks_output
from mexport.lazy import require
from mexport.manifest import io_signature, new_manifest, sha256_file
from mexport.stage import write_artifact

DEVICES = ("cpu", "cuda")
EXPORT_MIN_OPSET = 14  # Optimum's decoder configurations and the attention ops need at least this
# the newest opset the pinned torch's exporter writes (torch.onnx._constants.ONNX_MAX_OPSET in torch 2.13; 24 raises
# "Unsupported onnx_opset_version"); onnx's own newest, when older, bounds it too
EXPORT_MAX_OPSET = 23
FREE_SPACE_MARGIN = 1.02


@dataclass
class ExportResult:
    """What an export produced: where, its manifest, the validation summary (None if skipped), phase timings."""

    path: Path
    manifest: dict[str, Any]
    validation: dict[str, Any] | None
    timings: dict[str, float]

    @property
    def status(self) -> str:
        return str(self.manifest["status"])


def check_opset(opset: int) -> None:
    """An opset the exporter can write: EXPORT_MIN_OPSET up to EXPORT_MAX_OPSET (or the installed onnx's newest,
    when older)."""
    onnx = require("onnx", "exporting to ONNX")
    max_opset = min(EXPORT_MAX_OPSET, onnx.defs.onnx_opset_version())
    if not EXPORT_MIN_OPSET <= opset <= max_opset:
        raise MexportError(f"opset {opset} not supported; use {EXPORT_MIN_OPSET}..{max_opset}", hint="the default is 18")


def _check_options(dtype: str, opset: int, device: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise MexportError(f"unknown dtype {dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}")
    check_opset(opset)
    if device not in DEVICES:
        raise MexportError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")


def _checkpoint_tensor(checkpoint: Checkpoint, name: str, shape: tuple[int, ...]) -> TensorLocation:
    """The checkpoint tensor behind graph parameter ``name`` (a tied LM head may be saved under either name)."""
    aliases = [name]
    if checkpoint.config.get("tie_word_embeddings", True) and name in ("model.embed_tokens.weight", "lm_head.weight"):
        aliases += ["lm_head.weight" if name == "model.embed_tokens.weight" else "model.embed_tokens.weight"]
    for alias in aliases:
        if alias in checkpoint.tensors:
            location = checkpoint.tensors[alias]
            if location.shape != shape:
                raise MexportError(
                    f"{location.file}: tensor {alias} has shape {list(location.shape)}, config.json implies {list(shape)}"
                )
            return location
    raise MexportError(f"{checkpoint.path}: checkpoint has no tensor {name} (incomplete or mismatched checkpoint)")


def _plan(
    checkpoint: Checkpoint, traced: TracedGraph, dtype: str, untie_embeddings: bool
) -> tuple[list[StoredTensor], dict[str, TensorLocation], int]:
    """Stored tensors in checkpoint order with their offsets, their sources, and the data file's size."""
    stored = externalize_parameters(traced, dtype, untie_embeddings)
    sources = {t.initializer: _checkpoint_tensor(checkpoint, t.source, traced.parameters[t.source]) for t in stored}
    file_order = {file: index for index, file in enumerate(checkpoint.weight_files)}
    stored.sort(key=lambda t: (file_order[sources[t.initializer].file], sources[t.initializer].offset, t.transform))
    data_bytes = assign_offsets(stored)
    attach_initializers(traced.model, stored)
    return stored, sources, data_bytes


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _weights_entry(stored: list[StoredTensor], sources: dict[str, TensorLocation], data_bytes: int) -> dict[str, Any]:
    return {
        "file": DATA_FILE,
        "bytes": data_bytes,
        "tensors": len(stored),
        "alignment": {"large": LARGE_ALIGNMENT, "small": SMALL_ALIGNMENT},
        "map": {
            t.initializer: {
                "source": sources[t.initializer].name,
                "source_dtype": sources[t.initializer].dtype,
                "transform": t.transform,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offset": t.offset,
                "bytes": t.nbytes,
            }
            for t in stored
        },
    }


def _write_export_files(
    staging: Path,
    checkpoint: Checkpoint,
    traced: TracedGraph,
    stored: list[StoredTensor],
    sources: dict[str, TensorLocation],
    data_bytes: int,
    timings: dict[str, float],
) -> tuple[dict[str, Any], WeightsWritten, str]:
    """The graph, its weights (streamed from the checkpoint), the side files and the ONNX check, into ``staging``;
    returns the files' records, the weights written and whether a tokenizer is "present" or "missing"."""
    onnx = require("onnx", "exporting to ONNX")
    onnx.save_model(traced.model, str(staging / GRAPH_FILE))
    clock = time.perf_counter()
    with console.progress(bytes_mode=True) as bar:
        task = bar.add_task("writing weights", total=data_bytes)
        written = write_weights(
            staging / DATA_FILE, stored, sources, checkpoint.weight_files, lambda n: bar.advance(task, n)
        )
    timings["weights_s"] = time.perf_counter() - clock
    side_files = copy_side_files(checkpoint, staging)
    side_files += write_genai_config(staging, traced.model_config, io_signature(traced.model))
    tokenizer = "present" if has_tokenizer(staging) else "missing"
    if tokenizer == "missing":
        console.warn(
            f"{checkpoint.path}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}): the export cannot be "
            "validated or used for generation until they are added (recorded as tokenizer: missing)"
        )
    onnx.checker.check_model(str(staging / GRAPH_FILE))
    files = {name: _file_entry(staging / name) for name in (GRAPH_FILE, *side_files)}
    files[DATA_FILE] = {"bytes": written.bytes, "sha256": written.sha256}  # hashed while written
    return files, written, tokenizer


def _source_entry(checkpoint: Checkpoint, revision: str | None, written: WeightsWritten) -> dict[str, Any]:
    return {
        "model": checkpoint.origin,
        "path": str(checkpoint.path),
        "revision": revision,
        "bytes": checkpoint.weight_bytes,
        "files": {
            file.name: {"bytes": file.stat().st_size, "sha256": written.source_sha256[file]}
            for file in checkpoint.weight_files
        },
    }


@locks_output("output")
def export_onnx(
    model: str | Path,
    output: Path,
    *,
    dtype: str = DEFAULT_EXPORT_DTYPE,
    opset: int = 18,
    revision: str | None = None,
    device: str = "cpu",
    validate: bool = True,
    overwrite: bool = False,
    untie_embeddings: bool = False,
    full_logits: bool = False,
    long_check: bool = False,
) -> ExportResult:
    """Export checkpoint ``model`` (local dir or hub id) to ``output``: model.onnx + model.onnx.data + manifest.

    The graph computes logits only at the positions its ``logits_indices`` input names (see
    :func:`~mexport.export.graph.trace_graph`) unless ``full_logits``. ``long_check`` runs the check past the
    sliding window even when its estimated cost is over the budget (see :mod:`mexport.export.verify`).

    Raises :class:`ValidationFailedError` (after writing the manifest with status "failed") when the logits
    differ from PyTorch beyond the dtype's tolerance.
    """
    _check_options(dtype, opset, device)
    output = Path(output)
    check_output_dir(output.resolve(), overwrite)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    checkpoint = resolve_checkpoint(model, revision)
    if validate:
        check_validation_memory(checkpoint, dtype, device)
    overflow_probe = fp16_overflow_probe(checkpoint.path, device) if validate and dtype == "fp16" else None

    clock = time.perf_counter()
    with console.phase(f"tracing {checkpoint.path.name} ({dtype}, opset {opset})"):
        traced = trace_graph(checkpoint.path, dtype, opset, full_logits)
    stored, sources, data_bytes = _plan(checkpoint, traced, dtype, untie_embeddings)
    timings["trace_s"] = time.perf_counter() - clock
    needs_bytes = int((data_bytes + traced.model.ByteSize() + side_files_bytes(checkpoint)) * FREE_SPACE_MARGIN)
    with write_artifact(
        output, overwrite=overwrite, needs_bytes=needs_bytes, what=f"the export of {checkpoint.path.name}"
    ) as artifact:
        files, written, tokenizer = _write_export_files(
            artifact.path, checkpoint, traced, stored, sources, data_bytes, timings
        )
        manifest = new_manifest(
            "export",
            status="not_validated",
            dtype=dtype,
            opset=opset,
            task=TASK,
            tokenizer=tokenizer,
            model_config=traced.model_config,
            io=io_signature(traced.model),
            files=files,
            weights=_weights_entry(stored, sources, data_bytes),
            source=_source_entry(checkpoint, revision, written),
            export={
                "untie_embeddings": untie_embeddings, "full_logits": full_logits, "device": device,
                "fp16_overflow_probe": overflow_probe,
            },
            timings=timings,
            validation=None,
        )
        timings["export_s"] = time.perf_counter() - started
        artifact.record(manifest)
        if validate:
            clock = time.perf_counter()
            summary = validate_export(checkpoint.path, artifact.path, dtype, device, long_check=long_check)
            timings["validate_s"] = time.perf_counter() - clock
            manifest.update(status=summary["status"], validation=summary)
        timings["total_s"] = time.perf_counter() - started
        if manifest["status"] == "failed":
            artifact.fail(
                f"export written to {output} but its logits differ from PyTorch: {manifest['validation']['failure']}",
                hint="see validation in mexport.json",
            )
        artifact.record()
    return ExportResult(output, manifest, manifest["validation"], timings)
