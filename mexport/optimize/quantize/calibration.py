"""Calibration: which texts, and the activation statistics of the linear layers' inputs on them.

Default texts are medical MCQ questions with the correct answer appended (in-distribution for the model's
intended use), shipped with quantize in ``data/medical_mcq.jsonl`` (written from validation's samples by
``tools/write_calibration_texts.py``, so a change to the validation tasks never changes calibration silently).
Statistics come from running the
exported graph itself with ONNX Runtime on the CPU, with per-channel reductions added as extra graph outputs
(so a 14336-wide activation returns 14336 numbers, not the tensor); bf16 exports run through the runtime's
fp32-compute rewrite (:mod:`mexport.runtime.upcast`), with the weights kept stored and cast per node as they run
when they are large (the rule and session settings of :class:`~mexport.runtime.ort.OrtDecoder`'s low-memory mode):
a folded session would hold an fp32 copy of every weight, ~37 GB for Meditron3-Gemma2-9B.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mexport.console import progress
from mexport.errors import MexportError
from mexport.formats import LOGITS_INDICES
from mexport.lazy import require
from mexport.manifest import sha256_bytes
from mexport.optimize.quantize.graph import ModelGraph, prune_unused
from mexport.runtime.base import position_ids_from_mask
from mexport.runtime.ort import ort_session, prefers_low_memory
from mexport.runtime.upcast import bound_weight_upcasts, upcast_to_float32

DEFAULT_CALIBRATION_FILE = Path(__file__).with_name("data") / "medical_mcq.jsonl"  # rows {"task", "text"}
DEFAULT_SOURCE = "shipped MCQ samples (mexport/optimize/quantize/data, answers appended)"
MAX_CALIBRATION_TOKENS = 512
# activation rows kept per tensor for AWQ's search (a random subset of all calibration tokens)
AWQ_ROWS = 512
# Gram matrices (X^T X, float32) gathered in one calibration pass: a quarter of the weights' bytes, at least
# this much; more are split over several passes
MIN_GRAM_BUDGET_BYTES = 1 << 30
SYMMETRIZE_ROWS = 1024
TEXT_SUFFIXES = (".jsonl", ".txt", ".text", ".md")


@dataclass
class CalibrationSet:
    texts: list[str]
    source: str
    seed: int

    @property
    def sha256(self) -> str:
        return sha256_bytes(json.dumps(self.texts, ensure_ascii=False).encode())

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "n": len(self.texts), "seed": self.seed}


def _default_rows() -> list[dict[str, str]]:
    try:
        lines = DEFAULT_CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MexportError(
            f"the shipped calibration text {DEFAULT_CALIBRATION_FILE} cannot be read ({exc})",
            hint="reinstall mexport, or pass --calib FILE (JSONL with a 'text' field, or plain text)",
        ) from exc
    return [json.loads(line) for line in lines if line.strip()]


def calibration_task_names() -> list[str]:
    """The tasks whose questions the shipped calibration text holds (``--calib NAME`` picks one)."""
    return list(dict.fromkeys(row["task"] for row in _default_rows()))


def default_texts(task: str | None = None) -> list[str]:
    """The shipped calibration texts: all of them, or the questions of one task (``--calib medqa``)."""
    rows = _default_rows()
    if task is None:
        return [row["text"] for row in rows]
    names = calibration_task_names()
    if task not in names:
        raise MexportError(
            f"calibration data {task}: no such file, and not a task name ({', '.join(names)})",
            hint="pass --calib FILE (JSONL with a 'text' field, or plain text), or a task name for its sample",
        )
    return [row["text"] for row in rows if row["task"] == task]


def read_text_file(path: Path) -> list[str]:
    """Samples from a JSONL file (each row's string field "text") or a plain text file (one per paragraph when
    blank lines separate paragraphs, else one per non-empty line)."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MexportError(
            f"cannot read calibration file {path}: {exc}", hint="pass a readable UTF-8 text or JSONL file"
        ) from exc
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MexportError(
                    f"{path}:{number}: malformed JSON ({exc.msg})", hint="each line must be one JSON object"
                ) from exc
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                got = "missing" if not isinstance(row, dict) or "text" not in row else type(text).__name__
                raise MexportError(
                    f'{path}:{number}: field "text": expected the sample as a string, got {got}',
                    hint='calibration JSONL rows are {"text": "..."}; a plain .txt file takes one sample per '
                    "paragraph",
                )
            texts.append(text)
    else:
        blocks = [block.strip() for block in content.split("\n\n")]
        if len([block for block in blocks if block]) <= 1:
            blocks = [line.strip() for line in content.splitlines()]
        texts = [block for block in blocks if block]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise MexportError(
            f"calibration file {path} has no text samples", hint="pass a file with at least one non-blank sample"
        )
    return texts


