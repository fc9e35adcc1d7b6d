"""Log-likelihood multiple-choice scoring, numerically the same as lm-evaluation-harness's HFLM, for any runtime.

Tokenisation is lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation,
``whole = encode(context + continuation)``, ``context_enc = encode(context)``, and the continuation tokens are
``whole[len(context_enc):]``; the model reads ``context_enc + continuation_enc``. Special tokens: lm-eval 0.4.13
encodes with the tokenizer's own default (``add_special_tokens=True``; for Gemma it forces ``add_bos_token=True``),
so a tokenizer that prepends a BOS (Gemma's ``<bos>``, Llama-3's ``<|begin_of_text|>``) puts it before the context
(and, identically, before ``whole``) and one without (Qwen2) adds nothing; that is what we do. Where the model's
family scores with a BOS (``DecoderSpec.scores_with_bos``) a prompt without it is refused. loglik(choice) = sum over continuation tokens of
log_softmax(logits) at the previous position, taken here in float64 from the runtime's float32 logits.
acc = argmax loglik == gold; acc_norm divides by the choice's length in characters (without the delimiter);
ties go to the first index (numpy argmax), as in lm-eval.

Speed: all choices of a question share the context, so it runs once. When every continuation is one token
(lettered tasks, yes/no/maybe), the prefill's last-position logits already give every choice's log-likelihood,
and several questions are prefilled together (left-padded, longest first, as many as ``batch_size`` and a bound
on the logits bytes allow). Otherwise the context is prefilled alone, its KV cache repeated once per multi-token
choice (:meth:`DecoderRuntime.repeat_past`), and the remaining continuation tokens run as one right-padded batch.
Batches never exceed ``batch_size`` nor the runtime's ``limits.max_batch`` (a TensorRT profile's limit). Prefills ask
the runtime for the last position's logits only (``logits_to_keep=1``): on a 32000-token vocabulary the LM head and
softcap over every prompt position were most of a lettered question's time (cProfile, wide fixture). A question
whose prompt and longest answer do not fit the runtime's context (``limits.max_context``) or whose prompt exceeds a
per-call input limit (``max_input_len``, TensorRT) is not scored: :class:`SkippedQuestion` says why.
:func:`loglikelihood_naive` (one full forward per choice, no cache) is the reference the fast path is tested and
benchmarked against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mexport import console
from mexport.errors import MexportError
from mexport.numerics import log_softmax
from mexport.runtime.base import DecoderRuntime, RuntimeLimits
from mexport.validate.items import MCQItem

# float32 logits of one batched prefill are rows x length x vocab x 4 bytes; 9B Gemma2's vocab is 256000
LOGITS_BUDGET_BYTES = 1 << 30


@dataclass
class QuestionScore:
    """Per-question result: each choice's log-likelihood and the acc / acc_norm predictions."""

    doc_id: str
    gold: int
    logliks: list[float]
    choice_chars: list[int]
    pred: int
    pred_norm: int

    @classmethod
    def from_logliks(
        cls, doc_id: str, gold: int, logliks: Sequence[float], choice_chars: Sequence[int]
    ) -> QuestionScore:
        values = np.asarray(logliks, dtype=np.float64)
        chars = np.asarray(choice_chars, dtype=np.float64)
        return cls(
            doc_id=doc_id,
            gold=gold,
            logliks=[float(v) for v in values],
            choice_chars=[int(c) for c in choice_chars],
            pred=int(np.argmax(values)),
            pred_norm=int(np.argmax(values / chars)),
        )

    @property
    def acc(self) -> float:
        return 1.0 if self.pred == self.gold else 0.0

    @property
    def acc_norm(self) -> float:
        return 1.0 if self.pred_norm == self.gold else 0.0

    @property
    def choice_probs(self) -> list[float]:
        """The model's distribution over the choices (softmax of the log-likelihoods), for drift measures."""
        values = np.asarray(self.logliks, dtype=np.float64)
        weights = np.exp(values - values.max())
        return [float(p) for p in weights / weights.sum()]


@dataclass
class SkippedQuestion:
    """A question the runtime cannot score (its prompt does not fit); reports count these by ``reason``."""

    doc_id: str
    reason: str


# ---- tokenisation (lm-eval's HFLM) --------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=True))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval 0.4.13's HFLM builds them."""
    if context == "":
        # lm-eval: the continuation alone, without special tokens, after the prefix token (BOS, else EOS) unless
        # the continuation already starts with it
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        continuation_ids = list(tokenizer.encode(continuation, add_special_tokens=False))
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@dataclass(frozen=True)
class _Group:
    """One shared context and the continuations scored after it."""

    context_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def single_token(self) -> bool:
        return all(len(tokens) == 1 for tokens in self.continuations)

    @property
    def tokens_needed(self) -> int:
        """Context plus the longest continuation but its last token (which is only predicted, never fed)."""
        return len(self.context_ids) + max((len(tokens) for tokens in self.continuations), default=1) - 1


