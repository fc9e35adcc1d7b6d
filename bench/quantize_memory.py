"""Peak memory and wall time of `mexport quantize` on a >2 GB export vs ONNX Runtime's int4 quantizer.

Builds the full-width Gemma2 of bench/export_memory.py (hidden 3584, vocab 256000, tied embeddings; ``--layers``
layers, ~2.6 GB of bf16 for 2), exports it with `mexport onnx --dtype bf16 --no-validate`, then runs each
quantization in its own wrapper process so ``ru_maxrss`` is that run's peak alone:

- `mexport quantize` with each of ``--recipes`` (default: the weight-only ones; a calibrated recipe such as fp8
  adds an ONNX Runtime CPU session of the graph, which keeps this export's weights stored in bf16 and casts them
  per node) and ``--check-prompts 0``;
- the baseline, onnxruntime's ``MatMulNBitsQuantizer`` in its QDQ int4 form (the maintained tool for the same
  graph edit), which loads the whole model into memory.

Figures are per checkpoint byte (the bf16 export's data file is the same size): mexport streams one weight at a
time, so its peak should stay a fraction of the model while the baseline's grows with it.

    python bench/quantize_memory.py [--layers 2] [--recipes int8-wo int4-wo fp8] [--calib-size 8] [--skip-baseline]
                                    [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from mexport.fsutil import format_bytes

HERE = Path(__file__).resolve().parent
# onnxruntime's own int4 QDQ quantization of every MatMul (block 128, symmetric), saved as one external-data file
ORT_BASELINE = """
import sys, onnx
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
model = onnx.load(sys.argv[1])
quantizer = MatMulNBitsQuantizer(model, block_size=128, is_symmetric=True, quant_format=QuantFormat.QDQ)
quantizer.process()
onnx.save_model(quantizer.model.model, sys.argv[2], save_as_external_data=True, location="model.onnx.data")
"""


def _export_bench() -> ModuleType:
    """bench/export_memory.py as a module (checkpoint builder and the measuring wrapper)."""
    spec = importlib.util.spec_from_file_location("export_memory", HERE / "export_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers at full width (the 9B has 42)")
    parser.add_argument("--recipes", nargs="+", default=["int8-wo", "int4-wo"], help="mexport recipes to run")
    parser.add_argument("--calib-size", type=int, default=8, help="calibration samples for calibrated recipes")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run onnxruntime's quantizer")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir, deleted unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, export and outputs")
    args = parser.parse_args()

    bench = _export_bench()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mexport-qbench-"))
    checkpoint = workdir / f"gemma2-fullwidth-{args.layers}l"
    export = workdir / "export-bf16"
    mexport = str(Path(sys.executable).with_name("mexport"))
    try:
        if not checkpoint.is_dir():
            print(f"building {args.layers}-layer full-width Gemma2 in {checkpoint}", flush=True)
            # disk per checkpoint byte: the checkpoint, the export and (at most) one output per run
            bench.build_checkpoint(checkpoint, args.layers, 2 + len(args.recipes) + (not args.skip_baseline))
        if not export.is_dir():
            print(f"exporting to {export}", flush=True)
            command = [mexport, "-q", "onnx", str(checkpoint), "-o", str(export), "--dtype", "bf16", "--no-validate"]
            subprocess.run(command, check=True)
        data_bytes = (export / "model.onnx.data").stat().st_size
        runs = [
            (
                f"mexport {recipe}",
                [
                    mexport,
                    "-q",
                    "quantize",
                    str(export),
                    "--recipe",
                    recipe,
                    "--check-prompts",
                    "0",
                    "--calib-size",
                    str(args.calib_size),
                    "-o",
                ],
                workdir / f"mexport-{recipe}",
            )
            for recipe in args.recipes
        ]
        if not args.skip_baseline:
            runs.append(
                (
                    "onnxruntime int4 QDQ",
                    [sys.executable, "-c", ORT_BASELINE, str(export / "model.onnx")],
                    workdir / "ort-int4",
                )
            )
        results = []
        for name, command, output in runs:
            shutil.rmtree(output, ignore_errors=True)
            if name.startswith("onnxruntime"):
                output.mkdir(parents=True)
                command = [*command, str(output / "model.onnx")]
            else:
                command = [*command, str(output)]
            results.append(bench.measure(name, command, output, workdir / f"{output.name}.log"))
            if not args.keep:
                shutil.rmtree(output, ignore_errors=True)
        bench.report(results, sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")))
        print(f"export data file: {format_bytes(data_bytes)}")
        baseline = next((r for r in results if r["name"].startswith("onnxruntime") and r["rc"] == 0), None)
        for r in results:
            if baseline and r is not baseline and r["rc"] == 0:
                print(
                    f"  {r['name']} / onnxruntime: wall {r['wall_s'] / baseline['wall_s']:.2f}x, "
                    f"peak RSS {r['peak_rss_bytes'] / baseline['peak_rss_bytes']:.2f}x"
                )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
