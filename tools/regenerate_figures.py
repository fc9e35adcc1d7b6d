"""Regenerate every figure README.md and docs/ quote, from runs of the current code, in one command.

    PYTHONPATH=. python tools/regenerate_figures.py            # run, write docs/figures.json, rewrite the regions
    PYTHONPATH=. python tools/regenerate_figures.py --check    # run again; exit 1 when a deterministic figure drifts
    PYTHONPATH=. python tools/regenerate_figures.py --render   # only rewrite the regions from docs/figures.json
    (``--only demo`` or ``--only quantize`` runs one part; the other keeps its recorded figures)

Figures live in ``docs/figures.json``; README.md and docs/*.md quote them only inside marked regions
(``<!-- figure:NAME -->`` ... ``<!-- /figure -->``) that :func:`render_regions` writes from that file.
tests/test_first_use.py checks that every region equals its rendering (so a hand edit or a stale figures.json
fails the suite); ``--check`` (the `slow` test) re-runs and compares the deterministic figures: verdicts, CIs,
flips and the quantize table. Timings and peak memory are measured on the machine that runs this and are not
compared (they are quoted as "measured on").

Parts: ``demo`` runs README's quick start (``mexport pipeline examples/pipeline-tiny.toml``) twice, from an empty
cache (fine-tuning the learned fixture) and with it cached (``--cache DIR``: only the cached run, reusing DIR),
and reads its report.json; ``quantize`` runs every
row of docs/quantize.md's tiny-fixture table (the random-weight fixture, fp32 and bf16 exports, each recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "quantize.md")
REGION = re.compile(r"(<!-- figure:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figure -->)", re.DOTALL)
DEMO_CONFIG = ROOT / "examples" / "pipeline-tiny.toml"
# (export dtype, recipe, options, row label) of docs/quantize.md's table
QUANTIZE_ROWS = [
    (dtype, recipe, options, label)
    for dtype in ("fp32", "bf16")
    for recipe, options, label in (
        ("fp8", {}, "fp8"),
        ("int8-sq", {}, "int8-sq"),
        ("int8-wo", {}, "int8-wo"),
        ("int4-wo", {}, "int4-wo (default block)"),
        ("int4-wo", {"block_size": 32}, "int4-wo `--block-size 32`"),
        ("int4-wo", {"block_size": 32, "method": "awq"}, "int4-wo `--block-size 32 --method awq`"),
    )
]
TIMING_KEYS = ("timings",)  # measured, machine-dependent: recorded and quoted, never compared


# ---- runs -----------------------------------------------------------------------------------------------------


def _pipeline(output: Path, cache: Path) -> tuple[float, int]:
    """Run the demo pipeline in a child process; (wall seconds, exit code: 1 is the demo's expected failure)."""
    env = {**os.environ, "MEXPORT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mexport", "-q", "pipeline", str(DEMO_CONFIG), "-o", str(output)],
        env=env, cwd=ROOT, check=False,
    )
    return time.perf_counter() - started, done.returncode


