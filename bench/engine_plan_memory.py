"""Planned TensorRT engine memory of Meditron3-Gemma2-9B at H100 defaults, full vs lean logits.

The 9B's real graph is traced (weightless, ~20 s on 2 cores: no checkpoint download) from its ``config.json`` in
both forms, the full-logits graph (``--full-logits``: the LM head over every new position) and the default
lean graph (``logits_indices``), and :func:`mexport.optimize.engine.plan_engine`
plans each at ``--target h100-80gb`` with the default limits (batch 8, input 2048, context 4096). Planning is
deterministic arithmetic, so one run is the figure; there is nothing to repeat. The first row plans the full graph
with 2048-token prefill calls (``--prefill-chunk 2048``), one prefill profile of full calls (the plan adds a chunk
profile of that size after a past, so it is larger than the 14.09 GB a plan of prefill and decode profiles alone
gives); ratios are given against both.

    python bench/engine_plan_memory.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

# Meditron3-Gemma2-9B's config.json (the fields the trace and the plan read)
GEMMA2_9B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "num_hidden_layers": 42,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "hidden_size": 3584,
    "intermediate_size": 14336, "vocab_size": 256000, "sliding_window": 4096, "query_pre_attn_scalar": 224,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "cache_implementation": "hybrid",
}
FULL_LOGITS_PLAN_BYTES = 14.09e9  # activations of a full-logits plan with prefill + decode profiles only, h100-80gb


def traced_manifest_dir(
    workdir: Path, full_logits: bool, config: dict[str, Any] = GEMMA2_9B_CONFIG, label: str | None = None
) -> Path:
    """A directory holding the manifest a bf16 export of ``config``'s model would write (its io and model_config
    from the real weightless trace)."""
    from mexport.export.graph import trace_graph
    from mexport.manifest import io_signature, new_manifest, write_manifest

    label = label or ("full" if full_logits else "lean")
    checkpoint = workdir / f"{label}-checkpoint"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps(config))
    traced = trace_graph(checkpoint, "bf16", 18, full_logits=full_logits)
    io = io_signature(traced.model)
    io["inputs"] = [entry for entry in io["inputs"] if entry["name"] not in traced.parameters]  # weights: stored
    directory = workdir / label
    directory.mkdir()
    write_manifest(directory, new_manifest("export", status="passed", dtype="bf16", opset=18,
                                           model_config=traced.model_config, io=io, files={}))
    return directory


def plan_row(label: str, directory: Path, **settings: Any) -> dict[str, Any]:
    from mexport.optimize.engine import EngineSettings, plan_engine

    plan = plan_engine(directory, EngineSettings(target="h100-80gb", **settings))
    memory = plan.memory
    return {"label": label, "activations": memory.activation_bytes, "total": memory.total_bytes,
            "profiles": [profile.name for profile in plan.profiles]}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mexport-bench-plan-") as scratch:
        full = traced_manifest_dir(Path(scratch), full_logits=True)
        lean = traced_manifest_dir(Path(scratch), full_logits=False)
        rows = [
            plan_row("full logits, 2048-token calls", full, prefill_chunk=2048),
            plan_row("full logits, 256-token chunks", full),
            plan_row("lean logits, 256-token chunks (default)", lean),
        ]
    print("Meditron3-Gemma2-9B (traced), bf16, h100-80gb, batch 8, input 2048, context 4096")
    print(f"{'plan':<42} {'activations GB':>15} {'total GB':>9} {'vs row 1':>9} {'vs 14.09 GB':>12}")
    for row in rows:
        activations = row["activations"]
        print(f"{row['label']:<42} {activations / 1e9:>15.2f} {row['total'] / 1e9:>9.2f} "
              f"{activations / rows[0]['activations']:>8.3f}x {activations / FULL_LOGITS_PLAN_BYTES:>11.3f}x")
    print("target: activations <= 2.5 GB")


if __name__ == "__main__":
    main()
