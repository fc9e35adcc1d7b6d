"""A verdict names exactly what was scored: inputs keyed by content, files verified when they are read, references
and candidates that cannot give a meaningful verdict refused, and ONNX decoders from other tools validated as they
are (IO from the graph, every scored file hashed into the report)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import IntegrityError, MexportError
from mexport.manifest import MANIFEST_NAME, hash_files, read_manifest, write_manifest
from mexport.validate import validate

SAMPLE = {"medmcqa": "sample"}
WIDE = 25.0  # 16 questions resolve ±17 points at best: parity here is about running, not about precision
LIMIT = 16


def _side_files(source: Path, out: Path) -> None:
    """config.json and the tokenizer files, as another tool's output directory carries them."""
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix == ".json" and path.name not in (MANIFEST_NAME, "genai_config.json"):
            shutil.copy(path, out / path.name)


@pytest.fixture(scope="module")
def optimum_dir(tmp_path_factory: pytest.TempPathFactory, learned: Path) -> Path:
    """An Optimum-style decoder: full logits (no logits_indices), past-KV IO, weights in ``model.onnx_data``,
    config and tokenizer beside it, no mexport.json."""
    import onnx

    from mexport.export import export_onnx

    full = tmp_path_factory.mktemp("full") / "full-logits"
    export_onnx(learned, full, dtype="fp32", full_logits=True)
    out = tmp_path_factory.mktemp("optimum") / "optimum-fp32"
    _side_files(full, out)
    model = onnx.load(str(full / "model.onnx"))
    assert "logits_indices" not in [value.name for value in model.graph.input]
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    return out


@pytest.fixture(scope="module")
def nbits_dir(tmp_path_factory: pytest.TempPathFactory, optimum_dir: Path) -> Path:
    """ONNX Runtime's MatMulNBitsQuantizer output (int4, block 32, symmetric) over the Optimum-style decoder."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = tmp_path_factory.mktemp("nbits") / "ort-int4"
    _side_files(optimum_dir, out)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(optimum_dir / "model.onnx")), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    return out


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _validate_cli(reference: Path, candidates: list[Path], out: Path, *extra: str) -> Any:
    args = ["validate", "--reference", str(reference), "--tasks", "medmcqa", "--data", "medmcqa=sample",
            "--limit", str(LIMIT), "--margin", str(WIDE), "-o", str(out), *extra]
    for candidate in candidates:
        args += ["--candidate", str(candidate)]
    return _invoke(*args)


def _one_line_error(result: Any, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert text in result.output.replace("\n", " ") or text in result.output, result.output
    assert "Traceback" not in result.output


def _rewrite_keeping_mtime(path: Path, offset: int = 4096) -> None:
    """Change bytes of ``path`` in place, same size, then put its mtime back (what rsync -t / cp -p leave)."""
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        block = handle.read(256)
        handle.seek(offset)
        handle.write(bytes(255 - b for b in block))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size


def _swap_for_modified_copy(path: Path) -> None:
    """Replace ``path`` by a same-size file with other bytes and the old mtime (a new inode, as a rename makes)."""
    swapped = path.with_name(path.name + ".new")
    shutil.copy2(path, swapped)
    _rewrite_keeping_mtime(swapped)
    os.replace(swapped, path)


class ScoredBy:
    """Counts the questions scoring.score_items scores, per runtime class name; ``after_first_batch_of``: (runtime
    class name, action) runs the action once, right after that runtime's first scored batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after_first_batch_of: tuple[str, Any] | None = None) -> None:
        from mexport.validate import runner, scoring

        self.real = getattr(runner.score_items, "real", scoring.score_items)
        self.counts: dict[str, int] = {}
        self.after_first_batch_of = after_first_batch_of
        monkeypatch.setattr(runner, "score_items", self)  # where validation calls it

    def __call__(self, runtime: Any, tokenizer: Any, items: Any, **kwargs: Any) -> Any:
        result = self.real(runtime, tokenizer, items, **kwargs)
        name = type(runtime).__name__
        self.counts[name] = self.counts.get(name, 0) + len(items)
        if self.after_first_batch_of is not None and self.after_first_batch_of[0] == name:
            self.after_first_batch_of[1]()
            self.after_first_batch_of = None
        return result


