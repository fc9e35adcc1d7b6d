"""Numeric validation of an export against the PyTorch checkpoint it came from.

Three cases, all compared position by position with a PyTorch full-sequence forward of the same tokens:
prefill longer than the sliding window; step-by-step decoding with the KV cache past the window; a left-padded
batch of two prompts of different lengths then a few decode steps (each row against that row run alone, unpadded).
The reference runs first and is freed before the ONNX Runtime session exists, so they never share RAM. The export's
lean logits input is what every case exercises (all positions, or the compared tail).

Past a long window (Gemma2's 4096) the check runs window + 64 tokens when :func:`plan_check` estimates it affordable
(or ``long_check`` forces it): it compares the last positions around the window's edge, prefilling in chunks. A
transformers upgrade can change the traced masking code; this is where a wrong sliding-window mask would show.

Memory: each side holds the weights once, as stored. The PyTorch reference keeps the checkpoint's bf16 weights
(memory-mapped) and upcasts them module by module when it computes in fp32
(:class:`~mexport.runtime.torch_runtime.TorchDecoder` ``upcast_at_run_time``); ONNX Runtime runs a large bf16 export
with its weights memory-mapped and cast per node (:class:`~mexport.runtime.ort.OrtDecoder` low-memory mode). Measured
by bench/export_memory.py at full width, peak RSS of export + validation / bf16 checkpoint: 1.45 with 2 layers
(2.63 GB; 4.58 when both sides held fp32 weights), 1.23 with 8 layers (5.01 GB): the weights plus ~1 GB.

Tolerances depend on what is actually computed. Where ONNX Runtime computes in fp32 (fp32 exports; bf16/fp16
exports on CPU, which run their stored weights upcast exactly to fp32) the reference is the checkpoint in fp32
and the only differences are op ordering and the constants PyTorch itself keeps in the model dtype: Gemma's
sqrt(hidden) embedding scale, rounded to bf16 (59.87 -> 59.75 at hidden 3584) by PyTorch and the export alike but
not by an fp32 reference. Where it is exact in the export dtype (the tiny fixture's hidden 64) the fp32 bound applies
(measured 2.5e-6); otherwise a bound that covers it (full width, 2 layers: 0.0175, and 8.6e-6 once that one constant
is patched to its fp32 value). Native bf16/fp16 compute (CUDA) is compared with PyTorch in the same dtype with loose
bounds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mexport import console
from mexport.checkpoint import Checkpoint
from mexport.errors import MexportError
from mexport.formats import ELEMENT_BYTES, EXPORT_DTYPES
from mexport.fsutil import format_bytes
from mexport.lazy import require
from mexport.models import family_of
from mexport.runtime.ort import OrtDecoder
from mexport.runtime.torch_runtime import TorchDecoder

FP16_MAX = 65504.0
# short check: every position compared; used whole when the window fits in it
MAX_VALIDATION_TOKENS = 64
SHORT_VALIDATION_TOKENS = 24
PAST_WINDOW_TOKENS = 6
# long check (a window longer than the short check, e.g. Gemma2's 4096): window + LONG_PAST_WINDOW_TOKENS tokens; the
# last COMPARED_TAIL positions (straddling the window's edge) are compared, the prompts prefilled in chunks of
# LONG_CHECK_CHUNK new tokens (bounding the S x S attention scores, and checking chunked prefill against PyTorch's
# one-shot forward). It runs when its estimated cost is within LONG_CHECK_FLOPS (or is forced): measured on a 2-core
# host, the window-4096 fixture's (1.1e11 FLOPs) took 18 s; the full-width 2-layer model's (2.2e13) would take
# tens of minutes there, so it needs --long-check (a GPU host, or patience).
LONG_PAST_WINDOW_TOKENS = 64
COMPARED_TAIL = 96
LONG_CHECK_CHUNK = 1024
LONG_CHECK_PASSES = 6  # full-length sequences run: 2 reference forwards, ONNX prefill, decode case, padded pair
LONG_CHECK_FLOPS = 1e12
DECODE_PROMPT_TOKENS = 4
PADDED_ROW_SHORTER_BY = 5
PADDED_DECODE_STEPS = 3
# RAM validation needs beyond one copy of the weights: the Python / PyTorch / ONNX Runtime libraries, activations of
# the short inputs, weight slices cast to fp32, heap kept from the trace (which grows with depth). Measured by
# bench/export_memory.py at full width: 0.96 GB above the weights with 2 layers, 1.17 GB with 8.
VALIDATION_OVERHEAD_BYTES = 1 << 30
VALIDATION_OVERHEAD_FRACTION = 0.1


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    min_top1: float
    basis: str


TOLERANCES = {
    "fp32": Tolerance(1e-4, 0.95, "fp32 compute on both sides (bf16/fp16 weights upcast exactly)"),
    "bf16": Tolerance(1.0, 0.90, "native bf16 compute vs PyTorch bf16 (8-bit mantissa, logits within +-30)"),
    "fp16": Tolerance(0.25, 0.95, "native fp16 compute vs PyTorch fp16"),
}
# fp32 compute of bf16/fp16 exports whose embedding scale sqrt(hidden) the dtype rounds (as PyTorch does). Measured
# max-abs: 2.9e-4 on the wide fixture (hidden 512); at full width (random weights) 0.0175 with 2 layers and 0.027
# with 8, 0.0253 with all 42 layers of the 9B shape (bench on a 16-core host); the bound keeps room above that. Wrong weights, transposes, masks or positions
# move logits by O(1), far beyond it.
ROUNDED_SCALE_TOLERANCE = Tolerance(
    0.1, 0.95, "fp32 compute of bf16/fp16 weights; embedding scale rounded to the dtype"
)


def validation_memory_bytes(checkpoint: Checkpoint, dtype: str) -> int:
    """RAM a CPU validation needs: the larger of the checkpoint's and the export's weights (each side holds its own
    once, in turn), plus the overhead (Meditron3-Gemma2-9B in bf16: 21.4 GB)."""
    parameters = sum(t.nbytes // t.itemsize for t in checkpoint.tensors.values())
    weights = max(checkpoint.weight_bytes, parameters * ELEMENT_BYTES[dtype])
    return int(weights * (1 + VALIDATION_OVERHEAD_FRACTION)) + VALIDATION_OVERHEAD_BYTES


def check_validation_memory(checkpoint: Checkpoint, dtype: str, device: str) -> None:
    """Refuse up front, before any work, when CPU validation cannot fit in RAM: its weights are memory-mapped, so
    it would not fail but page them in from disk on every forward."""
    if device != "cpu":
        return
    psutil = require("psutil", "checking free memory before validation")
    needed = validation_memory_bytes(checkpoint, dtype)
    available = psutil.virtual_memory().available
    if needed > available:
        raise MexportError(
            f"validating this {dtype} export on CPU needs about {format_bytes(needed)} of RAM, "
            f"{format_bytes(available)} available",
            hint="pass --no-validate (validate later on a larger machine, or use --device cuda)",
        )


def forward_flops(config: dict[str, Any], tokens: int) -> float:
    """Estimated FLOPs of a prefill of ``tokens`` (no past, lean logits): projections, MLP and eager attention's
    S x S scores (computed in full for sliding layers too)."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per_token = hidden * head_dim * 2 * (heads + kv_heads) + 3 * hidden * config["intermediate_size"]
    return 2.0 * layers * tokens * per_token + 4.0 * layers * heads * head_dim * tokens**2


