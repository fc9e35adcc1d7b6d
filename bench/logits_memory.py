"""Prefill time and peak memory with full vs lean logits, for ONNX Runtime and PyTorch.

A prefill whose caller needs the next-token distribution (the scorer on lettered tasks, ``generate``) asks for the
last position only. The full-logits graph (``--full-logits`` export) computes ``batch x sequence x vocab`` logits and
the runtime keeps one row; the lean graph (default export) computes one row; PyTorch computes all positions with
``logits_to_keep=0`` and one with ``logits_to_keep=1``. Each measurement runs in a fresh process: the kernel's peak
RSS mark (VmHWM) is reset once the model is loaded (``/proc/self/clear_refs``), so the peak read after the prefill is
the prefill's own, minus the RSS before it. The four configurations are interleaved, repeated, and summarised as
median [min-max] with lean / full ratios (Linux only). Default model: the wide fixture (vocab 32000, hidden 512).

    python bench/logits_memory.py [--fixture wide-gemma2] [--batch 4] [--tokens 256] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = ("ort-full", "ort-lean", "torch-full", "torch-lean")


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(config: str, paths: dict[str, str], batch: int, tokens: int, threads: int | None) -> dict[str, float]:
    """One prefill of ``batch x tokens`` keeping the last position's logits (all of them for torch-full): seconds and
    peak RSS above the RSS before it."""
    backend, logits = config.split("-")
    if backend == "ort":
        from mexport.runtime.ort import OrtDecoder

        runtime = OrtDecoder(paths[f"ort-{logits}"], intra_op_threads=threads)
    else:
        import torch

        from mexport.runtime.torch_runtime import TorchDecoder

        if threads:
            torch.set_num_threads(threads)
        runtime = TorchDecoder(paths["checkpoint"], dtype="fp32")
    ids = np.random.default_rng(0).integers(4, 1000, (batch, tokens)).astype(np.int64)
    keep = 0 if config == "torch-full" else 1  # the full ORT graph computes every row whatever is kept
    with runtime:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
        before = _status_bytes("VmRSS")
        started = time.perf_counter()
        result, _ = runtime.forward(ids, np.ones_like(ids), logits_to_keep=keep)
        seconds = time.perf_counter() - started
        peak = _status_bytes("VmHWM")
    return {"seconds": seconds, "peak_above_model_bytes": peak - before, "logits_rows": int(result.shape[1])}


def _prepare(workdir: Path, fixture: str) -> dict[str, str]:
    from mexport.export import export_onnx
    from mexport.fixtures.tiny_gemma2 import make_fixture

    checkpoint = make_fixture(workdir / fixture, name=fixture)
    export_onnx(checkpoint, workdir / "lean", dtype="fp32", validate=False)
    export_onnx(checkpoint, workdir / "full", dtype="fp32", validate=False, full_logits=True)
    return {"checkpoint": str(checkpoint), "ort-lean": str(workdir / "lean"), "ort-full": str(workdir / "full")}


def _summary(values: list[float], scale: float = 1.0) -> str:
    return f"{statistics.median(values) / scale:8.3f} [{min(values) / scale:.3f}-{max(values) / scale:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", default="wide-gemma2", choices=["tiny-gemma2", "wide-gemma2"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement, JSON on stdout
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, json.loads(args.paths), args.batch, args.tokens, args.threads)))
        return

    results: dict[str, list[dict[str, float]]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="mexport-bench-logits-") as scratch:
        paths = _prepare(Path(scratch), args.fixture)
        for _ in range(args.repeats):
            for config in CONFIGS:  # interleaved: drift on a shared machine hits every configuration alike
                command = [
                    sys.executable, __file__, "--worker", config, "--paths", json.dumps(paths),
                    "--batch", str(args.batch), "--tokens", str(args.tokens),
                    *(["--threads", str(args.threads)] if args.threads else []),
                ]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[config].append(json.loads(output.strip().splitlines()[-1]))

    print(f"{args.fixture}: prefill of {args.batch} x {args.tokens} tokens, next-token logits, {args.repeats} repeats")
    print(f"{'config':<11} {'seconds median [range]':>26} {'peak MB above model [range]':>32}")
    for config in CONFIGS:
        seconds = [r["seconds"] for r in results[config]]
        peaks = [r["peak_above_model_bytes"] for r in results[config]]
        print(f"{config:<11} {_summary(seconds):>26} {_summary(peaks, 1e6):>32}")
    for backend in ("ort", "torch"):
        full, lean = results[f"{backend}-full"], results[f"{backend}-lean"]
        time_ratio = statistics.median(r["seconds"] for r in lean) / statistics.median(r["seconds"] for r in full)
        memory_ratio = statistics.median(r["peak_above_model_bytes"] for r in lean) / statistics.median(
            r["peak_above_model_bytes"] for r in full
        )
        print(f"{backend}: lean / full time {time_ratio:.3f}, peak memory {memory_ratio:.3f}")


if __name__ == "__main__":
    main()