# ---------------------------------------------------------------------------------------------- what is hashed


def test_verified_files_catch_writes_with_a_restored_mtime_replacements_and_removal(tmp_path: Path) -> None:
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / name).write_bytes(os.urandom(8192))
    files = hash_files(tmp_path, ["a.bin", "b.bin", "c.bin"])
    files.check_unchanged()
    assert hash_files(tmp_path, ["c.bin", "a.bin", "b.bin"]).digest == files.digest
    _rewrite_keeping_mtime(tmp_path / "a.bin")  # ctime moves: caught although size and mtime are the old ones
    with pytest.raises(IntegrityError, match="a.bin: replaced or modified after it was verified"):
        files.check_unchanged()
    assert hash_files(tmp_path, ["a.bin", "b.bin", "c.bin"]).digest != files.digest
    files = hash_files(tmp_path, ["a.bin", "b.bin", "c.bin"])
    _swap_for_modified_copy(tmp_path / "b.bin")
    with pytest.raises(IntegrityError, match="b.bin: replaced or modified"):
        files.check_unchanged()
    files = hash_files(tmp_path, ["a.bin", "b.bin", "c.bin"])
    (tmp_path / "c.bin").unlink()
    with pytest.raises(IntegrityError, match="c.bin: removed after it was verified"):
        files.check_unchanged()


def test_a_candidate_file_swapped_after_it_was_verified_is_refused_when_loaded(
    tmp_path: Path, tiny_export_fp32: Path
) -> None:
    from mexport.validate.backends import open_backend

    candidate = tmp_path / "export"
    shutil.copytree(tiny_export_fp32, candidate)
    runtime, _, _ = open_backend(candidate)  # hashed here, against the manifest
    assert runtime.files is not None and set(read_manifest(candidate)["files"]) <= set(runtime.files.sha256)
    _swap_for_modified_copy(candidate / "model.onnx.data")
    with pytest.raises(IntegrityError, match="model.onnx.data: replaced or modified after it was verified"), runtime:
        pass