def load_calibration(calib: str | Path | None, size: int, seed: int) -> CalibrationSet:
    """``size`` texts drawn with ``seed`` from a file, a task's shipped sample (task name), or all samples."""
    if size < 1:
        raise MexportError(f"--calib-size must be at least 1, got {size}", hint="pass --calib-size N with N >= 1")
    if calib is None:
        try:
            texts, source = default_texts(), DEFAULT_SOURCE
        except (MexportError, OSError, ValueError, KeyError) as exc:
            raise MexportError(
                f"this recipe needs calibration data and the default samples are unavailable ({exc})",
                hint="pass --calib FILE (JSONL with a 'text' field, or plain text)",
            ) from exc
    else:
        path = Path(calib).expanduser()
        if path.is_file():
            texts, source = read_text_file(path), str(path)
        else:
            texts, source = default_texts(str(calib)), f"{calib} sample"
    if len(texts) > size:
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), size))]
    return CalibrationSet(texts, source, seed)


def tokenize(model_dir: Path, texts: list[str], max_tokens: int) -> list[np.ndarray]:
    """Token ids (1, n) per text with the export's own tokenizer (BOS added as the model expects)."""
    transformers = require("transformers", "tokenizing calibration text")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoded = [tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"] for text in texts]
    return [np.asarray([ids], dtype=np.int64) for ids in encoded if ids]


@dataclass
class ActivationStats:
    """Per-input-channel statistics of one activation tensor over every calibration token."""

    absmax: np.ndarray
    abs_sum: np.ndarray
    tokens: int
    rows: np.ndarray | None = None  # sampled activation rows (AWQ only)
    gram_sum: np.ndarray | None = None  # upper triangle of sum x^T x over every token, float32 (GPTQ only)

    def take_hessian(self) -> np.ndarray:
        """``X^T X / n`` (GPTQ's Hessian of the squared output error), made in place from the Gram sum, which it
        replaces: the largest array of a calibration (822 MB for the 9B's down_proj)."""
        if self.gram_sum is None:
            raise RuntimeError("no Gram matrix: calibrate with grams=True")
        hessian, self.gram_sum = self.gram_sum, None
        hessian /= max(self.tokens, 1)
        for start in range(0, len(hessian), SYMMETRIZE_ROWS):  # mirror the upper triangle, a band at a time
            stop = start + SYMMETRIZE_ROWS
            band = hessian[start:stop, start:stop]
            band[...] = np.triu(band) + np.triu(band, 1).T
            hessian[stop:, start:stop] = hessian[start:stop, stop:].T
        return hessian

    @property
    def amax(self) -> float:
        return float(self.absmax.max())

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)


