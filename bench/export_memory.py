"""Peak memory, wall time and output size of `mexport onnx` vs `optimum-cli export onnx` at real Gemma2 width.

Builds a Gemma2 with Meditron3-Gemma2-9B's full width (hidden 3584, intermediate 14336, 16/8 heads, head_dim 256,
vocab 256000, tied embeddings, sliding window 4096) but only ``--layers`` layers, random bf16 weights saved as a
sharded safetensors checkpoint (~2.6 GB for 2 layers), then runs each tool in its own wrapper process so
``ru_maxrss`` of RUSAGE_CHILDREN is that tool's peak alone. Figures are per checkpoint byte, the same ratios that
the 9B targets use (peak RSS / checkpoint <= 1.5, stretch 1.2; bf16 output / checkpoint <= 1.05).

    python bench/export_memory.py [--layers 2] [--skip-optimum] [--workdir DIR] [--keep]

``--layers 42`` builds a Meditron3-Gemma2-9B-shaped model (18.5 GB): it needs ~37 GB of disk with --skip-optimum
(checkpoint + one export at a time), ~56 GB without, and ~6 GB of RAM to build (one shard and the embedding's fp32
draw at a time); validation then needs ~20 GB of RAM.

Measured here (2 CPU cores), peak RSS / checkpoint and wall time with --skip-optimum:
    2 layers (2.63 GB): export only 0.38 in 13 s; export + validation 1.37 in 42 s (4.58 before validation kept
                        the weights in bf16 on both sides)
    8 layers (5.01 GB): export only 0.22 in 21 s; export + validation 1.23 in 81 s
Validation holds the weights plus ~1 GB, so the ratio falls with depth.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mexport.fsutil import check_free_space, dir_bytes, format_bytes

FULL_WIDTH = {
    "vocab_size": 256000,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "query_pre_attn_scalar": 224,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
SHARD_BYTES = 1 << 30
# runs a command, sends its stdout to stderr, prints {"rc", "wall_s", "peak_rss_bytes"} as the last stdout line
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=sys.stderr)
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_bytes": peak_kib * 1024}))
"""


