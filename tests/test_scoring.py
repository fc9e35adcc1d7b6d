"""MCQ scoring: lm-eval's tokenisation and log-likelihoods, the cached fast path against one-forward-per-choice."""

from __future__ import annotations

import math
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mexport.errors import MexportError
from mexport.runtime.base import DecoderRuntime, DecoderSpec, RuntimeLimits, kept_logits
from mexport.validate.scoring import (
    QuestionScore,
    SkippedQuestion,
    encode_pair,
    loglikelihood_naive,
    score_items,
    score_requests,
    score_token_requests,
)
from mexport.validate.tasks import MCQItem, load_task

VOCAB = 64


class WordTokenizer:
    """GPT-2-like pieces (a word keeps its leading space; a bare trailing space is its own piece), BOS prepended."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        pieces = re.findall(r" ?[^ ]+| +", text)
        ids = [3 + zlib.crc32(piece.encode()) % (VOCAB - 3) for piece in pieces]
        return [self.bos_token_id, *ids] if add_special_tokens else ids


class NumberTokenizer(WordTokenizer):
    """ "3 4 5" -> [BOS, 3, 4, 5]: token ids readable in the test."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [int(piece) for piece in text.split()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids


class HistoryRuntime(DecoderRuntime):
    """A fake decoder whose "KV cache" is the token history: logits = W[token] + mean of U over attended tokens.

    Every logit depends on the current token and on exactly the tokens the attention mask lets it see, so cache
    handling, padding and position bookkeeping errors all change the scores.
    """

    name = "fake"

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.current = rng.normal(size=(VOCAB, VOCAB))
        self.context = rng.normal(size=(VOCAB, VOCAB))
        self.calls: list[tuple[int, ...]] = []
        self.prefill_kept: list[int] = []  # logits_to_keep of each call without a past
        self.max_batch: int | None = None
        self.max_context: int | None = None
        self.max_input_len: int | None = None

    @property
    def spec(self) -> DecoderSpec:
        return DecoderSpec(num_layers=1, num_kv_heads=1, head_dim=1, vocab_size=VOCAB)

    @property
    def limits(self) -> RuntimeLimits:
        return RuntimeLimits(max_batch=self.max_batch, max_context=self.max_context, max_input_len=self.max_input_len)

    def forward(self, input_ids, attention_mask, past=None, logits_to_keep=0):
        batch, new = input_ids.shape
        history = past if past is not None else np.zeros((batch, 0), dtype=np.int64)
        tokens = np.concatenate([history, input_ids], axis=1)
        assert attention_mask.shape == tokens.shape
        self.calls.append(input_ids.shape)
        if past is None:
            self.prefill_kept.append(logits_to_keep)
        logits = np.zeros((batch, new, VOCAB), dtype=np.float32)
        # a left-pad position sees no token: its logits are NaN, so reading one would poison the scores
        with np.errstate(invalid="ignore"), warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            for row in range(batch):
                for step in range(new):
                    upto = history.shape[1] + step + 1
                    seen = tokens[row, :upto][attention_mask[row, :upto] == 1]
                    logits[row, step] = self.current[tokens[row, upto - 1]] + self.context[seen].mean(axis=0)
        return logits[:, -kept_logits(new, logits_to_keep) :], tokens

    def repeat_past(self, past, repeats):
        assert past.shape[0] == 1
        return np.repeat(past, repeats, axis=0)


class SuccessorRuntime(HistoryRuntime):
    """Predicts token t+1 after token t with logit 20 (all others 0): log-likelihoods are hand-computable."""

    def forward(self, input_ids, attention_mask, past=None, logits_to_keep=0):
        logits = np.zeros((*input_ids.shape, VOCAB), dtype=np.float32)
        rows, steps = np.indices(input_ids.shape)
        logits[rows, steps, (input_ids + 1) % VOCAB] = 20.0
        history = past if past is not None else np.zeros((input_ids.shape[0], 0), dtype=np.int64)
        kept = kept_logits(input_ids.shape[1], logits_to_keep)
        return logits[:, -kept:], np.concatenate([history, input_ids], axis=1)