@dataclass(frozen=True)
class CheckPlan:
    """The sequence length the export check uses and whether (and at what estimated cost) it passes the window."""

    length: int
    window_exercised: bool
    compared_tail: int  # positions compared at the end of each sequence; 0: all
    prefill_chunk: int | None
    estimated_flops: float
    forced: bool


def plan_check(config: dict[str, Any], long_check: bool = False) -> CheckPlan:
    """Short check when the window fits in MAX_VALIDATION_TOKENS; else the long one when affordable or forced; else
    (or without a window) SHORT_VALIDATION_TOKENS, the window not exercised."""
    window = config.get("sliding_window")
    if window and window + PAST_WINDOW_TOKENS <= MAX_VALIDATION_TOKENS:
        short = window + PAST_WINDOW_TOKENS
        return CheckPlan(short, True, 0, None, LONG_CHECK_PASSES * forward_flops(config, short), False)
    if window:
        long = window + LONG_PAST_WINDOW_TOKENS
        flops = LONG_CHECK_PASSES * forward_flops(config, long)
        if long_check or flops <= LONG_CHECK_FLOPS:
            forced = long_check and flops > LONG_CHECK_FLOPS
            return CheckPlan(long, True, COMPARED_TAIL, LONG_CHECK_CHUNK, flops, forced)
    short_flops = LONG_CHECK_PASSES * forward_flops(config, SHORT_VALIDATION_TOKENS)
    return CheckPlan(SHORT_VALIDATION_TOKENS, False, 0, None, short_flops, False)


