"""The learned fixture: a tiny Gemma2 fine-tuned on the sample and demo questions answers them far above chance.

The first run in a fresh cache trains it (700 steps: 3.6 minutes on a 2-core machine loaded by other jobs, one
torch thread); later runs copy the cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mexport.errors import MexportError
from mexport.fixtures.learned import DEFAULT_TASKS, learned_note, make_learned_fixture
from mexport.manifest import sha256_file
from mexport.validate.tasks import TASKS, load_task

THRESHOLD = 0.8
DEMO_THRESHOLD = 0.6


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_learned_fixture(tmp_path_factory.mktemp("learned") / "learned-gemma2")


@pytest.mark.slow
def test_checkpoint_layout_matches_make_fixture(learned: Path) -> None:
    import json

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "fixture.json"):
        assert (learned / name).is_file(), name
    config = json.loads((learned / "config.json").read_text())
    assert config["model_type"] == "gemma2"
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    assert json.loads((learned / "fixture.json").read_text())["fixture"] == "learned-gemma2"


@pytest.mark.slow
def test_accuracy_far_above_chance_when_scored_like_validation(learned: Path) -> None:
    import torch

    from mexport.runtime.torch_runtime import TorchDecoder
    from mexport.validate.backends import load_tokenizer
    from mexport.validate.scoring import score_items

    note = learned_note(learned)
    tokenizer = load_tokenizer(learned)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TorchDecoder(learned) as runtime:  # bf16, as saved
            assert runtime.dtype == "bf16"
            for task in DEFAULT_TASKS:
                scores = score_items(runtime, tokenizer, load_task(task, "sample").items, progress=False)
                accuracy = sum(score.acc for score in scores) / len(scores)
                assert accuracy > THRESHOLD > TASKS[task].chance, task
                assert accuracy == pytest.approx(note["accuracy_bf16"][task]["acc"]), task
            # the 200-question demo sets need binding each fact to its infection: lower, still far above chance
            demo = note["accuracy_bf16_demo"][task]
            assert demo["n"] == 200 and demo["acc"] > DEMO_THRESHOLD > TASKS[task].chance, task
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_second_call_is_served_from_the_cache(learned: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    again = make_learned_fixture(tmp_path / "again")
    assert time.perf_counter() - started < 5
    assert sha256_file(again / "model.safetensors") == sha256_file(learned / "model.safetensors")
    with pytest.raises(MexportError, match="not empty"):
        make_learned_fixture(again)


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(MexportError, match="unknown learned fixture 'tiny-gemma2'"):
        make_learned_fixture(tmp_path / "x", "tiny-gemma2")
    with pytest.raises(MexportError, match="unknown task"):
        make_learned_fixture(tmp_path / "x", tasks=("mmlu",))
    with pytest.raises(MexportError, match="not a learned-gemma2 checkpoint"):
        learned_note(tmp_path)