class UniformRuntime(HistoryRuntime):
    def forward(self, input_ids, attention_mask, past=None, logits_to_keep=0):
        logits = np.zeros((*input_ids.shape, VOCAB), dtype=np.float32)
        history = past if past is not None else np.zeros((input_ids.shape[0], 0), dtype=np.int64)
        kept = kept_logits(input_ids.shape[1], logits_to_keep)
        return logits[:, -kept:], np.concatenate([history, input_ids], axis=1)


def _flat(scores: list[QuestionScore]) -> list[float]:
    return [value for score in scores for value in score.logliks]


def _requests(items: list[MCQItem]) -> list[tuple[str, str]]:
    return [(item.context, choice) for item in items for choice in item.choices]


MIXED_ITEMS = [
    MCQItem("t", "letters", "Question: which?\nA. x\nB. y\nAnswer:", (" A", " B"), 1),
    MCQItem("t", "words", "Question: a longer question with more words\nAnswer:", (" yes", " no", " not sure"), 0),
    MCQItem("t", "long", "Q: " + "word " * 30 + "\nAnswer:", (" one two three", " four", " five six"), 2),
    MCQItem("t", "short", "Answer:", (" C", " D", " E", " F"), 3),
    MCQItem("t", "trailing", "Answer: ", ("alpha beta", "gamma"), 0),
]


# ---- hand-checked values ------------------------------------------------------------------------------------


def test_successor_model_scores_match_hand_computation() -> None:
    """After "3 4": " 5 6" is predicted token by token, " 6 7" misses once, " 5 7" misses once."""
    tokenizer, runtime = NumberTokenizer(), SuccessorRuntime()
    log_norm = math.log(math.exp(20.0) + VOCAB - 1)
    right, wrong = 20.0 - log_norm, -log_norm
    requests = [("3 4", " 5 6"), ("3 4", " 6 7"), ("3 4", " 5 7"), ("3 4", " 5")]
    expected = [2 * right, wrong + right, right + wrong, right]
    fast = score_requests(runtime, tokenizer, requests)
    naive = loglikelihood_naive(runtime, tokenizer, requests)
    assert fast == pytest.approx(expected, abs=1e-5)
    assert naive == pytest.approx(expected, abs=1e-5)


def test_uniform_model_gives_minus_tokens_times_log_vocab_and_ties_go_to_first() -> None:
    item = MCQItem("t", "q", "Answer:", (" a b c", " a", " b"), 2)
    [score] = score_items(UniformRuntime(), WordTokenizer(), [item], progress=False)
    assert score.logliks == pytest.approx([-3 * math.log(VOCAB), -math.log(VOCAB), -math.log(VOCAB)])
    assert score.pred == 1  # " a" and " b" tie: the first wins, like numpy argmax in lm-eval
    assert score.choice_chars == [5, 1, 1]  # characters without the target delimiter
    assert score.pred_norm == 0  # -3 log V / 5 chars beats -log V / 1 char
    assert (score.acc, score.acc_norm) == (0.0, 0.0)


def test_acc_and_acc_norm_on_a_constructed_example() -> None:
    score = QuestionScore.from_logliks("q", gold=1, logliks=[-10.0, -12.0], choice_chars=[5, 20])
    assert (score.pred, score.pred_norm) == (0, 1)  # -10 > -12, but -12/20 > -10/5
    assert (score.acc, score.acc_norm) == (0.0, 1.0)
    assert sum(score.choice_probs) == pytest.approx(1.0)
    assert score.choice_probs[0] == pytest.approx(1 / (1 + math.exp(-2)))


