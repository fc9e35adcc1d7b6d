"""mexport's runtimes inside lm-evaluation-harness: any checkpoint, export, quantized model or engine as an lm-eval LM.

lm-eval has no backend for a plain ONNX Runtime session or a TensorRT engine built from ONNX, and no plugin
discovery, so :func:`run_lm_eval` hands an :class:`MexportLM` instance to ``lm_eval.simple_evaluate`` (as vLLM's CI
does). The LM is a ``TemplateLM``: lm-eval itself splits context and continuation (its ``_encode_pair``: trailing
spaces move to the continuation, an empty context becomes the prefix token) and mexport's scorer
(:func:`mexport.validate.scoring.score_token_requests`) computes the log-likelihoods, each shared context prefilled
once. ``tok_encode`` is HFLM's (the tokenizer's own special tokens, none added to a string that already starts with
BOS), so the token ids, and therefore the log-likelihoods, are those of ``lm_eval --model hf``.

``generate_until`` decodes greedily with the runtime's KV cache (:meth:`DecoderRuntime.generate`) and cuts the text
at the first stop string; ``loglikelihood_rolling`` (perplexity tasks) is refused with a clear error.

Needs the ``lmeval`` extra: ``pip install 'mexport[lmeval]'``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mexport.errors import MexportError
from mexport.lazy import require
from mexport.manifest import MANIFEST_NAME
from mexport.runtime.base import DecoderRuntime
from mexport.validate.backends import open_backend
from mexport.validate.lmeval_tasks import task_manager
from mexport.validate.scoring import score_token_requests

DEFAULT_MAX_GEN_TOKS = 256

TemplateLM = require("lm_eval.api.model", "running lm-eval tasks").TemplateLM


class MexportLM(TemplateLM):
    """An lm-eval model backed by an activated mexport :class:`DecoderRuntime` and the model's tokenizer."""

    def __init__(self, runtime: DecoderRuntime, tokenizer: Any, batch_size: int = 8) -> None:
        super().__init__()
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """HFLM's: BOS, else EOS (what an empty context becomes)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        pairs = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        return score_token_requests(
            self.runtime, self.tokenizer, pairs, batch_size=self.batch_size, progress=not disable_tqdm
        )

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
        raise MexportError(
            "mexport's lm-eval model scores multiple-choice and generation tasks; perplexity (loglikelihood_rolling) "
            "tasks are not supported",
            hint="run perplexity tasks with lm_eval --model hf on the checkpoint",
        )

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = np.asarray([self.tok_encode(context)], dtype=np.int64)
            limit = self.runtime.limits.max_context
            if limit is not None:
                max_new = min(max_new, limit - prompt.shape[1])
                if max_new < 1:
                    raise MexportError(f"a generation prompt of {prompt.shape[1]} tokens fills the context ({limit})")
            tokens = self.runtime.generate(prompt, max_new, eos_token_id=self.eot_token_id)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def run_lm_eval(
    model_dir: Path | str,
    tasks: Sequence[str],
    *,
    include_path: Path | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str = "cpu",
    output_path: Path | None = None,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``tasks`` with the mexport runtime for ``model_dir`` (checkpoint: PyTorch;
    export / quantized dir: ONNX Runtime; engine: TensorRT). Writes lm-eval's results JSON (and per-sample logs)
    under ``output_path`` as ``lm_eval --output_path`` does; returns the results dict, per-document ``samples``
    included."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker


    manager = task_manager(include_path)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise MexportError(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}",
            hint="`lm_eval ls tasks` lists them; local task YAMLs need --include-path DIR",
        )
    runtime, kind, tokenizer = open_backend(model_dir, device=device)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    with runtime:
        results = simple_evaluate(
            model=MexportLM(runtime, tokenizer, batch_size=batch_size),
            model_args={"pretrained": str(model_dir), "backend": kind, "device": device},
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            evaluation_tracker=tracker,
        )
        runtime.check_files_unchanged()  # the scores are of the files hashed when the model was opened
    if results is None:  # only on non-zero ranks of a distributed run, which mexport never starts
        raise MexportError("lm-eval returned no results")
    # which bytes were scored (a model without an mexport manifest has no other record of them)
    files = runtime.files.sha256 if runtime.files is not None else {}
    results["mexport_model"] = {
        "path": str(model_dir),
        "backend": kind,
        "precision": getattr(runtime, "precision", None),
        "mexport_manifest": MANIFEST_NAME in files,
        "files": files,
    }
    if tracker is not None:
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        results["samples"] = samples
    return results


def results_tables(results: dict[str, Any]) -> str:
    """lm-eval's own results table (and the groups table when there are groups), as ``lm_eval`` prints them."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if "groups" in results:
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)


def serializable(results: dict[str, Any]) -> dict[str, Any]:
    """The results as plain JSON values, converted as lm-eval converts them for its results file."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))
