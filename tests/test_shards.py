"""Sharded validation: a stable partition, partial reports without verdicts, merges identical to one run, refusals.

The tiny fixture (random weights) against its fp32 and bf16 exports on the shipped MedMCQA and PubMedQA samples:
the exports' log-likelihoods drift from the checkpoint's, so KL and max |Δloglik| are non-zero and the merged
numbers have something to get wrong. Batch size 1: ONNX Runtime's batched, left-padded prefill rounds a question's
float32 logits differently with other neighbours (~1e-6 in a log-likelihood), and a shard batches other neighbours;
one question per call makes every record independent of the others, so "identical" can mean every bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import MexportError
from mexport.validate import merge_reports, validate, validate_shard
from mexport.validate.reports import REPORT_FILES
from mexport.validate.shards import PARTIAL_REPORT, ShardSpec, read_partial, shard_of

TASKS = ["medmcqa", "pubmedqa"]
DATA = {"medmcqa": "sample", "pubmedqa": "sample"}
OPTIONS: dict[str, Any] = {"data": DATA, "margin": 25.0, "batch_size": 1}


def statistics(report_dir: Path) -> dict[str, Any]:
    """Every number and verdict of a report (report.json without the run's time, speed and provenance)."""
    document = json.loads((report_dir / "report.json").read_text())
    backends = [{k: v for k, v in b.items() if k != "path"} for b in document["backends"]]
    return {
        "results": document["results"],
        "tasks": {name: {k: v for k, v in task.items() if k != "source"} for name, task in document["tasks"].items()},
        "outcome": document["outcome"],
        "failed": document["failed"],
        "backends": backends,
    }


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_export_fp32: Path) -> Path:
    out = tmp_path_factory.mktemp("full") / "report"
    validate(tiny_checkpoint, [tiny_export_fp32], TASKS, output=out, **OPTIONS)
    return out


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_export_fp32: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    outs = [root / f"shard-{k}" for k in (1, 2, 3)]
    for k, out in enumerate(outs, start=1):
        validate_shard(tiny_checkpoint, [tiny_export_fp32], TASKS, output=out, shard=f"{k}/3", **OPTIONS)
    return outs


# ---------------------------------------------------------------------------------------------------- partition


def test_shard_spec_parses_and_refuses() -> None:
    assert ShardSpec.parse("2/4") == ShardSpec(2, 4) and str(ShardSpec(2, 4)) == "2/4"
    for bad in ("0/3", "4/3", "3", "a/b", "1/0", "-1/2"):
        with pytest.raises(MexportError):
            ShardSpec.parse(bad)


def test_partition_is_by_question_not_by_order() -> None:
    ids = [f"q{i}" for i in range(300)]
    shards = [shard_of("medmcqa", doc_id, 3) for doc_id in ids]
    assert [shard_of("medmcqa", doc_id, 3) for doc_id in reversed(ids)] == shards[::-1]
    assert set(shards) == {1, 2, 3} and all(60 < shards.count(k) < 140 for k in (1, 2, 3))
    assert [shard_of("pubmedqa", doc_id, 3) for doc_id in ids] != shards  # the task is part of the hash
    assert {shard_of("medmcqa", doc_id, 1) for doc_id in ids} == {1}


# ---------------------------------------------------------------------------------------------------- merging


def test_partial_report_has_every_record_and_no_verdict(three_shards: list[Path], unsharded: Path) -> None:
    full = json.loads((unsharded / "report.json").read_text())
    seen: dict[str, set[str]] = {task: set() for task in TASKS}
    for k, out in enumerate(three_shards, start=1):
        assert {entry.name for entry in out.iterdir()} == {PARTIAL_REPORT, ".cache"}
        text = (out / PARTIAL_REPORT).read_text()
        document = json.loads(text)
        assert document["shard"] == {"index": k, "count": 3}
        assert "verdict" not in text and "results" not in document and "outcome" not in document
        assert {b["label"]: bool(b["fingerprint"]) for b in document["backends"]} == {
            "reference": True,
            "tiny-fp32": True,
        }
        assert document["settings"]["margin_points"] == 25.0 and document["settings"]["shard"] == f"{k}/3"
        for task in TASKS:
            for question in document["tasks"][task]["questions"]:
                assert shard_of(task, question["doc_id"], 3) == k
                assert set(question["backends"]) == {"reference", "tiny-fp32"}
                seen[task].add(question["doc_id"])
    for task in TASKS:
        assert seen[task] == {q["doc_id"] for q in full["tasks"][task]["questions"]}