@pytest.mark.slow
def test_validate_refuses_a_candidate_swapped_while_the_reference_was_scored(
    tmp_path: Path, learned: Path, learned_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hours of reference scoring lie between opening a candidate and loading it: a swap then is exit 3."""
    candidate = shutil.copytree(learned_export, tmp_path / "learned-fp32")
    ScoredBy(monkeypatch, ("TorchDecoder", lambda: _swap_for_modified_copy(candidate / "model.onnx.data")))
    result = _validate_cli(learned, [candidate], tmp_path / "r")
    _one_line_error(result, 3, "model.onnx.data: replaced or modified after it was verified")


@pytest.mark.slow
def test_a_candidate_written_while_it_is_scored_keeps_no_scores(
    tmp_path: Path, learned: Path, learned_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    candidate, out = shutil.copytree(learned_export, tmp_path / "learned-fp32"), tmp_path / "r"
    counter = ScoredBy(monkeypatch, ("OrtDecoder", lambda: _rewrite_keeping_mtime(candidate / "model.onnx.data")))
    with pytest.raises(IntegrityError, match="replaced or modified after it was verified"):
        validate(learned, [candidate], ["medmcqa"], data=SAMPLE, limit=LIMIT, output=out, margin=WIDE)
    assert counter.counts == {"TorchDecoder": LIMIT, "OrtDecoder": 8}  # one candidate batch, scored, thrown away
    cached = [line for path in (out / ".cache").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(cached) == LIMIT  # the reference's; nothing of the candidate written while it was scored


@pytest.mark.slow
def test_reference_weights_replaced_under_the_old_timestamp_are_scored_again(
    tmp_path: Path, learned: Path, learned_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mexport.checkpoint import read_safetensors_header

    reference = tmp_path / "reference"
    shutil.copytree(learned, reference)
    out = tmp_path / "r"

    def run() -> Any:
        return validate(reference, [learned_export], ["medmcqa"], data=SAMPLE, limit=LIMIT, output=out, margin=WIDE)

    first = run()
    cached = ScoredBy(monkeypatch)
    run()
    assert cached.counts == {}  # unchanged: everything from the cache
    weights = reference / "model.safetensors"
    location = read_safetensors_header(weights)["model.layers.0.mlp.down_proj.weight"]
    _rewrite_keeping_mtime(weights, offset=location.offset)  # new weights, old size and mtime (cp -p, rsync -t)
    rescored = ScoredBy(monkeypatch)
    second = run()
    assert rescored.counts == {"TorchDecoder": LIMIT}  # the reference again; the candidate from the cache
    reference_files = {b.label: b.files for b in second.backends}["reference"]
    assert reference_files["model.safetensors"] != {b.label: b.files for b in first.backends}["reference"][
        "model.safetensors"
    ]
    assert second.scores["medmcqa"]["reference"] != first.scores["medmcqa"]["reference"]


# --------------------------------------------------------------------------------------- pipeline resume keys


def test_checkpoint_and_input_fingerprints_follow_content_not_timestamps(tmp_path: Path) -> None:
    from mexport.pipeline import _checkpoint_fingerprint, _input_file_hashes, config_from

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(os.urandom(8192))
    from mexport.validate.tasks import data_file

    data = tmp_path / "medmcqa.jsonl"
    shutil.copy(data_file("medmcqa", "sample"), data)
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "a"}\n' * 300)
    config = config_from({"model": str(checkpoint), "output": tmp_path / "run", "data": {"medmcqa": str(data)},
                          "calib": str(calib)})
    before = (_checkpoint_fingerprint(str(checkpoint)), _input_file_hashes(config))
    assert _checkpoint_fingerprint("org/model") == {"hub_id": "org/model"}
    assert set(before[1]["data"]) == {"medmcqa"} and len(before[1]["calib"]) == 64
    for path in (checkpoint / "model.safetensors", data, calib):
        _rewrite_keeping_mtime(path, offset=16)
    after = (_checkpoint_fingerprint(str(checkpoint)), _input_file_hashes(config))
    assert after[0]["model.safetensors"] != before[0]["model.safetensors"]
    assert after[1]["data"] != before[1]["data"] and after[1]["calib"] != before[1]["calib"]
    shipped = config_from({"model": str(checkpoint), "output": tmp_path / "run", "data": {"medmcqa": "sample"},
                           "calib": "medmcqa"})
    assert len(_input_file_hashes(shipped)["data"]["medmcqa"]) == 64 and _input_file_hashes(shipped)["calib"] == "medmcqa"


@pytest.mark.slow
def test_pipeline_revalidates_after_a_data_file_is_edited_in_place(tmp_path: Path) -> None:
    from mexport.pipeline import config_from, run_pipeline
    from mexport.validate.tasks import data_file

    data = tmp_path / "medmcqa.jsonl"
    shutil.copy(data_file("medmcqa", "sample"), data)
    config = config_from({"model": "fixture:tiny-gemma2", "output": tmp_path / "run", "dtype": "fp32",
                          "engine": "off", "tasks": ["medmcqa"], "data": {"medmcqa": str(data)}, "limit": 4,
                          "margin": WIDE})
    first = run_pipeline(config)
    assert {step.name: step.status for step in first.steps}["validate"] == "done"
    again = run_pipeline(config)
    assert {step.name: step.status for step in again.steps}["validate"] == "resumed"
    rows = data.read_text(encoding="utf-8").splitlines()
    edited = [json.dumps({**json.loads(row), "question": json.loads(row)["question"][::-1]}) for row in rows]
    before = data.stat()
    data.write_text("\n".join(edited) + "\n", encoding="utf-8")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    edited_run = run_pipeline(config)
    statuses = {step.name: step.status for step in edited_run.steps}
    assert statuses["validate"] == "done" and statuses["export"] == "resumed"
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["tasks"]["medmcqa"]["source_sha256"] == hash_files(tmp_path, [data.name]).sha256[data.name]


# --------------------------------------------------------------------------------- references and candidates


def _without_tensor(checkpoint: Path, out: Path, name: str, shrink: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    if shrink:
        tensors[name] = tensors[name][:, :-1].contiguous()
    else:
        del tensors[name]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_reference_with_a_missing_or_misshapen_tensor_is_refused(tmp_path: Path, tiny_checkpoint: Path,
                                                                   tiny_export_fp32: Path) -> None:
    from mexport.runtime.torch_runtime import TorchDecoder

    name = "model.layers.1.mlp.down_proj.weight"
    missing = _without_tensor(tiny_checkpoint, tmp_path / "missing", name)
    with pytest.raises(MexportError, match=f"checkpoint has no tensor {name}"), TorchDecoder(missing):
        pass
    result = _validate_cli(missing, [tiny_export_fp32], tmp_path / "r")
    _one_line_error(result, 2, f"checkpoint has no tensor {name} (incomplete or mismatched checkpoint)")
    assert "newly initialized" not in result.output
    misshapen = _without_tensor(tiny_checkpoint, tmp_path / "misshapen", name, shrink=True)
    result = _validate_cli(misshapen, [tiny_export_fp32], tmp_path / "r")
    _one_line_error(result, 2, "size mismatch")


def test_a_candidate_its_own_stage_marked_failed_is_refused(tmp_path: Path, tiny_checkpoint: Path,
                                                            tiny_export_fp32: Path) -> None:
    failed = tmp_path / "failed-export"
    shutil.copytree(tiny_export_fp32, failed)
    write_manifest(failed, {**read_manifest(failed), "status": "failed"})
    result = _validate_cli(tiny_checkpoint, [failed], tmp_path / "r")
    _one_line_error(result, 2, "manifest records status failed")
    child = tmp_path / "child"
    shutil.copytree(tiny_export_fp32, child)
    write_manifest(child, {**read_manifest(child), "kind": "quantize", "parent": {"kind": "export", "status": "failed"}})
    _one_line_error(_validate_cli(tiny_checkpoint, [child], tmp_path / "r"), 2, "export manifest records status failed")


def test_the_reference_given_again_as_a_candidate_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = _validate_cli(tiny_checkpoint, [tiny_checkpoint], tmp_path / "r")
    _one_line_error(result, 2, "is the reference")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "README.md").write_text("a copy under another name\n")
    _one_line_error(_validate_cli(tiny_checkpoint, [copy], tmp_path / "r"), 2, "the same files, byte for byte")
    assert not (tmp_path / "r" / "report.json").exists()


# ------------------------------------------------------------------------------------------ foreign candidates


@pytest.mark.slow
def test_foreign_onnx_decoders_validate_with_every_scored_file_in_the_report(
    tmp_path: Path, learned: Path, learned_export: Path, optimum_dir: Path, nbits_dir: Path
) -> None:
    from mexport.optimize import quantize

    modelopt_like = tmp_path / "int4-no-manifest"  # ModelOpt's layout: the export's files, a Q/DQ model.onnx
    quantize(learned_export, tmp_path / "int4", "int4-wo", block_size=32)
    shutil.copytree(tmp_path / "int4", modelopt_like)
    (modelopt_like / MANIFEST_NAME).unlink()
    out = tmp_path / "r"
    report = validate(learned, [learned_export, optimum_dir, nbits_dir, modelopt_like], ["medmcqa"], data=SAMPLE,
                      limit=LIMIT, output=out, margin=WIDE)
    backends = {b.label: b for b in report.backends}
    for label, graph_data in (("optimum-fp32", "model.onnx_data"), ("ort-int4", "model.onnx.data"),
                              ("int4-no-manifest", "model.onnx.data")):
        backend = backends[label]
        assert backend.kind == "ort" and backend.manifest_sha256 is None
        assert backend.origin == "ONNX graph from another tool, no mexport manifest"
        assert {"model.onnx", graph_data, "config.json", "tokenizer.json"} <= set(backend.files)
        assert backend.files["model.onnx"] == hash_files(Path(backend.path), ["model.onnx"]).sha256["model.onnx"]
        assert "without an mexport manifest" in (backend.precision or "")
    assert backends["learned-fp32"].origin == "mexport export" and MANIFEST_NAME in backends["learned-fp32"].files
    assert "MatMulNBits" in (backends["ort-int4"].precision or "")
    assert "DequantizeLinear" in (backends["int4-no-manifest"].precision or "")
    verdicts = {r.candidate: r.verdict.status for r in report.results}
    assert verdicts["optimum-fp32"] == "pass" and verdicts["learned-fp32"] == "pass"
    assert all(status in ("pass", "fail", "inconclusive") for status in verdicts.values())  # scored, not skipped
    # the same weights and math as the mexport export, full logits instead of lean: the same scores
    for ours, theirs in zip(report.scores["medmcqa"]["learned-fp32"], report.scores["medmcqa"]["optimum-fp32"],
                            strict=True):
        assert ours.logliks == pytest.approx(theirs.logliks, abs=1e-4)
    saved = json.loads((out / "report.json").read_text())
    saved_backends = {b["label"]: b for b in saved["backends"]}
    assert saved_backends["ort-int4"]["files"] == backends["ort-int4"].files
    markdown = (out / "report.md").read_text()
    assert "`optimum-fp32`: ONNX graph from another tool, no mexport manifest; files scored:" in markdown


def test_foreign_directories_are_refused_clearly_when_they_are_not_decoders(
    tmp_path: Path, optimum_dir: Path, tiny_checkpoint: Path
) -> None:
    import onnx

    from mexport.validate.backends import open_backend

    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "README.md").write_text("no model here\n")
    _one_line_error(_validate_cli(tiny_checkpoint, [empty], tmp_path / "r"), 2, "no ONNX graph and no config.json")

    two = tmp_path / "two-graphs"
    shutil.copytree(optimum_dir, two)
    shutil.copy(two / "model.onnx", two / "model.quant.onnx")
    _one_line_error(_validate_cli(tiny_checkpoint, [two], tmp_path / "r"), 2, "holds 2 ONNX graphs")
    runtime, kind, _ = open_backend(two / "model.quant.onnx")  # the graph named itself
    assert kind == "ort" and "model.quant.onnx" in runtime.files.sha256

    renamed = tmp_path / "renamed-io"
    shutil.copytree(optimum_dir, renamed)
    model = onnx.load(str(renamed / "model.onnx"), load_external_data=False)
    for value in model.graph.input:
        if value.name == "attention_mask":
            value.name = "mask"
    for node in model.graph.node:
        node.input[:] = ["mask" if name == "attention_mask" else name for name in node.input]
    onnx.save_model(model, str(renamed / "model.onnx"))
    _one_line_error(_validate_cli(tiny_checkpoint, [renamed], tmp_path / "r"), 2, "cannot feed ['mask']")

    no_config = tmp_path / "no-config"
    shutil.copytree(optimum_dir, no_config)
    (no_config / "config.json").unlink()
    _one_line_error(_validate_cli(tiny_checkpoint, [no_config], tmp_path / "r"), 2, "needs the model's config.json")


@pytest.mark.slow
def test_lm_eval_runs_a_foreign_decoder_and_records_its_files(tmp_path: Path, optimum_dir: Path) -> None:
    pytest.importorskip("lm_eval")
    from mexport.lmeval import run_lm_eval

    task_dir = Path(__file__).parent / "data" / "lmeval_tasks"
    tasks = ["mexport_medmcqa_sample"]
    foreign = run_lm_eval(optimum_dir, tasks, include_path=task_dir, limit=6, batch_size=4, output_path=tmp_path)
    assert foreign["mexport_model"]["mexport_manifest"] is False and foreign["mexport_model"]["backend"] == "ort"
    assert {"model.onnx", "model.onnx_data", "config.json"} <= set(foreign["mexport_model"]["files"])
    assert "without an mexport manifest" in foreign["mexport_model"]["precision"]
    assert len(foreign["samples"]["mexport_medmcqa_sample"]) == 6
    [results_file] = tmp_path.glob("*/results_*.json")
    assert json.loads(results_file.read_text())["mexport_model"]["files"] == foreign["mexport_model"]["files"]