# ---- fast path == naive path ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_fast_path_equals_naive_on_history_model(batch_size: int) -> None:
    runtime, tokenizer = HistoryRuntime(), WordTokenizer()
    fast = _flat(score_items(runtime, tokenizer, MIXED_ITEMS, batch_size=batch_size, progress=False))
    naive = loglikelihood_naive(runtime, tokenizer, _requests(MIXED_ITEMS))
    np.testing.assert_allclose(fast, naive, rtol=0, atol=1e-9)


def test_fast_path_runs_each_context_once_and_batches_single_token_questions() -> None:
    runtime = HistoryRuntime()
    score_items(runtime, WordTokenizer(), MIXED_ITEMS, batch_size=8, progress=False)
    # "letters" and "short" have one-token choices: one left-padded prefill of 2 rows answers both;
    # the other three each run their context once (batch 1), then their multi-token choices as one batch
    # ("words": 1 such choice, "long": 2, "trailing": 1)
    assert [batch for batch, _ in runtime.calls] == [2, 1, 1, 1, 2, 1, 1]


def test_prefills_ask_for_the_last_position_only() -> None:
    runtime = HistoryRuntime()
    score_items(runtime, WordTokenizer(), MIXED_ITEMS, batch_size=8, progress=False)
    assert runtime.prefill_kept == [1, 1, 1, 1]  # one lettered batch + three shared contexts


def test_token_requests_report_lm_evals_is_greedy() -> None:
    """The successor model's argmax after t is t+1: " 5 6" after "3 4" is greedy, " 6 7" and " 5 7" are not."""
    tokenizer = NumberTokenizer()
    pairs = [encode_pair(tokenizer, "3 4", cont) for cont in (" 5 6", " 6 7", " 5 7", " 5")]
    scored = score_token_requests(SuccessorRuntime(), tokenizer, pairs)
    assert [greedy for _, greedy in scored] == [True, False, False, True]
    assert [loglik for loglik, _ in scored] == pytest.approx(
        score_requests(SuccessorRuntime(), tokenizer, [("3 4", cont) for cont in (" 5 6", " 6 7", " 5 7", " 5")])
    )


def test_runtime_batch_cap_is_honoured() -> None:
    runtime, tokenizer = HistoryRuntime(), WordTokenizer()
    runtime.max_batch = 1  # e.g. a TensorRT engine built with --max-batch 1
    fast = _flat(score_items(runtime, tokenizer, MIXED_ITEMS, batch_size=8, progress=False))
    assert {batch for batch, _ in runtime.calls} == {1}
    np.testing.assert_allclose(fast, loglikelihood_naive(runtime, tokenizer, _requests(MIXED_ITEMS)), atol=1e-9)


def test_questions_beyond_the_context_or_input_limit_are_skipped_with_the_reason() -> None:
    tokenizer = WordTokenizer()
    unlimited = score_items(HistoryRuntime(), tokenizer, MIXED_ITEMS, progress=False)
    runtime = HistoryRuntime()
    runtime.max_context = 20  # "long" needs 33 context tokens + 2 of its 3-token longest answer (the last is not fed)
    scores = score_items(runtime, tokenizer, MIXED_ITEMS, progress=False)
    assert scores[2] == SkippedQuestion("long", "prompt longer than the context (20 tokens)")
    assert [s for i, s in enumerate(scores) if i != 2] == [s for i, s in enumerate(unlimited) if i != 2]
    assert all(shape[1] <= 20 for shape in runtime.calls)
    runtime = HistoryRuntime()
    runtime.max_input_len = 7  # prompts of "words" (8 tokens) and "long" (33) exceed it; the others fit
    skipped = [
        s.doc_id for s in score_items(runtime, tokenizer, MIXED_ITEMS, progress=False) if isinstance(s, SkippedQuestion)
    ]
    assert skipped == ["words", "long"]
    with pytest.raises(MexportError, match="context"):
        limited = HistoryRuntime()
        limited.max_context = 4
        score_requests(limited, tokenizer, [("Q: " + "word " * 30, " y")])


