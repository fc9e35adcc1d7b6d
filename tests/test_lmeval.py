"""`mexport lm-eval`: lm-eval's evaluator on mexport runtimes reproduces `lm_eval --model hf` on local tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mexport.lazy import is_available

pytestmark = pytest.mark.skipif(
    not is_available("lm_eval") or not is_available("accelerate"),
    reason="lm-eval not installed (pip install 'mexport[lmeval]')",
)

TASK_DIR = Path(__file__).parent / "data" / "lmeval_tasks"
# lettered one-token choices, and AfriMedQA-style multi-token option texts
TASKS = ["mexport_medmcqa_sample", "mexport_afrimedqa_sample"]
LIMIT = 12


@pytest.fixture(scope="module")
def fp32_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint saved in fp32, so HFLM and mexport's PyTorch both compute in fp32 from the same weights
    as the fp32 export."""
    import transformers

    out = tmp_path_factory.mktemp("fp32") / "tiny-fp32"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype="float32")
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    return out


def _logliks(results: dict) -> dict[str, list[list[float]]]:
    """Per task, per document: each choice's log-likelihood as lm-eval logged it."""
    return {
        task: [[float(resp[0][0]) for resp in sample["resps"]] for sample in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


def _metrics(results: dict) -> dict[str, tuple[float, float]]:
    return {task: (values["acc,none"], values["acc_norm,none"]) for task, values in results["results"].items()}


@pytest.fixture(scope="module")
def hf_results(fp32_checkpoint: Path) -> dict:
    """`lm_eval --model hf --model_args pretrained=...,dtype=float32,attn_implementation=eager` on the same tasks.

    Eager attention: with HFLM's default (SDPA) transformers skips Gemma2's attention softcap (9e-4 off here)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(fp32_checkpoint),
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "eager",
        },
        tasks=TASKS,
        limit=LIMIT,
        batch_size=8,
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
    )


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_mexport_lm_eval_reproduces_hf(
    backend: str, fp32_checkpoint: Path, tiny_export_fp32: Path, hf_results: dict, tmp_path: Path
) -> None:
    from mexport.lmeval import run_lm_eval

    model = fp32_checkpoint if backend == "torch" else tiny_export_fp32
    results = run_lm_eval(model, TASKS, include_path=TASK_DIR, limit=LIMIT, batch_size=4, output_path=tmp_path)
    assert _metrics(results) == _metrics(hf_results)
    ours, theirs = _logliks(results), _logliks(hf_results)
    assert {task: len(docs) for task, docs in ours.items()} == {task: LIMIT for task in TASKS}
    for task in TASKS:
        for mine, reference in zip(ours[task], theirs[task], strict=True):
            assert mine == pytest.approx(reference, abs=1e-4)
    [results_file] = tmp_path.glob("*/results_*.json")  # lm-eval's usual layout
    assert set(json.loads(results_file.read_text())["results"]) == set(TASKS)


def test_cli_prints_lm_evals_table_and_refuses_unknown_tasks(fp32_checkpoint: Path) -> None:
    from typer.testing import CliRunner

    from mexport.cli import app

    runner = CliRunner()
    args = ["lm-eval", str(fp32_checkpoint), "--include-path", str(TASK_DIR), "--limit", "2"]
    result = runner.invoke(app, [*args, "--tasks", TASKS[0]])
    assert result.exit_code == 0, result.output
    assert "|mexport_medmcqa_sample|" in result.output and "acc_norm" in result.output
    result = runner.invoke(app, [*args, "--tasks", "no_such_task"])
    assert result.exit_code == 2
    assert "lm-eval knows no task 'no_such_task'" in result.output


def test_lmeval_task_items_are_the_prompts_lm_eval_scores() -> None:
    from mexport.validate.tasks import load_task

    # the local task renders mexport's medmcqa sample: lm-eval must build the very same items
    built = load_task("mexport_medmcqa_sample", include_path=TASK_DIR)
    builtin = load_task("medmcqa", "sample")
    assert [(i.context, i.choices, i.gold) for i in built.items] == [
        (i.context, i.choices, i.gold) for i in builtin.items
    ]
    assert (built.source, built.total_rows) == ("lm-eval:mexport_medmcqa_sample", len(builtin.items))
    fewshot = load_task("mexport_afrimedqa_sample", include_path=TASK_DIR, shots=2, limit=5, seed=7)
    assert len(fewshot.items) == 5
    assert all(item.context.count("\n\n") >= 2 and item.context.endswith("Answer:") for item in fewshot.items)


def test_validate_reports_parity_on_an_lmeval_task(
    tiny_checkpoint: Path, tiny_export_fp32: Path, tmp_path: Path
) -> None:
    from mexport.validate import validate

    report = validate(
        tiny_checkpoint,
        [tiny_export_fp32],
        ["mexport_afrimedqa_sample"],
        output=tmp_path / "report",
        include_path=TASK_DIR,
        limit=8,
    )
    [result] = report.results
    assert result.task == "mexport_afrimedqa_sample"
    assert report.tasks[0].n_items == 8 and report.tasks[0].source == "lm-eval:mexport_afrimedqa_sample"
    assert result.verdict.status in ("pass", "inconclusive")
    assert "mexport_afrimedqa_sample" in (tmp_path / "report" / "report.md").read_text()


def test_a_group_is_refused_with_the_way_out() -> None:
    from mexport.errors import MexportError
    from mexport.validate.tasks import load_task

    with pytest.raises(MexportError, match="'multimedqa' is a group, not a task") as raised:
        load_task("multimedqa")
    assert "one by one" in raised.value.hint