def run_demo(work: Path, cache: Path | None, recorded: dict[str, Any]) -> dict[str, Any]:
    """README's quick start, from an empty cache and again with the learned fixture cached; with ``cache`` (an
    existing fixture cache) only the cached run, keeping the recorded empty-cache timings."""
    timings = dict(recorded.get("timings") or {})
    if cache is None:
        cache = work / "cache"
        cold_seconds, _ = _pipeline(work / "cold", cache)
        timings.update(cold_seconds=round(cold_seconds, 1),
                       cold_peak_rss_bytes=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # KiB
    warm_seconds, _ = _pipeline(work / "warm", cache)
    timings.update(warm_seconds=round(warm_seconds, 1), machine=f"{os.cpu_count()} cores, {platform.machine()}",
                   load_average=round(os.getloadavg()[0], 1))
    return {**demo_figures(work / "warm" / "report" / "report.json"), "timings": timings}


def demo_figures(report_path: Path) -> dict[str, Any]:
    """The deterministic figures of one demo run: exit code, questions per task, every verdict with its numbers."""
    report = json.loads(report_path.read_text())
    statuses = {result["verdict"] for result in report["results"]}
    return {
        "exit_code": 1 if "fail" in statuses else 4 if "inconclusive" in statuses else 0,  # fail_on = inconclusive
        "questions_per_task": {name: task["n_items"] for name, task in report["tasks"].items()},
        "results": [_result_figures(result) for result in report["results"]],
    }


def _result_figures(result: dict[str, Any]) -> dict[str, Any]:
    acc = result["metrics"].get("acc") or {}
    return {
        "task": result["task"],
        "candidate": result["candidate"],
        "verdict": result["verdict"],
        "margin_points": result["margin_points"],
        "delta_points": round(100 * acc["delta"], 2) if acc else None,
        "ci_points": [round(100 * bound, 2) for bound in acc["delta_ci"]] if acc else None,
        "lost": acc.get("right_to_wrong"),
        "gained": acc.get("wrong_to_right"),
    }


def run_quantize_table(work: Path) -> list[dict[str, Any]]:
    """docs/quantize.md's tiny-fixture rows: the report's check and random prompts against each export."""
    import numpy as np

    from mexport.export import export_onnx
    from mexport.fixtures import write_fixture
    from mexport.optimize.quantize import quantize
    from mexport.optimize.quantize.report import compare_logits, prompt_logits

    checkpoint = work / "tiny-gemma2"
    write_fixture("tiny-gemma2", checkpoint)
    rng = np.random.default_rng(123)  # the prompts tests/test_quantize.py scores
    prompts = [rng.integers(4, 1024, size=(1, 24)) for _ in range(6)]
    exports = {}
    for dtype in ("fp32", "bf16"):
        exports[dtype] = work / f"export-{dtype}"
        export_onnx(checkpoint, exports[dtype], dtype=dtype)
    baseline = {dtype: prompt_logits(path, prompts, f"{dtype} export")[0] for dtype, path in exports.items()}
    rows = []
    for index, (dtype, recipe, options, label) in enumerate(QUANTIZE_ROWS):
        result = quantize(exports[dtype], work / f"q{index}", recipe, calib_size=64, **options)
        report = result.manifest["report"]
        check = report["numeric_check"]
        random = compare_logits(baseline[dtype], prompt_logits(work / f"q{index}", prompts, label)[0])
        rows.append({
            "export": dtype,
            "recipe": label,
            "check": {key: check[key] for key in ("top1_agreement", "max_abs_logit_diff", "mean_kl")},
            "random": {key: random[key] for key in ("top1_agreement", "max_abs_logit_diff", "mean_kl")},
            "bytes": report["bytes"],
        })
    return rows


# ---- rendering ------------------------------------------------------------------------------------------------


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def render_demo_verdicts(figures: dict[str, Any]) -> str:
    demo = figures["demo"]
    tasks = list(demo["questions_per_task"])
    counts = sorted(set(demo["questions_per_task"].values()))
    by_candidate: dict[str, list[dict[str, Any]]] = {}
    for result in demo["results"]:
        by_candidate.setdefault(result["candidate"], []).append(result)
    passing = [name for name, rows in by_candidate.items() if all(r["verdict"] == "pass" for r in rows)]
    margins = sorted({r["margin_points"] for name in passing for r in by_candidate[name]})
    sentences = []
    if passing:
        margin = "/".join(f"±{m:g}" for m in margins)
        sentences.append(f"on {_names([str(c) for c in counts])} questions per task {_names(passing)} pass a "
                         f"{margin}-point margin on all {len(tasks)} tasks")
    for name, rows in by_candidate.items():
        if name in passing:
            continue
        parts = []
        for verdict, word in (("fail", "fails"), ("pass", "passes"), ("inconclusive", "is inconclusive on"),
                              ("skipped", "was skipped on")):
            picked = [r for r in rows if r["verdict"] == verdict]
            if not picked:
                continue
            if verdict == "fail":
                details = "; ".join(
                    (f"{r['task']}: " if len(picked) > 1 else "") + f"{r['lost']} answers lost, {r['gained']} "
                    f"gained, paired CI [{r['ci_points'][0]:.2f}, {r['ci_points'][1]:.2f}] points" for r in picked
                )
                parts.append(f"{word} {_names([r['task'] for r in picked])} ({details})")
            else:
                parts.append(f"{word} {_names([r['task'] for r in picked])}")
        margin = "/".join(f"±{m:g}" for m in sorted({r["margin_points"] for r in rows}))
        sentences.append(f"{name}, held to {margin}, {_names(parts)}")
    verdicts = "; ".join(sentences)
    lines = [f"It ends in real verdicts and exit code {demo['exit_code']}, on purpose: {verdicts}.", "",
             "| candidate | task | verdict | Δ acc (pts) | paired 95% CI | lost / gained |",
             "|---|---|---|---|---|---|"]
    for r in demo["results"]:
        ci = f"[{r['ci_points'][0]:.2f}, {r['ci_points'][1]:.2f}]" if r["ci_points"] else "-"
        delta = f"{r['delta_points']:+.2f}" if r["delta_points"] is not None else "-"
        lines.append(f"| {r['candidate']} | {r['task']} | {r['verdict']} (±{r['margin_points']:g}) | {delta} | "
                     f"{ci} | {r['lost']} / {r['gained']} |")
    return "\n".join(lines) + "\n"


def render_demo_timings(figures: dict[str, Any]) -> str:
    timings = figures["demo"].get("timings") or {}
    if "warm_seconds" not in timings:
        return "Run times are not recorded yet: `tools/regenerate_figures.py --only demo` measures them.\n"
    measured = f"Measured on {timings['machine']} (load average {timings['load_average']:g} while it ran)"
    cold = ""
    if "cold_seconds" in timings:
        cold = (f"{timings['cold_seconds'] / 60:.1f} minutes from an empty cache (including fine-tuning the fixture, "
                f"cached afterwards; {timings['cold_peak_rss_bytes'] / 1e9:.1f} GB peak RSS), ")
    return f"{measured}: {cold}{timings['warm_seconds']:.0f} seconds with the fixture cached.\n"


def _mb(value: int) -> str:
    return f"{value / 1e6:.2f} MB"


def render_quantize_table(figures: dict[str, Any]) -> str:
    header = ("| export | recipe | check top-1 | check max abs diff | check mean KL | random top-1 | random max abs "
              "diff | random mean KL | model bytes before -> after |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in figures["quantize_tiny"]:
        check, random = row["check"], row["random"]
        lines.append(
            f"| {row['export']} | {row['recipe']} | {check['top1_agreement']:.3f} | {check['max_abs_logit_diff']:.3f} "
            f"| {check['mean_kl']:.1e} | {random['top1_agreement']:.3f} | {random['max_abs_logit_diff']:.3f} | "
            f"{random['mean_kl']:.1e} | {_mb(row['bytes']['before'])} -> {_mb(row['bytes']['after'])} |"
        )
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "demo-verdicts": render_demo_verdicts,
    "demo-timings": render_demo_timings,
    "quantize-tiny-table": render_quantize_table,
}


def render_regions(text: str, figures: dict[str, Any]) -> str:
    """``text`` with every marked region replaced by its rendering from ``figures``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"unknown figure region {name!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + RENDERERS[name](figures) + match.group(4)

    return REGION.sub(replace, text)


def regions(text: str) -> dict[str, str]:
    return {match.group("name"): match.group("body") for match in REGION.finditer(text)}


def deterministic(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures that must come out the same on every run (timings removed)."""
    demo = {key: value for key, value in figures.get("demo", {}).items() if key not in TIMING_KEYS}
    return {"demo": demo, "quantize_tiny": figures.get("quantize_tiny")}


def _drift(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new)) for line in _drift(old.get(key), new.get(key), f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new, strict=True)) for line in _drift(a, b, f"{path}[{i}]")]
    if isinstance(old, float) and isinstance(new, float):
        same = f"{old:.3g}" == f"{new:.3g}"  # what the documents print
        return [] if same else [f"{path}: {old} -> {new}"]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="re-run and compare; write nothing")
    parser.add_argument("--render", action="store_true", help="only rewrite the regions from docs/figures.json")
    parser.add_argument("--only", choices=("demo", "quantize"), help="run one part")
    parser.add_argument("--cache", type=Path, help="demo: reuse this learned-fixture cache (skips the empty-cache run)")
    parser.add_argument("--demo-report", type=Path, help="demo: read this run's report.json instead of running it")
    parser.add_argument("--work", type=Path, help="keep the runs in this directory (default: a temporary one)")
    args = parser.parse_args(argv)
    recorded = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    figures = dict(recorded)
    if not args.render:
        with tempfile.TemporaryDirectory(prefix="mexport-figures-") as tmp:
            work = args.work or Path(tmp)
            if args.demo_report:
                timings = recorded.get("demo", {}).get("timings", {})
                figures["demo"] = {**demo_figures(args.demo_report), "timings": timings}
            elif args.only in (None, "demo"):
                figures["demo"] = run_demo(work / "demo", args.cache, recorded.get("demo", {}))
            if args.only in (None, "quantize"):
                figures["quantize_tiny"] = run_quantize_table(work / "quantize")
    if args.check:
        drift = _drift(deterministic(recorded), deterministic(figures))
        if args.only:
            part = {"demo": ".demo", "quantize": ".quantize_tiny"}[args.only]
            drift = [line for line in drift if line.startswith(part)]
        for line in drift:
            print(f"drift: {line}")
        print("figures up to date" if not drift else f"{len(drift)} figure(s) drifted: run without --check")
        return 1 if drift else 0
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    for document in DOCUMENTS:
        document.write_text(render_regions(document.read_text(), figures))
    print(f"wrote {FIGURES.relative_to(ROOT)} and the figure regions of "
          f"{', '.join(str(d.relative_to(ROOT)) for d in DOCUMENTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