def _check_bos(runtime: DecoderRuntime, tokenizer, context_ids: Sequence[int]) -> None:
    """A family scored with its BOS (Gemma, Llama-3) scores far worse without it; a tokenizer saved with
    ``add_bos_token`` false silently drops it. Families without one (Qwen2) are scored as encoded."""
    if not runtime.spec.scores_with_bos:
        return
    bos = tokenizer.bos_token_id
    if bos is None or not context_ids or context_ids[0] != bos:
        raise MexportError(
            f"the tokenizer does not start prompts with its BOS token (bos_token_id {bos}, prompt starts with "
            f"{list(context_ids[:3])}); this model family must be scored with it, as lm-eval does",
            hint="re-save the tokenizer with add_bos_token=True (its tokenizer_config.json / post-processor)",
        )


def _encode_group(runtime: DecoderRuntime, tokenizer, context: str, continuations: Sequence[str]) -> _Group:
    pairs = [encode_pair(tokenizer, context, continuation) for continuation in continuations]
    # the context's tokens never depend on the continuation (the trailing-space move is continuation-independent)
    _check_bos(runtime, tokenizer, pairs[0][0])
    return _Group(tuple(pairs[0][0]), tuple(tuple(cont) for _, cont in pairs))


# a continuation's log-likelihood and whether every one of its tokens is the argmax (lm-eval's is_greedy)
Scored = tuple[float, bool]


def _skip_reason(group: _Group, limits: RuntimeLimits) -> str | None:
    """Why ``group`` cannot run on a runtime with ``limits`` (None: it fits)."""
    if limits.max_context is not None and group.tokens_needed > limits.max_context:
        return f"prompt longer than the context ({limits.max_context} tokens)"
    if limits.max_input_len is not None and len(group.context_ids) > limits.max_input_len:  # a TensorRT engine's
        return f"prompt longer than the input limit ({limits.max_input_len} tokens)"
    return None


# ---- numerics ---------------------------------------------------------------------------------------------------


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def _prefill_batches(
    groups: list[tuple[int, _Group]], batch_size: int, vocab_size: int, lean_logits: bool
) -> list[list[tuple[int, _Group]]]:
    """Split groups (sorted longest first, so each batch holds similar lengths) into batches bounded by
    ``batch_size`` and the logits budget: one row per question, or every position for a runtime without lean logits
    (it computes them all before keeping the last)."""
    batches: list[list[tuple[int, _Group]]] = []
    current: list[tuple[int, _Group]] = []
    for entry in groups:
        longest = len(current[0][1].context_ids) if current else len(entry[1].context_ids)
        positions = 1 if lean_logits else longest
        over_budget = (len(current) + 1) * positions * vocab_size * 4 > LOGITS_BUDGET_BYTES
        if current and (len(current) >= batch_size or over_budget):
            batches.append(current)
            current = []
        current.append(entry)
    if current:
        batches.append(current)
    return batches


def _score_single_token_batch(
    runtime: DecoderRuntime, batch: list[tuple[int, _Group]], pad_id: int
) -> list[list[Scored]]:
    """Left-padded prefill of several contexts; each choice is one token predicted by the last position."""
    longest = max(len(group.context_ids) for _, group in batch)
    input_ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, (_, group) in enumerate(batch):
        input_ids[row, longest - len(group.context_ids) :] = group.context_ids
        mask[row, longest - len(group.context_ids) :] = 1
    logits, _ = runtime.forward(input_ids, mask, None, logits_to_keep=1)
    logprobs = log_softmax(logits[:, -1, :])
    best = logprobs.argmax(axis=-1)
    return [
        [(float(logprobs[row, tokens[0]]), bool(best[row] == tokens[0])) for tokens in group.continuations]
        for row, (_, group) in enumerate(batch)
    ]


def _score_shared_context(runtime: DecoderRuntime, group: _Group, pad_id: int, max_rows: int) -> list[Scored]:
    """Prefill the context once, then run the multi-token continuations on repeated copies of its KV cache.

    Continuations run ``max_rows`` at a time (a TensorRT engine's profile caps the batch).
    """
    context = np.asarray([group.context_ids], dtype=np.int64)
    logits, past = runtime.forward(context, np.ones_like(context), None, logits_to_keep=1)
    first = log_softmax(logits[0, -1, :])
    best = int(first.argmax())
    scores = [(float(first[tokens[0]]), best == tokens[0]) if tokens else (0.0, True) for tokens in group.continuations]
    longer = [index for index, tokens in enumerate(group.continuations) if len(tokens) > 1]
    for start in range(0, len(longer), max_rows):
        chunk = longer[start : start + max_rows]
        # continuation token j (j >= 1) is predicted by the logits at the position of token j-1
        steps = max(len(group.continuations[index]) for index in chunk) - 1
        input_ids = np.full((len(chunk), steps), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), context.shape[1] + steps), dtype=np.int64)
        mask[:, : context.shape[1]] = 1
        for row, index in enumerate(chunk):
            fed = group.continuations[index][:-1]
            input_ids[row, : len(fed)] = fed
            mask[row, context.shape[1] : context.shape[1] + len(fed)] = 1
        step_logits, _ = runtime.forward(input_ids, mask, runtime.repeat_past(past, len(chunk)))
        for row, index in enumerate(chunk):
            targets = group.continuations[index][1:]
            logprobs = log_softmax(step_logits[row, : len(targets), :])
            loglik, greedy = scores[index]
            scores[index] = (
                loglik + float(logprobs[np.arange(len(targets)), targets].sum()),
                greedy and bool((logprobs.argmax(axis=-1) == targets).all()),
            )
    return scores


