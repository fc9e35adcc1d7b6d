"""bench/device_check.sh in its CPU mode: it runs to the end and writes the JSON docs/device-check.md documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = (int, float)
ENVIRONMENT_KEYS = {
    "device", "gpu", "python", "torch", "cuda", "transformers", "lm_eval", "onnxruntime", "onnxruntime_providers",
    "tensorrt",
}
MODEL_KEYS = {
    "layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "parameters",
}
FORMAT_FIELDS: dict[str, Any] = {
    "task": str, "questions": int, "mexport_seconds": list, "lmeval_seconds": list, "ratio_best": NUMBER,
    "ratio_range": list, "max_abs_loglik_delta": NUMBER, "answer_agreement": NUMBER, "mexport_acc": NUMBER,
    "lmeval_acc": NUMBER,
}
EXPORT_FIELDS: dict[str, Any] = {
    "device": str, "export_seconds": NUMBER, "max_abs_logit_delta": NUMBER, "top1_agreement": NUMBER,
    "sequence_length": int, "sliding_window": int, "window_exercised": bool, "tolerance": dict, "export_dir": str,
}


def _check_fields(entry: dict[str, Any], fields: dict[str, Any]) -> None:
    for key, kind in fields.items():
        assert isinstance(entry[key], kind), (key, entry[key])


@pytest.mark.slow
def test_cpu_smoke_writes_the_documented_json(tmp_path: Path) -> None:
    output = tmp_path / "device_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        [str(ROOT / "bench" / "device_check.sh"), "--cpu-smoke", "--output", str(output), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["schema"] == 1 and result["mode"] == "cpu-smoke" and isinstance(result["seconds"], NUMBER)
    assert set(result["environment"]) == ENVIRONMENT_KEYS and result["environment"]["device"] == "cpu"
    checks = result["checks"]
    assert set(checks) == {"scoring_vs_lmeval", "export_long_check", "tensorrt_engine"}
    for entry in checks.values():
        assert entry["status"] in {"ran", "passed", "failed", "skipped", "error"}
        assert isinstance(entry["seconds"], NUMBER) and "reason" in entry

    scoring = checks["scoring_vs_lmeval"]
    if scoring["status"] == "skipped":
        assert "lm-eval" in scoring["reason"]
    else:
        assert scoring["status"] == "ran", scoring.get("traceback")
        assert set(scoring["model"]) == MODEL_KEYS and scoring["dtype"] == "bf16"
        assert set(scoring["formats"]) == {"lettered", "option texts"}
        for figures in scoring["formats"].values():
            _check_fields(figures, FORMAT_FIELDS)
            assert figures["questions"] == 6 and len(figures["mexport_seconds"]) == scoring["repeats"]
            assert 0 <= figures["answer_agreement"] <= 1 and figures["ratio_best"] > 0

    export = checks["export_long_check"]
    assert export["status"] == "passed", export
    _check_fields(export, EXPORT_FIELDS)
    assert export["window_exercised"] and export["max_abs_logit_delta"] <= export["tolerance"]["max_abs"]

    engine = checks["tensorrt_engine"]
    assert engine["status"] == "skipped" and "CUDA" in engine["reason"]