def validation_tokens(config: dict[str, Any], length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded token sequences of the model's ordinary ids (its family's), the second PADDED_ROW_SHORTER_BY
    shorter."""
    rng = np.random.default_rng(seed)
    first, vocab_size = family_of(config).first_ordinary_token, int(config["vocab_size"])
    full = rng.integers(first, vocab_size, size=length, dtype=np.int64)
    other = rng.integers(first, vocab_size, size=length - PADDED_ROW_SHORTER_BY, dtype=np.int64)
    return full, other


def run_rows(decoder: Any, rows: list[tuple[np.ndarray, np.ndarray]], keep: int = 0) -> list[np.ndarray]:
    """Logits of each row: of its last ``keep`` prompt positions (0: every real one) from a left-padded batched
    prefill of the prompts, then of the continuations run one token per step through the KV cache (all
    continuations the same length)."""
    width = max(len(prompt) for prompt, _ in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, (prompt, _) in enumerate(rows):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    logits, past = decoder.forward(ids, mask, None, logits_to_keep=keep)
    per_row = [[logits[row, -(keep or len(prompt)) :]] for row, (prompt, _) in enumerate(rows)]
    for step in range(len(rows[0][1])):
        tokens = np.array([[continuation[step]] for _, continuation in rows], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        logits, past = decoder.forward(tokens, mask, past)
        for row in range(len(rows)):
            per_row[row].append(logits[row])
    return [np.concatenate(parts).astype(np.float32) for parts in per_row]


def compare_logits(candidates: list[np.ndarray], references: list[np.ndarray]) -> dict[str, Any]:
    """Max-abs difference, max-abs relative to the largest reference logit, top-1 agreement over all positions;
    each candidate is compared with the same number of trailing positions of its reference. A position where either
    side has a NaN/inf logit has no difference to measure: the figures are None then, and ``non_finite_positions``
    counts those positions (any of them fails the check)."""
    candidate = np.concatenate(candidates)
    reference = np.concatenate([ref[len(ref) - len(cand) :] for cand, ref in zip(candidates, references, strict=True)])
    non_finite = int(np.sum(~(np.isfinite(candidate).all(-1) & np.isfinite(reference).all(-1))))
    if non_finite:
        return {"max_abs": None, "max_rel": None, "top1_agreement": None, "positions": int(reference.shape[0]),
                "non_finite_positions": non_finite}
    difference = float(np.max(np.abs(candidate - reference)))
    return {
        "max_abs": difference,
        "max_rel": difference / max(float(np.max(np.abs(reference))), 1e-12),
        "top1_agreement": float(np.mean(candidate.argmax(-1) == reference.argmax(-1))),
        "positions": int(reference.shape[0]),
        "non_finite_positions": 0,
    }


def case_failure(name: str, case: dict[str, Any], tolerance: Tolerance) -> str | None:
    """Why one compared case fails ``tolerance`` (non-finite logits on either side always do), or None."""
    if case["non_finite_positions"]:
        return f"{name}: {case['non_finite_positions']} of {case['positions']} positions have NaN/inf logits"
    if case["max_abs"] > tolerance.max_abs:
        return f"{name} max-abs {case['max_abs']:.3g} > {tolerance.max_abs:g}"
    if case["top1_agreement"] < tolerance.min_top1:
        return f"{name} top-1 agreement {case['top1_agreement']:.1%} < {tolerance.min_top1:.0%}"
    return None


def _worst(cases: dict[str, dict[str, Any]], key: str, pick: Any) -> float | None:
    """The worst value of ``key`` over the cases, None when a case has none (non-finite logits)."""
    values = [case[key] for case in cases.values()]
    return None if any(value is None for value in values) else pick(values)


def _reference_logits(
    checkpoint_path: Path, dtype: str, device: str, sequences: list[np.ndarray], keep: int = 0
) -> tuple[list[np.ndarray], str]:
    """PyTorch one-shot logits of each sequence (its last ``keep`` positions, 0: all), and how they were computed;
    the model is freed on return."""
    with TorchDecoder(checkpoint_path, dtype=dtype, device=device, upcast_at_run_time=True) as reference:
        return [run_rows(reference, [(tokens, tokens[:0])], keep)[0] for tokens in sequences], reference.precision


def tolerance_for(dtype: str, compute: str, config: dict[str, Any]) -> Tolerance:
    """The bound for an export of ``dtype`` run with ``compute``: the dtype's own, or for fp32 compute of a bf16/fp16
    export the fp32 one unless the model's family scales its embeddings by a sqrt(hidden) the dtype rounds (see
    module doc)."""
    if compute == dtype:
        return TOLERANCES[dtype]
    rounds = family_of(config).embedding_scale_rounds(EXPORT_DTYPES[dtype], int(config["hidden_size"]))
    return ROUNDED_SCALE_TOLERANCE if rounds else TOLERANCES[compute]


def validate_export(
    checkpoint_path: Path, export_dir: Path, dtype: str, device: str, long_check: bool = False
) -> dict[str, Any]:
    """Compare the export's logits with PyTorch's; returns the summary stored in the manifest."""
    decoder = OrtDecoder(export_dir, device=device)
    compute = decoder.compute_dtype
    config = decoder.graph_info["model_config"]
    tolerance = tolerance_for(dtype, compute, config)
    plan = plan_check(config, long_check)
    full, other = validation_tokens(config, plan.length)
    tail = plan.compared_tail
    # short check: decode from a 4-token prompt; long check: the last steps after a (chunked) prefill
    decode_prompt = len(full) - tail // 2 if tail else DECODE_PROMPT_TOKENS
    with console.phase(f"validating against PyTorch ({compute} compute, {len(full)} tokens)"):
        (reference_full, reference_other), reference_precision = _reference_logits(
            checkpoint_path, compute, device, [full, other], tail
        )
        decoder.prefill_chunk = plan.prefill_chunk
        with decoder:
            prefill = run_rows(decoder, [(full, full[:0])], tail)
            decode = run_rows(decoder, [(full[:decode_prompt], full[decode_prompt:])], tail and tail // 2)
            split_full, split_other = len(full) - PADDED_DECODE_STEPS, len(other) - PADDED_DECODE_STEPS
            padded = run_rows(
                decoder,
                [(full[:split_full], full[split_full:]), (other[:split_other], other[split_other:])],
                tail and tail - PADDED_DECODE_STEPS,
            )
    cases = {
        "prefill": compare_logits(prefill, [reference_full]),
        "decode": compare_logits(decode, [reference_full]),
        "left_padding": compare_logits(padded, [reference_full, reference_other]),
    }
    failures = [failure for name, case in cases.items() if (failure := case_failure(name, case, tolerance))]
    return {
        "status": "failed" if failures else "passed",
        "failure": "; ".join(failures) or None,
        "runtime": decoder.precision,
        "reference": reference_precision,
        "device": device,
        "tolerance": asdict(tolerance),
        "inputs": {
            "sequence_length": len(full),
            "sliding_window": decoder.spec.sliding_window,
            "window_exercised": plan.window_exercised,
            "compared_positions": tail or len(full),
            "prefill_chunk": plan.prefill_chunk,
            "estimated_flops": plan.estimated_flops,
            "long_check_flops_budget": LONG_CHECK_FLOPS,
            "long_check_forced": plan.forced,
            "decode_prompt": decode_prompt,
            "decode_steps": len(full) - decode_prompt,
            "padded_rows": [len(full), len(other)],
            "padded_decode_steps": PADDED_DECODE_STEPS,
        },
        "cases": cases,
        "max_abs": _worst(cases, "max_abs", max),
        "max_rel": _worst(cases, "max_rel", max),
        "top1_agreement": _worst(cases, "top1_agreement", min),
    }


def _floating_tensors(torch: Any, value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _floating_tensors(torch, item)]
    return []


def fp16_overflow_probe(checkpoint_path: Path, device: str) -> dict[str, Any]:
    """Run the checkpoint in fp16 on the validation inputs, watching every module's outputs for overflow.

    Refuses (before anything is written) when an activation or logit becomes inf/NaN; otherwise returns the
    margin (largest |activation| / 65504) and warns when it is thin.
    """
    torch = require("torch", "probing fp16 overflow")
    largest = 0.0
    overflowed: list[str] = []

    def watch(module: Any, _inputs: Any, output: Any) -> None:
        nonlocal largest
        for tensor in _floating_tensors(torch, output):
            if not bool(torch.isfinite(tensor).all()):
                overflowed.append(type(module).__name__)
            else:
                largest = max(largest, float(tensor.abs().max()))

    reference = TorchDecoder(checkpoint_path, dtype="fp16", device=device)
    config = family_of(reference.config).model_config(reference.config)
    full, other = validation_tokens(config, plan_check(config).length)
    with console.phase("probing fp16 activations for overflow"):
        handle = torch.nn.modules.module.register_module_forward_hook(watch)
        try:
            _reference_logits(checkpoint_path, "fp16", device, [full, other])
        finally:
            handle.remove()
    if overflowed:
        raise MexportError(
            f"fp16 overflows on this model: inf/NaN in the outputs of {', '.join(sorted(set(overflowed)))} "
            f"(largest finite |activation| {largest:.4g}, fp16 max {FP16_MAX:g})",
            hint="export with --dtype bf16 (same range as fp32)",
        )
    margin = largest / FP16_MAX
    if margin > 0.25:
        console.warn(f"fp16 headroom is thin: largest |activation| {largest:.4g} is {margin:.0%} of the fp16 max")
    return {"max_abs_activation": largest, "fp16_max": FP16_MAX, "margin": margin}