def _stats_graph(
    graph: ModelGraph, tensors: dict[str, int], keep_rows: bool, grams: bool = False
) -> tuple[Any, dict[str, list[str]]]:
    """A copy of the graph whose outputs are per-channel |x| max and sum (and the rows) of ``tensors``."""
    onnx = require("onnx")
    helper = onnx.helper
    model = copy.deepcopy(graph.model)
    # the statistics are the only outputs: what no statistic depends on (the LM head, the largest GEMM, and the
    # layers after the last one calibrated) is pruned below, and ONNX Runtime never computes it
    del model.graph.output[:]
    outputs: dict[str, list[str]] = {}
    axes_as_input = graph.opset >= 18
    for index, (tensor, features) in enumerate(tensors.items()):
        prefix = f"mexport_calibration_{index}"
        shape = helper.make_tensor(f"{prefix}_shape", onnx.TensorProto.INT64, [2], [-1, features])
        axes = helper.make_tensor(f"{prefix}_axes", onnx.TensorProto.INT64, [1], [0])
        model.graph.initializer.extend([shape, axes])
        reduce_attributes: dict[str, Any] = {"keepdims": 0} if axes_as_input else {"keepdims": 0, "axes": [0]}
        reduce_inputs = [f"{prefix}_abs", f"{prefix}_axes"] if axes_as_input else [f"{prefix}_abs"]
        model.graph.node.extend(
            [
                helper.make_node("Cast", [tensor], [f"{prefix}_float"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Reshape", [f"{prefix}_float", f"{prefix}_shape"], [f"{prefix}_rows"]),
                helper.make_node("Abs", [f"{prefix}_rows"], [f"{prefix}_abs"]),
                helper.make_node("ReduceMax", reduce_inputs, [f"{prefix}_absmax"], **reduce_attributes),
                helper.make_node("ReduceSum", reduce_inputs, [f"{prefix}_abssum"], **reduce_attributes),
            ]
        )
        names = [f"{prefix}_absmax", f"{prefix}_abssum"] + ([f"{prefix}_rows"] if keep_rows or grams else [])
        for name in names:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        outputs[tensor] = names
    prune_unused(model.graph)
    return model, outputs


def _session(graph: ModelGraph, model: Any, dtype: str, low_memory: bool | None) -> Any:
    """A CPU session over the in-memory graph; weights stay in the export's data file. A bf16/fp16 graph computes
    in fp32, with bounded weight upcasts when ``low_memory`` (None: when the weights are large, as OrtDecoder)."""
    require("onnxruntime", "running the graph for calibration")
    bounded = False
    if dtype != "fp32":
        bounded = prefers_low_memory(graph.model_dir) if low_memory is None else low_memory
        upcast_to_float32(model)
        if bounded:
            bound_weight_upcasts(model)
    return ort_session(model.SerializeToString(), ["CPUExecutionProvider"], graph.model_dir, bounded)


def prefill_feeds(manifest: dict[str, Any], input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one unpadded prompt with an empty KV cache (fp32 cache: the session computes in fp32)."""
    config = manifest["model_config"]
    mask = np.ones_like(input_ids)
    feeds: dict[str, np.ndarray] = {}
    for entry in manifest["io"]["inputs"]:
        name = entry["name"]
        if name == "input_ids":
            feeds[name] = input_ids
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "position_ids":
            feeds[name] = position_ids_from_mask(mask, input_ids.shape[1])
        elif name == LOGITS_INDICES:  # every position: the LM head's input statistics cover all rows
            feeds[name] = np.arange(input_ids.shape[1], dtype=np.int64)
        elif name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_dim"]), dtype=np.float32)
        else:
            raise MexportError(f"graph input {name!r} is not one a decoder export has; cannot calibrate")
    return feeds


def collect_activation_stats(
    graph: ModelGraph,
    manifest: dict[str, Any],
    tensors: dict[str, int],
    token_ids: list[np.ndarray],
    keep_rows: bool = False,
    seed: int = 0,
    low_memory: bool | None = None,
    grams: bool = False,
) -> dict[str, ActivationStats]:
    """Run every calibration sample and reduce the ``tensors`` ({name: channels}) to per-channel statistics
    (and with ``grams`` each one's ``X^T X``; :func:`gram_batches` keeps those within memory).
    ``low_memory`` forces the bounded fp32 upcast of a bf16/fp16 graph on or off (None: by weight size)."""
    model, outputs = _stats_graph(graph, tensors, keep_rows, grams)
    session = _session(graph, model, manifest["dtype"], low_memory)
    stats = {
        tensor: ActivationStats(np.zeros(n, np.float32), np.zeros(n, np.float64), 0) for tensor, n in tensors.items()
    }
    sampled_rows: dict[str, list[np.ndarray]] = {tensor: [] for tensor in tensors}
    rng = np.random.default_rng(seed)
    rows_per_sample = -(-AWQ_ROWS // max(len(token_ids), 1))
    fetch = [name for names in outputs.values() for name in names]
    with progress() as bar:
        task = bar.add_task("calibrating", total=len(token_ids))
        for ids in token_ids:
            values = dict(zip(fetch, session.run(fetch, prefill_feeds(manifest, ids)), strict=True))
            for tensor, names in outputs.items():
                entry = stats[tensor]
                np.maximum(entry.absmax, values[names[0]], out=entry.absmax)
                entry.abs_sum += values[names[1]]
                entry.tokens += ids.shape[1]
                if grams:
                    entry.gram_sum = _add_gram(entry.gram_sum, values[names[2]])
                if keep_rows:
                    rows = values[names[2]]
                    take = rng.choice(rows.shape[0], size=min(rows_per_sample, rows.shape[0]), replace=False)
                    sampled_rows[tensor].append(rows[np.sort(take)])
            bar.advance(task)
    if keep_rows:
        for tensor, chunks in sampled_rows.items():
            stats[tensor].rows = np.concatenate(chunks)[:AWQ_ROWS]
    return stats


def _add_gram(gram: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """``gram += rows^T rows`` in place (upper triangle, BLAS syrk: no temporary the size of the matrix)."""
    from scipy.linalg import blas

    if gram is None:
        gram = np.zeros((rows.shape[1], rows.shape[1]), dtype=np.float32, order="F")
    updated = blas.ssyrk(1.0, np.asarray(rows, np.float32), beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)
    if updated is not gram:  # BLAS wrote a copy (never for a Fortran-ordered float32 matrix)
        gram[...] = updated
    return gram


def gram_budget(weight_bytes: int) -> int:
    """Bytes of Gram matrices one calibration pass may hold: a quarter of the model's weights, at least 1 GiB."""
    return max(MIN_GRAM_BUDGET_BYTES, weight_bytes // 4)


def gram_batches(tensors: dict[str, int], budget_bytes: int) -> list[dict[str, int]]:
    """``tensors`` ({name: channels}, in graph order) split into runs whose float32 Gram sums fit ``budget_bytes``
    (each run is one calibration pass; a single tensor over the budget gets a pass of its own)."""
    batches: list[dict[str, int]] = [{}]
    used = 0
    for tensor, channels in tensors.items():
        size = 4 * channels * channels
        if batches[-1] and used + size > budget_bytes:
            batches.append({})
            used = 0
        batches[-1][tensor] = channels
        used += size
    return batches
