"""Engine plans and export memory of the Meditron3 Llama-3.1 and Qwen2.5 models, traced at their real shapes.

Each model's graph is traced without weights (as ``mexport onnx`` traces it: lazily-committed zero parameters, lean
logits, bf16) from its ``config.json`` fields, in a fresh process whose peak RSS is the trace's; the traced io and
model_config (parameter count included) go into an export manifest and one quantize manifest per recipe, and
:func:`mexport.optimize.engine.plan_engine` plans each at the default limits (batch 8, input 2048, context 4096).
Planning is deterministic arithmetic; the trace's peak RSS varies a little between runs.

Export memory on a CPU machine: without the check (``--no-validate``) the export streams weights shard by shard, so
its peak is the trace's; with the check it is 1.14 x the bf16 checkpoint (measured by bench/export_memory.py on the
42-layer Gemma2-9B shape: 21.08 GB for an 18.48 GB checkpoint), applied here to each checkpoint's bytes.

    python bench/engine_plan_suite.py            # all four models
    python bench/engine_plan_suite.py 70b        # one
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

LLAMA31_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256, "head_dim": 128,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
QWEN25_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072,
    "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 152064,
    "bos_token_id": 151643, "eos_token_id": 151645,
}
# the config.json fields of each Meditron3 model's base (public model cards)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "8b": ("Meditron3-8B (Llama-3.1-8B)", {
        **LLAMA31_COMMON, "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8,
    }),
    "70b": ("Meditron3-70B (Llama-3.1-70B)", {
        **LLAMA31_COMMON, "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8,
    }),
    "qwen7b": ("Meditron3-Qwen2.5-7B", {
        **QWEN25_COMMON, "num_hidden_layers": 28, "max_window_layers": 28, "hidden_size": 3584,
        "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
    }),
    "qwen14b": ("Meditron3-Qwen2.5-14B", {
        **QWEN25_COMMON, "num_hidden_layers": 48, "max_window_layers": 48, "hidden_size": 5120,
        "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 8,
    }),
}
RECIPES = (None, "fp8", "int8-sq", "int8-wo", "int4-wo")
CHECK_RSS_PER_CHECKPOINT_BYTE = 21.08 / 18.48  # bench/export_memory.py, 42-layer 9B shape, export + check
WORKPLACE_RAM = 24 * 2**30


def trace_in_this_process(key: str, workdir: Path) -> None:
    """Trace ``key``'s model and write its export manifest dir; prints the peak RSS (bytes) as JSON."""
    from engine_plan_memory import traced_manifest_dir

    directory = traced_manifest_dir(workdir, full_logits=False, config=MODELS[key][1], label=key)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"dir": str(directory), "peak_rss": peak}))


def quantized_manifest_dir(export_dir: Path, recipe: str) -> Path:
    """The manifest a quantize of ``export_dir`` with ``recipe`` writes (same io; no files: the plan counts the
    quantized GEMM weights at the recipe's bits)."""
    from mexport.manifest import new_manifest, read_manifest, write_manifest

    parent = read_manifest(export_dir)
    directory = export_dir.with_name(f"{export_dir.name}-{recipe}")
    directory.mkdir()
    write_manifest(directory, new_manifest(
        "quantize", status="passed", dtype=parent["dtype"], opset=parent["opset"],
        model_config=parent["model_config"], io=parent["io"], files={}, recipe={"name": recipe},
    ))
    return directory


def gb(value: float) -> str:
    return f"{value / 1e9:.1f}"


def report(key: str, workdir: Path) -> None:
    from mexport.optimize.engine import GPU_TARGETS, EngineSettings, plan_engine

    child = subprocess.run(
        [sys.executable, __file__, "--trace", key, str(workdir)], check=True, capture_output=True, text=True
    )
    traced = json.loads(child.stdout.strip().splitlines()[-1])
    export_dir = Path(traced["dir"])
    name, _ = MODELS[key]
    plans = []
    for recipe in RECIPES:
        directory = export_dir if recipe is None else quantized_manifest_dir(export_dir, recipe)
        plans.append((recipe or "bf16", plan_engine(directory, EngineSettings())))
    model_config = json.loads((export_dir / "mexport.json").read_text())["model_config"]
    parameters = int(model_config["parameter_count"])
    checkpoint = 2 * parameters
    check_rss = checkpoint * CHECK_RSS_PER_CHECKPOINT_BYTE
    print(f"\n{name}: {parameters / 1e9:.2f} B parameters, bf16 checkpoint {gb(checkpoint)} GB; "
          f"KV {plans[0][1].memory.kv_bytes_per_token:,} B/token")
    print(f"  export on CPU: --no-validate peak RSS {gb(traced['peak_rss'])} GB (trace, measured; weights streamed), "
          f"disk {gb(checkpoint)} GB; with the check ~{gb(check_rss)} GB "
          f"({CHECK_RSS_PER_CHECKPOINT_BYTE:.2f} x checkpoint): "
          f"{'fits' if check_rss <= WORKPLACE_RAM else 'does not fit'} a 24 GB machine")
    header = f"  {'engine':<8} {'weights GB':>10} {'total GB':>9}  " + " ".join(f"{t:>10}" for t in GPU_TARGETS)
    print(header)
    for label, plan in plans:
        fits = " ".join(f"{'yes' if reason is None else 'no':>10}" for reason in plan.fits_per_gpu.values())
        print(f"  {label:<8} {gb(plan.memory.weights_bytes):>10} {gb(plan.memory.total_bytes):>9}  {fits}")


def main() -> None:
    if sys.argv[1:2] == ["--trace"]:
        trace_in_this_process(sys.argv[2], Path(sys.argv[3]))
        return
    keys = sys.argv[1:] or list(MODELS)
    print("default limits: batch 8, input 2048, context 4096, workspace 4 GB, lean logits; bf16 graph")
    with tempfile.TemporaryDirectory(prefix="mexport-bench-suite-") as scratch:
        for key in keys:
            report(key, Path(scratch))


if __name__ == "__main__":
    main()