@contextlib.contextmanager
def _progress(enabled: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """An ``advance(n)`` callback: a progress bar, or nothing at all (not even a blank line) when disabled."""
    if not enabled:
        yield lambda _: None
        return
    with console.progress() as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _score_groups(
    runtime: DecoderRuntime, groups: Sequence[_Group], pad_id: int, batch_size: int, progress: bool, label: str
) -> list[list[Scored] | str]:
    """(log-likelihood, is_greedy) of every continuation of every group, in input order; a skip reason for groups
    that do not fit the runtime."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limits = runtime.limits
    # a runtime may cap its batch (a TensorRT engine's optimisation profile); None means no cap
    batch_size = min(batch_size, limits.max_batch or batch_size)
    results: list[list[Scored] | str] = [_skip_reason(group, limits) or [] for group in groups]
    runnable = [(index, group) for index, group in enumerate(groups) if results[index] == []]
    single = sorted(
        ((index, group) for index, group in runnable if group.single_token),
        key=lambda entry: -len(entry[1].context_ids),
    )
    multi = [(index, group) for index, group in runnable if not group.single_token]
    with _progress(progress, label, len(groups)) as advance:
        advance(len(groups) - len(runnable))
        for batch in _prefill_batches(single, batch_size, runtime.spec.vocab_size, runtime.lean_logits):
            for (index, _), scores in zip(batch, _score_single_token_batch(runtime, batch, pad_id), strict=True):
                results[index] = scores
            advance(len(batch))
        for index, group in multi:
            results[index] = _score_shared_context(runtime, group, pad_id, batch_size)
            advance(1)
    return results


# ---- public API ---------------------------------------------------------------------------------------------------


def score_token_requests(
    runtime: DecoderRuntime,
    tokenizer,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Scored]:
    """lm-eval's ``_loglikelihood_tokens``: (log-likelihood, is_greedy) per (context ids, continuation ids), each
    distinct context run once.

    Raises MexportError when a context does not fit the runtime (lm-eval has no way to skip a request).
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for position, (context_ids, _) in enumerate(requests):
        by_context.setdefault(tuple(context_ids), []).append(position)
    groups = []
    for context_ids, positions in by_context.items():
        _check_bos(runtime, tokenizer, context_ids)
        groups.append(_Group(context_ids, tuple(tuple(requests[p][1]) for p in positions)))
    scores = _score_groups(runtime, groups, _pad_id(tokenizer), batch_size, progress, "scoring")
    flat: list[Scored] = [(0.0, True)] * len(requests)
    for positions, group_scores in zip(by_context.values(), scores, strict=True):
        if isinstance(group_scores, str):
            raise MexportError(f"cannot score a request on {runtime.name}: {group_scores}")
        for position, score in zip(positions, group_scores, strict=True):
            flat[position] = score
    return flat


def score_requests(
    runtime: DecoderRuntime,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[float]:
    """lm-eval's ``loglikelihood`` on (context, continuation) strings: one log-likelihood each."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    scored = score_token_requests(runtime, tokenizer, pairs, batch_size=batch_size, progress=progress)
    return [loglik for loglik, _ in scored]


def score_items(
    runtime: DecoderRuntime,
    tokenizer,
    items: Sequence[MCQItem],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[QuestionScore | SkippedQuestion]:
    """Score MCQ items on ``runtime`` (any backend): per-choice log-likelihoods, acc and acc_norm predictions; a
    :class:`SkippedQuestion` for each question that does not fit the runtime's limits."""
    groups = [_encode_group(runtime, tokenizer, item.context, item.choices) for item in items]
    label = f"scoring {items[0].task} on {runtime.name}" if items else "scoring"
    scores = _score_groups(runtime, groups, _pad_id(tokenizer), batch_size, progress, label)
    return [
        SkippedQuestion(item.doc_id, scored)
        if isinstance(scored, str)
        else QuestionScore.from_logliks(
            item.doc_id, item.gold, [loglik for loglik, _ in scored], [len(text) for text in item.choice_texts]
        )
        for item, scored in zip(items, scores, strict=True)
    ]


def loglikelihood_naive(runtime: DecoderRuntime, tokenizer, requests: Sequence[tuple[str, str]]) -> list[float]:
    """Reference path: one full forward of context + continuation per request, no cache, no batching."""
    scores = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            scores.append(0.0)
            continue
        sequence = np.asarray([(context_ids + continuation_ids)[:-1]], dtype=np.int64)
        logits, _ = runtime.forward(sequence, np.ones_like(sequence), None)
        predicting = logits[0, len(context_ids) - 1 :, :]
        logprobs = log_softmax(predicting)
        scores.append(float(logprobs[np.arange(len(continuation_ids)), continuation_ids].sum()))
    return scores
