"""Integrity by construction: verified inputs, unfinished directories refused, locks, failed runs kept beside."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mexport import manifest as manifest_module
from mexport.cli import app
from mexport.errors import EnvironmentFailure, IntegrityError, MexportError, ValidationFailedError
from mexport.fsutil import output_lock, remove_stale_staging, replace_files_as_set, staged_output_dir
from mexport.manifest import STAMP_NAME, read_manifest, verify_artifact, write_manifest

runner = CliRunner()
DEAD_PID = 4_000_000  # above pid_max on Linux: never a live process


@pytest.fixture
def export_copy(tmp_path: Path, tiny_export_fp32: Path) -> Path:
    """A private copy of the tiny export that a test may damage."""
    return Path(shutil.copytree(tiny_export_fp32, tmp_path / "export"))


def _flip_byte(path: Path, offset: int = 1000) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_truncated_or_missing_files_are_named(export_copy: Path) -> None:
    verify_artifact(export_copy)
    data = export_copy / "model.onnx.data"
    stat = data.stat()
    _flip_byte(data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the mtime put back (ctime still moves)
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: sha256 does not match"):
        verify_artifact(export_copy)
    _flip_byte(data)
    verify_artifact(export_copy)
    (export_copy / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"export: no tokenizer\.json \(recorded in mexport.json\)"):
        verify_artifact(export_copy)
    with open(data, "r+b") as handle:
        handle.truncate(stat.st_size - 1)
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: \d+ bytes, but mexport.json records"):
        verify_artifact(export_copy)


def test_repeated_verification_hashes_only_changed_files(export_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    (export_copy / STAMP_NAME).unlink(missing_ok=True)
    verify_artifact(export_copy)
    recorded = set(read_manifest(export_copy)["files"])
    assert set(hashed) == recorded
    hashed.clear()
    verify_artifact(export_copy)
    assert hashed == []  # every file's (size, mtime_ns, inode, ctime_ns) matches the stamp
    (export_copy / "config.json").write_bytes((export_copy / "config.json").read_bytes())  # same bytes, new ctime
    verify_artifact(export_copy)
    assert hashed == ["config.json"]
    # a stamp never vouches for a hash the manifest no longer records
    manifest = read_manifest(export_copy)
    manifest["files"]["config.json"]["sha256"] = "0" * 64
    write_manifest(export_copy, manifest)
    with pytest.raises(IntegrityError, match="config.json: sha256"):
        verify_artifact(export_copy)


def test_a_manifest_without_file_hashes_cannot_be_verified(export_copy: Path) -> None:
    manifest = read_manifest(export_copy)
    del manifest["files"]
    write_manifest(export_copy, manifest)
    with pytest.raises(IntegrityError, match="records no file hashes"):
        verify_artifact(export_copy)


def test_corrupt_export_stops_quantize_and_generate_with_exit_3(export_copy: Path, tmp_path: Path) -> None:
    _flip_byte(export_copy / "model.onnx.data")
    for args in (
        ["quantize", str(export_copy), "-o", str(tmp_path / "q"), "--recipe", "int8-wo"],
        ["generate", str(export_copy), "-p", "Hello"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 3, result.output
        assert "model.onnx.data: sha256 does not match" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


def test_corrupt_candidate_stops_validate(export_copy: Path) -> None:
    from mexport.validate.backends import open_backend

    (export_copy / "model.onnx").write_bytes(b"")
    with pytest.raises(IntegrityError, match="model.onnx: 0 bytes"):
        open_backend(export_copy)


def test_quantize_records_what_it_verified(tmp_path: Path, tiny_export_fp32: Path) -> None:
    from mexport.optimize import quantize

    result = quantize(tiny_export_fp32, tmp_path / "q", "int8-wo", check_prompts=0)
    (verified,) = result.manifest["verified_inputs"]
    parent = read_manifest(tiny_export_fp32)
    assert verified["path"] == str(tiny_export_fp32.resolve()) and verified["kind"] == "export"
    assert verified["files"] == {name: record["sha256"] for name, record in parent["files"].items()}
    assert STAMP_NAME not in result.manifest["files"] and not (tmp_path / "q" / STAMP_NAME).exists()
    verify_artifact(tmp_path / "q")


def test_unfinished_directories_are_never_inputs(tmp_path: Path, tiny_export_fp32: Path) -> None:
    partial = Path(shutil.copytree(tiny_export_fp32, tmp_path / f".export.partial-{DEAD_PID}"))
    result = runner.invoke(app, ["quantize", str(partial), "-o", str(tmp_path / "q"), "--recipe", "int8-wo"])
    assert result.exit_code == 3
    assert "an unfinished output" in result.output and "use the finished directory export" in result.output


def test_stale_staging_is_removed_and_an_interrupted_commit_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{DEAD_PID}"
    live = tmp_path / ".out.partial-1"  # pid 1 is alive: maybe a run on this host, never touched
    previous = tmp_path / f".out.old-{DEAD_PID}"  # killed between the two renames of a commit
    other = tmp_path / f".outer.partial-{DEAD_PID}"  # another output's staging
    for directory in (stale, live, previous, other):
        directory.mkdir()
    (previous / "kept.txt").write_text("the previous artifact")
    remove_stale_staging(out)
    assert not stale.exists() and live.is_dir() and other.is_dir() and not previous.exists()
    assert (out / "kept.txt").read_text() == "the previous artifact"


@contextlib.contextmanager
def another_run_writing(out: Path) -> Iterator[None]:
    """A second process holding ``out``'s lock, as a concurrent mexport run does."""
    script = (
        f"import time\nfrom mexport.fsutil import output_lock\nwith output_lock({str(out)!r}):\n"
        "    print('locked', flush=True)\n    time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_fails_fast(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with another_run_writing(out):
        with pytest.raises(EnvironmentFailure, match="another mexport run is writing this output"), staged_output_dir(out):
            pass
        result = runner.invoke(app, ["fixture", "tiny-gemma2", str(out)])
        assert result.exit_code == 3 and "another mexport run" in result.output
    with output_lock(out), staged_output_dir(out) as staging:  # one process may nest its own locks
        (staging / "a").write_text("a")
    assert (out / "a").is_file()


def test_a_failed_run_never_replaces_a_good_artifact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_output_dir(out) as staging:
        write_manifest(staging, {"kind": "export", "status": "passed"})
    for attempt in range(2):  # a second failure replaces the first failed one, never the good one
        kept = "kept as .*out.failed; the previous out is unchanged"
        with pytest.raises(ValidationFailedError, match=kept), staged_output_dir(out, overwrite=True) as staging:
            write_manifest(staging, {"kind": "export", "status": "failed", "attempt": attempt})
            raise ValidationFailedError("logits differ")
        assert read_manifest(out)["status"] == "passed"
        assert read_manifest(tmp_path / "out.failed")["attempt"] == attempt
    # with nothing (or only a failed artifact) there, the failed output takes the name, marked failed
    fresh = tmp_path / "fresh"
    with pytest.raises(ValidationFailedError), staged_output_dir(fresh) as staging:
        write_manifest(staging, {"kind": "export", "status": "failed"})
        raise ValidationFailedError("logits differ")
    assert read_manifest(fresh)["status"] == "failed"


def test_report_files_are_replaced_as_one_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report"
    replace_files_as_set(report, {"report.json": b"1", "report.md": b"1"})
    (report / ".cache").mkdir()
    (report / ".cache" / "scores.jsonl").write_text("cached")

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", lambda self, data: crash() if self.name == "report.md" else None)
        with pytest.raises(OSError):
            replace_files_as_set(report, {"report.json": b"2", "report.md": b"2"})
    assert (report / "report.json").read_text() == "1" and (report / "report.md").read_text() == "1"
    replace_files_as_set(report, {"report.json": b"2", "report.md": b"2"})
    assert (report / "report.json").read_text() == "2" and (report / "report.md").read_text() == "2"
    assert (report / ".cache" / "scores.jsonl").read_text() == "cached"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.lock", "report"]


def test_export_without_tokenizer_records_it_and_generate_says_what_is_missing(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from mexport.export import export_onnx

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (checkpoint / name).unlink(missing_ok=True)
    result = export_onnx(checkpoint, tmp_path / "export", dtype="fp32", validate=False)
    assert result.manifest["tokenizer"] == "missing"
    cli = runner.invoke(app, ["generate", str(tmp_path / "export"), "-p", "Hello"])
    assert cli.exit_code == 2 and "no tokenizer files" in cli.output and "Traceback" not in cli.output


def test_generate_caps_new_tokens_by_the_context(tiny_export_fp32: Path) -> None:
    from mexport.export import generate_text

    context = json.loads((tiny_export_fp32 / "mexport.json").read_text())["model_config"]["max_position_embeddings"]
    result = generate_text(tiny_export_fp32, "Hello", max_new_tokens=100_000)
    assert result.prompt_tokens + result.new_tokens <= context


# ---- inputs bounded by the model ----------------------------------------------------------------------------------


def test_int4_block_size_that_does_not_fit_is_refused(tmp_path: Path, tiny_export_fp32: Path) -> None:
    from mexport.optimize import quantize

    with pytest.raises(MexportError, match=r"--block-size 7 does not fit the input width of 64, 128"):
        quantize(tiny_export_fp32, tmp_path / "q", "int4-wo", block_size=7)
    assert not (tmp_path / "q").exists()


def test_ignored_options_warn_and_a_missing_calib_file_is_an_error(tmp_path: Path, tiny_export_fp32: Path) -> None:
    args = ["quantize", str(tiny_export_fp32), "-o", str(tmp_path / "q"), "-r", "int8-wo"]
    missing = runner.invoke(app, [*args, "--calib", str(tmp_path / "missing.jsonl")])
    assert missing.exit_code == 2 and "missing.jsonl: no such file" in missing.stderr
    (tmp_path / "calib.txt").write_text("some calibration text\n")
    ignored = runner.invoke(app, [*args, "--calib", str(tmp_path / "calib.txt"), "--block-size", "64",
                                  "--check-prompts", "0"])
    assert ignored.exit_code == 0, ignored.output
    assert "--calib ignored: int8-wo needs no calibration" in ignored.stderr
    assert "--block-size ignored: int8-wo quantizes weights per channel" in ignored.stderr


def test_data_files_with_a_utf8_bom_keep_their_first_question(tmp_path: Path) -> None:
    from mexport.validate.tasks import load_task

    sample = Path(__file__).resolve().parents[1] / "mexport" / "validate" / "data" / "medmcqa_sample.jsonl"
    rows = sample.read_text(encoding="utf-8").splitlines()[:3]
    data = tmp_path / "medmcqa.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    loaded = load_task("medmcqa", data)
    assert len(loaded.items) == 3 and loaded.skipped == 0


def test_validate_prints_dropped_rows_by_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mexport.validate
    from mexport.validate.reports import TaskInfo

    task = TaskInfo(name="medmcqa", source="f.jsonl", source_sha256="0", items_sha256="0", n_items=40,
                    total_rows=43, skipped={"label": 1, "missing option": 2}, metrics=("acc",))

    class Report:
        tasks = (task,)
        exit_code = 0

        def summary(self) -> dict[str, object]:
            return {"tasks": {"medmcqa": {"skipped": task.skipped}}}

    monkeypatch.setattr(mexport.validate, "validate", lambda *args, **kwargs: Report())
    result = runner.invoke(app, ["-q", "validate", "--reference", "r", "--candidate", "c", "--tasks", "medmcqa",
                                 "-o", str(tmp_path / "report"), "--json"])
    assert result.exit_code == 0, result.output
    assert "medmcqa: dropped 3 of 43 rows (1 label, 2 missing option)" in result.stderr


def test_stages_take_the_output_lock_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tiny_export_fp32: Path) -> None:
    """A second writer fails before tracing, calibrating or building, not after hours of it."""
    from mexport.export import exporter
    from mexport.optimize import quantize
    from mexport.optimize.engine import EngineSettings, build_engine, builder
    from mexport.optimize.quantize import api

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started while another run held the output")

    monkeypatch.setattr(exporter, "resolve_checkpoint", never)
    monkeypatch.setattr(api, "read_export", never)
    monkeypatch.setattr(builder, "read_source_manifest", never)
    out = tmp_path / "out"
    with another_run_writing(out):
        for stage in (
            lambda: exporter.export_onnx("fixture-dir", out),
            lambda: quantize(tiny_export_fp32, out, "int8-wo"),
            lambda: build_engine(tiny_export_fp32, out, EngineSettings()),
        ):
            with pytest.raises(EnvironmentFailure, match="another mexport run is writing this output"):
                stage()