@pytest.mark.parametrize("count", [1, 3])
def test_merged_shards_equal_the_unsharded_run(
    count: int, three_shards: list[Path], unsharded: Path, tiny_checkpoint: Path, tiny_export_fp32: Path,
    tmp_path: Path,
) -> None:
    if count == 1:
        parts = [tmp_path / "only"]
        validate_shard(tiny_checkpoint, [tiny_export_fp32], TASKS, output=parts[0], shard="1/1", **OPTIONS)
    else:
        parts = list(reversed(three_shards))  # any order
    merged = merge_reports(parts, output=tmp_path / "merged")
    assert statistics(tmp_path / "merged") == statistics(unsharded)
    assert {entry.name for entry in (tmp_path / "merged").iterdir()} >= set(REPORT_FILES)
    full = json.loads((unsharded / "report.json").read_text())
    assert merged.exit_code == 0 and merged.summary()["results"] == [
        {k: v for k, v in row.items()} for row in _summary_rows(full)
    ]
    result = full["results"][0]["metrics"]["acc"]
    assert result["n"] == 40 and full["results"][0]["mean_kl"] > 0
    document = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert [part["shard"] for part in document["settings"]["merged_from"]] == [f"{k}/{count}" for k in range(1, count + 1)]
    assert document["speed"]["tiny-fp32"]["questions"] == full["speed"]["tiny-fp32"]["questions"]


def _summary_rows(full: dict[str, Any]) -> list[dict[str, Any]]:
    from mexport.validate.stats import resolvable_difference

    rows = []
    for result in full["results"]:
        acc = result["metrics"]["acc"]
        rows.append(
            {
                "task": result["task"],
                "candidate": result["candidate"],
                "verdict": result["verdict"],
                "reasons": result["reasons"],
                "skipped_questions": result["skipped_questions"],
                "reference_acc": acc["reference_acc"],
                "candidate_acc": acc["candidate_acc"],
                "delta": acc["delta"],
                "delta_ci": acc["delta_ci"],
                "resolvable_difference": resolvable_difference(acc["n"]),
                "agreement": acc["agreement"],
                "mean_kl": result["mean_kl"],
            }
        )
    return rows


def test_merge_policy_can_be_overridden(three_shards: list[Path], tmp_path: Path) -> None:
    report = merge_reports(three_shards, output=tmp_path / "m", fail_on="never")
    assert report.settings["fail_on"] == "never" and report.exit_code == 0
    with pytest.raises(MexportError, match="--fail-on"):
        merge_reports(three_shards, output=tmp_path / "m2", fail_on="sometimes")


def _edited(part: Path, tmp_path: Path, name: str, edit: Any) -> Path:
    document = json.loads((part / PARTIAL_REPORT).read_text())
    edit(document)
    target = tmp_path / name / PARTIAL_REPORT
    target.parent.mkdir()
    target.write_text(json.dumps(document))
    return target


def _set(path: list[Any], value: Any) -> Any:
    def edit(document: dict[str, Any]) -> None:
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def test_merge_refuses_parts_that_do_not_belong_together(three_shards: list[Path], tmp_path: Path) -> None:
    one, two, three = three_shards
    cases = {
        "missing 3/3": [one, two],
        "given twice": [one, two, three, two],
        "seed=": [one, two, _edited(three, tmp_path, "seed", _set(["settings", "seed"], 99))],
        "margin_points=": [one, two, _edited(three, tmp_path, "margin", _set(["settings", "margin_points"], 2.0))],
        "another reference": [
            one, two, _edited(three, tmp_path, "ref", _set(["backends", 0, "fingerprint"], "0" * 64)),
        ],
        "different questions of medmcqa": [
            one, two, _edited(three, tmp_path, "data", _set(["tasks", "medmcqa", "items_sha256"], "f" * 64)),
        ],
        "split the questions": [one, two, _edited(three, tmp_path, "count", _set(["shard", "count"], 4))],
        "other parts score other candidates": [  # another candidate (its manifest's sha256) needs its own complete set
            one, two, _edited(three, tmp_path, "cand", _set(["backends", 1, "fingerprint"], "1" * 64)),
        ],
        "no partial report": [one, two, tmp_path],
    }
    runner = CliRunner()
    for expected, parts in cases.items():
        out = tmp_path / f"out-{len(os.listdir(tmp_path))}"
        result = runner.invoke(app, ["merge-reports", *map(str, parts), "-o", str(out), "--json"])
        assert result.exit_code == 2, (expected, result.output)
        assert expected in json.loads(result.stdout)["error"]["message"], expected
        assert not out.exists()  # nothing half-merged


