"""What a quantization did and what it cost: node counts, bytes, and a quick numeric check against the export.

The numeric check runs the unquantized export and the quantized model with ONNX Runtime on the CPU over a few
prompts and compares every position's next-token distribution. It is a smoke test of the graph edits, not the
accuracy verdict (``mexport validate`` scores the MCQ tasks).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mexport.console import progress
from mexport.fsutil import format_bytes
from mexport.numerics import log_softmax


def compare_logits(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
    """Agreement of per-position next-token distributions (each array (S, V)); KL is KL(reference || candidate).

    A NaN/inf logit on either side leaves nothing to compare: ``finite`` is False, the positions are counted per
    side, and the figures are None (a NaN would compare as agreement, and is not JSON)."""
    ref = np.concatenate(reference)
    cand = np.concatenate(candidate)
    non_finite = {
        "export": int(np.sum(~np.isfinite(ref).all(-1))),
        "quantized": int(np.sum(~np.isfinite(cand).all(-1))),
    }
    summary: dict[str, Any] = {
        "positions": int(ref.shape[0]),
        "finite": not any(non_finite.values()),
        "non_finite_positions": non_finite,
    }
    if not summary["finite"]:
        return {**summary, **dict.fromkeys(("max_abs_logit_diff", "top1_agreement", "mean_kl", "max_kl"))}
    ref_log, cand_log = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(ref_log) * (ref_log - cand_log)).sum(axis=-1)
    return {
        **summary,
        "max_abs_logit_diff": float(np.abs(ref - cand).max()),
        "top1_agreement": float(np.mean(ref.argmax(-1) == cand.argmax(-1))),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


def non_finite_message(check: dict[str, Any]) -> str:
    """Which side of the numeric check produced NaN/inf logits, and at how many positions."""
    return ", ".join(
        f"the {side} model at {count} of {check['positions']} positions"
        for side, count in check["non_finite_positions"].items()
        if count
    )


def prompt_logits(model_dir: Path, prompts: list[np.ndarray], description: str) -> tuple[list[np.ndarray], str]:
    """Logits (S, V) of each prompt (1, S) run alone, no padding, through :class:`OrtDecoder` on the CPU, and how
    they were computed (the runtime's precision)."""
    from mexport.runtime.ort import OrtDecoder

    results = []
    with OrtDecoder(model_dir, device="cpu") as runtime, progress() as bar:
        task = bar.add_task(description, total=len(prompts))
        for ids in prompts:
            logits, _ = runtime.forward(ids, np.ones_like(ids))
            results.append(logits[0])
            bar.advance(task)
    return results, runtime.precision


def node_counts(model: Any, quantized: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Quantized layers by op type and precision, and the Q/DQ nodes in the graph."""
    by_op: Counter[str] = Counter()
    op_types = {node.name: node.op_type for node in model.graph.node}
    for name, entry in quantized.items():
        precision = entry["weights"] + (f"/{entry['activations']}" if entry["activations"] else "")
        by_op[f"{op_types[name]} {precision}"] += 1
    qdq = Counter(node.op_type for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return {"quantized_layers": dict(sorted(by_op.items())), "qdq_nodes": dict(sorted(qdq.items()))}


def model_bytes(model_dir: Path, files: tuple[str, ...]) -> int:
    return sum((Path(model_dir) / name).stat().st_size for name in files if (Path(model_dir) / name).is_file())


def report_tables(report: dict[str, Any]) -> list[Any]:
    """Rich tables for the CLI: what was quantized, and the numeric check."""
    from rich.table import Table

    layers = Table(title="Quantized layers", title_justify="left")
    layers.add_column("op (weights/activations)")
    layers.add_column("count", justify="right")
    for key, count in report["counts"]["quantized_layers"].items():
        layers.add_row(key, str(count))
    for key, count in report["counts"]["qdq_nodes"].items():
        layers.add_row(f"[dim]{key} nodes[/dim]", str(count))
    layers.add_row("[dim]excluded linear layers[/dim]", str(report["excluded_layers"]))
    before, after = report["bytes"]["before"], report["bytes"]["after"]
    layers.add_row("model bytes", f"{format_bytes(before)} -> {format_bytes(after)} ({after / max(before, 1):.2f}x)")

    check = report.get("numeric_check")
    numbers = Table(title="Numeric check vs the unquantized export (ONNX Runtime CPU)", title_justify="left")
    numbers.add_column("metric")
    numbers.add_column("value", justify="right")
    if check is None:
        numbers.add_row("skipped", "")
    elif not check["finite"]:
        numbers.add_row("NaN/inf logits", non_finite_message(check))
    else:
        numbers.add_row("prompts / positions", f"{check['prompts']} / {check['positions']}")
        numbers.add_row("top-1 agreement", f"{check['top1_agreement']:.1%}")
        numbers.add_row("max |logit diff|", f"{check['max_abs_logit_diff']:.4g}")
        numbers.add_row("mean KL (nats)", f"{check['mean_kl']:.3g}")
        numbers.add_row("max KL (nats)", f"{check['max_kl']:.3g}")
    if check is not None and "compute" in check:
        numbers.caption = f"export: {check['compute']['export']}; quantized: {check['compute']['quantized']}"
    return [layers, numbers]