def shard_plan(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most SHARD_BYTES (unless one tensor is larger)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shard_bytes and shard_bytes + nbytes > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def build_checkpoint(
    directory: Path, layers: int, disk_needed_per_byte: float, shape: dict | None = None
) -> int:
    """Random-weight Gemma2 (``shape``: config fields, default FULL_WIDTH) as sharded bf16 safetensors + tokenizer;
    returns the weight bytes.

    Shards are generated and written one at a time, so building needs one shard of RAM, not the whole model.
    ``disk_needed_per_byte``: disk needed per checkpoint byte (the checkpoint plus the exports kept at once).
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    from mexport.fixtures.tiny_gemma2 import train_tokenizer

    config = transformers.Gemma2Config(num_hidden_layers=layers, torch_dtype="bfloat16", **(shape or FULL_WIDTH))
    with torch.device("meta"):
        model = transformers.Gemma2ForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied head listed once
    estimate = sum(2 * math.prod(shape) for shape in shapes.values())
    needed = int(estimate * disk_needed_per_byte)
    check_free_space(directory.parent, needed, what="the benchmark checkpoint and exports")
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    plan = shard_plan(shapes)
    weight_map = {}
    for index, names in enumerate(plan, start=1):
        filename = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        print(f"  writing {filename}", flush=True)
        shard = {name: (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16) for name in names}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del shard
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": estimate}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(directory)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(directory)
    train_tokenizer(1024).save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def measure(name: str, command: list[str], output: Path, log: Path) -> dict:
    """Run ``command`` in a fresh wrapper process; its own peak RSS, wall time and output size."""
    print(f"running {name}: {' '.join(command)}", flush=True)
    with open(log, "w") as log_handle:
        finished = subprocess.run(
            [sys.executable, "-c", WRAPPER, *command], check=False, stdout=subprocess.PIPE, stderr=log_handle, text=True
        )
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result.update(name=name, output_bytes=dir_bytes(output) if output.exists() else 0, log=str(log))
    manifest_path = output / "mexport.json"
    if manifest_path.is_file():  # mexport's own account: validation verdict and figures, phase timings
        manifest = json.loads(manifest_path.read_text())
        result.update(status=manifest["status"], validation=manifest.get("validation"), timings=manifest.get("timings"))
    if result["rc"] != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        print(f"  {name} failed (exit {result['rc']}): {' | '.join(tail)}", flush=True)
    return result


def report(results: list[dict], checkpoint_bytes: int) -> None:
    print(f"\ncheckpoint: {format_bytes(checkpoint_bytes)} (bf16 safetensors)")
    header = (
        f"{'tool':<28}{'exit':>5}{'status':>15}{'wall s':>9}{'peak RSS':>11}{'output':>11}{'RSS/ckpt':>10}"
        f"{'out/ckpt':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['name']:<28}{r['rc']:>5}{r.get('status', '-'):>15}{r['wall_s']:>9.1f}"
            f"{format_bytes(r['peak_rss_bytes']):>11}{format_bytes(r['output_bytes']):>11}"
            f"{r['peak_rss_bytes'] / checkpoint_bytes:>10.2f}{r['output_bytes'] / checkpoint_bytes:>10.3f}"
        )
    for r in results:
        if r.get("validation"):
            v, t = r["validation"], r["timings"]
            print(
                f"\n{r['name']}: export {t['export_s']:.1f} s + validation {t['validate_s']:.1f} s; "
                f"{v['inputs']['sequence_length']} tokens (window exercised: {v['inputs']['window_exercised']}), "
                f"max-abs {v['max_abs']:.3g} (tolerance {v['tolerance']['max_abs']:g}), top-1 {v['top1_agreement']:.0%}"
                f"\n  reference: {v['reference']}; runtime: {v['runtime']}"
            )
    baseline = next((r for r in results if r["name"].startswith("optimum") and r["rc"] == 0), None)
    if baseline:
        print("\nmexport / optimum-cli:")
        for r in results:
            if r is not baseline and r["rc"] == 0:
                print(
                    f"  {r['name']:<26} wall {r['wall_s'] / baseline['wall_s']:.2f}x, "
                    f"peak RSS {r['peak_rss_bytes'] / baseline['peak_rss_bytes']:.2f}x, "
                    f"output {r['output_bytes'] / baseline['output_bytes']:.2f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers at full width (the 9B has 42)")
    parser.add_argument("--skip-optimum", action="store_true", help="do not run the optimum-cli baseline")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir, deleted unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    parser.add_argument(
        "--mexport-runs", choices=("both", "export-only", "validated"), default="both",
        help="which mexport runs to measure: export only (--no-validate), with validation, or both",
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mexport-bench-"))
    checkpoint = workdir / f"gemma2-fullwidth-{args.layers}l"
    # disk per checkpoint byte for the outputs: each mexport bf16 export ~1, optimum-cli's fp32 one ~2, kept or
    # each deleted once measured
    outputs = [1.0] * (2 if args.mexport_runs == "both" else 1) + ([] if args.skip_optimum else [2.0])
    outputs_per_byte = sum(outputs) if args.keep else max(outputs)
    try:
        if checkpoint.is_dir():
            checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
            check_free_space(workdir, int(checkpoint_bytes * outputs_per_byte), what="the exports")
        else:
            print(f"building {args.layers}-layer full-width Gemma2 in {checkpoint}", flush=True)
            checkpoint_bytes = build_checkpoint(checkpoint, args.layers, 1 + outputs_per_byte)
        mexport = [sys.executable, "-m", "mexport", "-q", "onnx", str(checkpoint)]
        runs = []
        if args.mexport_runs in ("both", "export-only"):
            runs.append(
                ("mexport bf16 (export only)", [*mexport, "--dtype", "bf16", "--no-validate"], workdir / "mexport-bf16")
            )
        if args.mexport_runs in ("both", "validated"):
            runs.append(("mexport bf16 (+ validation)", [*mexport, "--dtype", "bf16"], workdir / "mexport-bf16-validated"))
        if not args.skip_optimum:
            optimum = [str(Path(sys.executable).with_name("optimum-cli")), "export", "onnx", "--model",
                       str(checkpoint), "--task", "text-generation-with-past"]
            runs.append(("optimum-cli fp32", optimum, workdir / "optimum-fp32"))
        results = []
        for name, command, output in runs:
            shutil.rmtree(output, ignore_errors=True)
            if command[:3] == mexport[:3]:
                command = [*command, "-o", str(output)]
            else:
                command = [*command, str(output)]
            results.append(measure(name, command, output, workdir / f"{output.name}.log"))
            if not args.keep:
                shutil.rmtree(output, ignore_errors=True)
        report(results, checkpoint_bytes)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