def test_shard_cli_writes_partial_and_exits_0(tiny_checkpoint: Path, tiny_export_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["validate", "--reference", str(tiny_checkpoint), "--candidate", str(tiny_export_fp32), "--tasks",
            "medmcqa", "--data", "medmcqa=sample"]
    result = CliRunner().invoke(app, [*args, "--shard", "2/2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["partial"] is True and summary["shard"] == "2/2" and "outcome" not in summary
    assert read_partial(out).questions["medmcqa"]
    bad = CliRunner().invoke(app, [*args, "--shard", "3/2", "-o", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "between 1 and N=2" in bad.output


def test_target_gpu_reports_merge_into_one_table(
    three_shards: list[Path], tiny_checkpoint: Path, tiny_export_fp32: Path, tmp_path: Path
) -> None:
    """One engine per target GPU: each host validates its own candidate's shards; one merge, a row per candidate.
    The second target's artifact is a copy whose manifest differs (another sha256), as another engine's would."""
    other_target = tmp_path / "tiny-fp32-l4"
    shutil.copytree(tiny_export_fp32, other_target)
    manifest = json.loads((other_target / "mexport.json").read_text())
    (other_target / "mexport.json").write_text(json.dumps({**manifest, "note": "built for another GPU"}))
    parts = []
    for k in (1, 2):  # another host may split its work another way
        parts.append(tmp_path / f"l4-{k}")
        validate_shard(tiny_checkpoint, [other_target], TASKS, output=parts[-1], shard=f"{k}/2", **OPTIONS)
    merge_reports([*three_shards, *parts], output=tmp_path / "merged")
    validate(tiny_checkpoint, [tiny_export_fp32, other_target], TASKS, output=tmp_path / "both", **OPTIONS)
    merged, both = statistics(tmp_path / "merged"), statistics(tmp_path / "both")
    assert [b["label"] for b in merged["backends"]] == ["reference", "tiny-fp32", "tiny-fp32-l4"]
    assert merged == both  # the same reference scores on this CPU: one reference row
    table = (tmp_path / "merged" / "report.md").read_text()
    assert "| tiny-fp32 |" in table and "| tiny-fp32-l4 |" in table


@pytest.mark.slow
def test_devices_run_one_process_per_shard_and_merge(
    unsharded: Path, tiny_checkpoint: Path, tiny_export_fp32: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    validate(tiny_checkpoint, [tiny_export_fp32], TASKS, output=out, devices=["cpu", "cpu"], **OPTIONS)
    assert statistics(out) == statistics(unsharded)
    parts = [read_partial(out / ".cache" / "shards" / f"{k}-of-2") for k in (1, 2)]
    pids = {part.run["pid"] for part in parts}
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.slow
def test_failed_shard_fails_the_run_and_nothing_is_merged(
    tiny_checkpoint: Path, tiny_export_fp32: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    runner = CliRunner()
    args = ["validate", "--reference", str(tiny_checkpoint), "--candidate", str(tiny_export_fp32), "--tasks",
            "medmcqa", "--data", "medmcqa=sample", "-o", str(out), "--json"]
    result = runner.invoke(app, [*args, "--devices", "cpu,cuda"])  # this machine has no GPU: shard 2 fails
    assert result.exit_code != 0
    assert "shard 2/2 on cuda" in json.loads(result.stdout)["error"]["message"]
    assert not any((out / name).exists() for name in REPORT_FILES)
    assert runner.invoke(app, [*args, "--devices", "cpu,gpu0"]).exit_code == 2


def test_pipeline_devices_are_checked_like_the_cli(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from mexport.pipeline import PipelineConfig

    config = PipelineConfig(model="fixture:tiny-gemma2", output=tmp_path, devices=["cpu", "cpu"])
    assert config.devices == ["cpu", "cpu"]
    for devices, message in ((["gpu0"], "not a device"), (["cuda:0"], "not cpu devices")):
        with pytest.raises(ValidationError, match=message):
            PipelineConfig(model="fixture:tiny-gemma2", output=tmp_path, devices=devices)


def test_candidate_skipped_on_one_shard_is_skipped_in_the_merge(three_shards: list[Path], tmp_path: Path) -> None:
    def skip_candidate(document: dict[str, Any]) -> None:
        document["backends"][1]["skip_reason"] = "TensorRT is missing"
        for task in document["tasks"].values():
            for question in task["questions"]:
                del question["backends"]["tiny-fp32"]

    one, two, three = three_shards
    report = merge_reports([one, two, _edited(three, tmp_path, "skip", skip_candidate)], output=tmp_path / "m")
    assert {r.verdict.status for r in report.results} == {"skipped"}
    assert report.results[0].verdict.message == "shard 3/3: TensorRT is missing"
    with pytest.raises(MexportError, match="holds a partial report being merged"):
        merge_reports(three_shards, output=one)
    assert (one / PARTIAL_REPORT).is_file()