def test_a_tokenizer_that_drops_bos_is_refused() -> None:
    class NoBos(WordTokenizer):
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return super().encode(text, add_special_tokens=False)

    with pytest.raises(MexportError, match="BOS") as raised:
        score_items(HistoryRuntime(), NoBos(), MIXED_ITEMS, progress=False)
    assert "add_bos_token" in raised.value.hint


def test_empty_context_is_the_prefix_token_then_the_continuation_without_specials() -> None:
    assert encode_pair(NumberTokenizer(), "", " 5 6") == ([1], [5, 6])  # lm-eval 0.4.13's loglikelihood
    assert encode_pair(NumberTokenizer(), "", "1 5") == ([1], [5])  # already starts with the prefix token


def test_score_requests_groups_shared_contexts_and_keeps_request_order() -> None:
    runtime, tokenizer = HistoryRuntime(seed=3), WordTokenizer()
    requests = _requests(MIXED_ITEMS)
    shuffled = [requests[i] for i in np.random.default_rng(0).permutation(len(requests))]
    assert score_requests(runtime, tokenizer, shuffled, batch_size=3) == pytest.approx(
        loglikelihood_naive(runtime, tokenizer, shuffled), abs=1e-9
    )


def test_letter_tasks_have_acc_equal_acc_norm_and_afrimedqa_does_not() -> None:
    runtime, tokenizer = HistoryRuntime(seed=1), WordTokenizer()
    letters = score_items(runtime, tokenizer, load_task("medmcqa", "sample").items, progress=False)
    assert all(score.pred == score.pred_norm for score in letters)
    afrimedqa = load_task("afrimedqa", "sample").items
    texts = score_items(runtime, tokenizer, afrimedqa, progress=False)
    assert texts[0].choice_chars == [len(choice) for choice in afrimedqa[0].choice_texts]
    assert any(score.pred != score.pred_norm for score in texts)


# ---- lm-eval tokenisation with the real (BPE) fixture tokenizer ------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    from mexport.validate.backends import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


def test_trailing_space_of_context_moves_to_continuation(tokenizer) -> None:
    moved = encode_pair(tokenizer, "Question: x\nAnswer: ", "A")
    plain = encode_pair(tokenizer, "Question: x\nAnswer:", " A")
    assert moved == plain
    context_ids, continuation_ids = plain
    assert context_ids[0] == tokenizer.bos_token_id  # Gemma: lm-eval forces add_bos_token=True
    assert context_ids == tokenizer.encode("Question: x\nAnswer:")
    assert continuation_ids == tokenizer.encode(" A", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(continuation_ids) == ["ĠA"]


def test_continuation_is_the_tail_of_the_whole_encoding(tokenizer) -> None:
    context, continuation = "Answer:", " Intramuscular quinine"
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    whole = tokenizer.encode(context + continuation)
    assert whole == context_ids + continuation_ids
    assert len(continuation_ids) > 1


# ---- real backends -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The 64-wide fixture is faster on one thread, and far faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample_items() -> list[MCQItem]:
    """Single-token (letters), yes/no/maybe (" maybe" is several tokens) and full-text choices."""
    return [item for task in ("medmcqa", "pubmedqa", "afrimedqa") for item in load_task(task, "sample", limit=4).items]


def _plain_pytorch_logliks(checkpoint: Path, tokenizer, requests: list[tuple[str, str]]) -> list[float]:
    """Full forward per request with transformers directly, log_softmax, gather."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    values = []
    with torch.no_grad():
        for context, continuation in requests:
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            ids = torch.tensor([context_ids + continuation_ids])
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
            values.append(float(logprobs[positions, torch.tensor(continuation_ids)].sum()))
    return values


def test_torch_scores_equal_plain_pytorch_and_naive(
    tiny_checkpoint: Path, tokenizer, sample_items: list[MCQItem], one_torch_thread: None
) -> None:
    from mexport.runtime.torch_runtime import TorchDecoder

    requests = _requests(sample_items)
    with TorchDecoder(tiny_checkpoint, dtype="fp32") as runtime:
        fast = _flat(score_items(runtime, tokenizer, sample_items, batch_size=4, progress=False))
        naive = loglikelihood_naive(runtime, tokenizer, requests)
    np.testing.assert_allclose(fast, naive, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fast, _plain_pytorch_logliks(tiny_checkpoint, tokenizer, requests), rtol=0, atol=1e-4)


def test_ort_fast_path_equals_naive_and_torch(
    tiny_export_fp32: Path, tiny_checkpoint: Path, sample_items: list[MCQItem], one_torch_thread: None
) -> None:
    from mexport.runtime.torch_runtime import TorchDecoder
    from mexport.validate.backends import open_backend

    runtime, kind, tokenizer = open_backend(tiny_export_fp32)
    assert kind == "ort"
    with runtime:
        fast = _flat(score_items(runtime, tokenizer, sample_items, batch_size=4, progress=False))
        naive = loglikelihood_naive(runtime, tokenizer, _requests(sample_items))
    np.testing.assert_allclose(fast, naive, rtol=0, atol=1e-4)
    with TorchDecoder(tiny_checkpoint, dtype="fp32") as reference:
        torch_scores = _flat(score_items(reference, tokenizer, sample_items, progress=False))
    np.testing.assert_allclose(fast, torch_scores, rtol=0, atol=1e-4)


# ---- backends ------------------------------------------------------------------------------------------------


def test_backend_kind_follows_the_manifest(tmp_path: Path, tiny_checkpoint: Path, tiny_export_fp32: Path) -> None:
    from mexport.errors import MexportError
    from mexport.lazy import is_available
    from mexport.manifest import new_manifest, write_manifest
    from mexport.validate.backends import BackendUnavailable, detect_kind, open_backend

    assert detect_kind(tiny_checkpoint) == "torch"
    assert detect_kind(tiny_export_fp32) == "ort"
    assert detect_kind("OpenMeditron/Meditron3-Gemma2-9B") == "torch"  # a hub id (not a local path)
    engine = tmp_path / "engine"
    engine.mkdir()
    write_manifest(engine, new_manifest("engine"))
    assert detect_kind(engine) == "trt"
    if not is_available("tensorrt"):
        with pytest.raises(BackendUnavailable, match="TensorRT"):
            open_backend(engine)
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        open_backend(tiny_export_fp32, device="cuda")
    with pytest.raises(MexportError, match="not a model"):
        detect_kind(tmp_path)
    with pytest.raises(MexportError, match="device 'tensorrt' is not valid for torch"):
        open_backend(tiny_checkpoint, device="tensorrt")


def test_tokenizer_fingerprint_matches_export_and_catches_a_changed_tokenizer(
    tmp_path: Path, tiny_checkpoint: Path, tiny_export_fp32: Path, tokenizer
) -> None:
    from mexport.validate.backends import load_tokenizer, tokenizer_fingerprint

    reference = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(tiny_export_fp32)) == reference
    changed = load_tokenizer(tiny_checkpoint)
    changed.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(changed) != reference


def test_prefill_batches_count_logits_rows_only_where_the_graph_computes_them() -> None:
    """A lean runtime computes one row per question, so the 1 GiB logits budget never splits a 9B batch of 8
    2000-token prompts; a full-logits graph computes every position and must be split."""
    from mexport.validate.scoring import _Group, _prefill_batches

    groups = [(index, _Group(tuple(range(2000)), ((1,), (2,)))) for index in range(8)]
    assert [len(batch) for batch in _prefill_batches(groups, 8, 256_000, lean_logits=True)] == [8]
    assert [len(batch) for batch in _prefill_batches(groups, 8, 256_000, lean_logits=False)] == [1] * 8
