"""Validation orchestrator: score the reference and each candidate on the same questions, compare, report.

Backends are loaded one at a time (a 9B reference and a candidate never share memory). Scores are cached per
(backend identity: the content hash of every file it reads, task, question) in ``REPORT_DIR/.cache`` as JSON lines
appended after every batch, so an interrupted run resumes where it stopped; ``resume=False`` ignores (and rewrites)
the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport import console
from mexport.errors import MexportError
from mexport.fsutil import locks_output, replace_files_as_set
from mexport.manifest import MANIFEST_NAME, sha256_bytes, sha256_file, utc_now
from mexport.validate.backends import BackendUnavailable, detect_kind, open_backend, tokenizer_fingerprint
from mexport.validate.reports import (
    REFERENCE_LABEL,
    REPORT_FILES,
    WRITTEN_RECORD,
    BackendInfo,
    ParityResult,
    ScoringSpeed,
    TaskInfo,
    ValidationReport,
    foreign_report_files,
    is_scored,
    write_reports,
)
from mexport.validate.scoring import QuestionScore, encode_pair, score_items
from mexport.validate.shards import (
    PARTIAL_REPORT,
    PartialReport,
    QuestionRef,
    ShardSpec,
    make_partial,
    merge_partials,
    read_partial,
    unique_label,
)
from mexport.validate.stats import compare_metric, distribution_drift
from mexport.validate.tasks import check_task, load_task
from mexport.validate.verdict import (
    DEFAULT_AGREEMENT_FLOOR,
    DEFAULT_FAIL_ON,
    DEFAULT_MARGIN_POINTS,
    check_policy,
    margin_for,
    parity_verdict,
    skipped_verdict,
)

CACHE_DIR = ".cache"


@dataclass
class _Backend:
    """A backend to score: its report entry, plus the opened runtime (None when skipped)."""

    info: BackendInfo
    runtime: Any = None
    tokenizer: Any = None
    identity: str = ""


@locks_output("output")
def validate(
    reference: Path | str,
    candidates: Sequence[Path | str],
    tasks: Sequence[str] | str,
    *,
    output: Path | str,
    data: Mapping[str, str | Path] | None = None,
    limit: int | None = None,
    seed: int = 1234,
    shots: int = 0,
    device: str = "cpu",
    margin: float = DEFAULT_MARGIN_POINTS,
    recipe_margins: Mapping[str, float] | None = None,
    agreement_floor: float = DEFAULT_AGREEMENT_FLOOR,
    fail_on: str = DEFAULT_FAIL_ON,
    batch_size: int = 8,
    resume: bool = True,
    include_path: Path | str | None = None,
    overwrite: bool = False,
    devices: Sequence[str] | None = None,
) -> ValidationReport:
    """Score ``reference`` (a PyTorch checkpoint) and each candidate directory on ``tasks``; write the reports.

    Returns the report whatever the verdicts; ``report.failed`` / ``report.exit_code`` say whether the run fails
    under ``fail_on`` ("parity": any FAIL; "inconclusive": also an INCONCLUSIVE; "any": also a skipped backend;
    "never"). Raises :class:`MexportError` for bad input, including a candidate whose tokenizer differs from the
    reference's, and a report file in ``output`` that mexport did not write (unless ``overwrite``). Holds the
    output's lock for the whole run: a second run into the same report directory fails at once. ``devices`` (e.g.
    ``["cuda:0", "cuda:1"]``) scores one shard per device, each in its own process, and merges them (``device`` is
    then unused); a failed shard fails the run and nothing is merged.
    """
    arguments: dict[str, Any] = {
        "reference": reference, "candidates": candidates, "tasks": tasks, "data": data, "limit": limit,
        "seed": seed, "shots": shots, "device": device, "margin": margin, "recipe_margins": recipe_margins,
        "agreement_floor": agreement_floor, "fail_on": fail_on, "batch_size": batch_size, "resume": resume,
        "include_path": include_path, "overwrite": overwrite,
    }
    if devices:
        return _validate_on_devices(arguments, list(devices), output)
    run = _score_run(output=output, shard=None, **arguments)
    report = ValidationReport(
        created=utc_now(),
        settings=run.settings,
        backends=run.backends,
        tasks=run.tasks,
        results=parity_results(
            run.tasks, run.backends, run.scores, margin=margin, recipe_margins=run.settings["recipe_margins"],
            agreement_floor=agreement_floor,
        ),
        scores=run.scores,
        speed=run.speed,
    )
    write_reports(report, run.out_dir, drop=(PARTIAL_REPORT,))
    return report


@locks_output("output")
def validate_shard(
    reference: Path | str, candidates: Sequence[Path | str], tasks: Sequence[str] | str, *, output: Path | str,
    shard: ShardSpec | str, **options: Any,
) -> PartialReport:
    """Score shard ``shard`` ("K/N") of every task's questions (the options of :func:`validate`) and write a
    partial report (``partial.json``, no verdict) for :func:`merge_reports`."""
    spec = shard if isinstance(shard, ShardSpec) else ShardSpec.parse(shard)
    run = _score_run(reference=reference, candidates=candidates, tasks=tasks, output=output, shard=spec, **options)
    partial = make_partial(spec, run.settings, run.backends, run.tasks, run.questions, run.scores, run.speed)
    replace_files_as_set(run.out_dir, {PARTIAL_REPORT: partial.render()}, drop=(*REPORT_FILES, WRITTEN_RECORD))
    return partial


@locks_output("output")
def merge_reports(
    parts: Sequence[PartialReport | Path | str],
    *,
    output: Path | str,
    fail_on: str | None = None,
    overwrite: bool = False,
) -> ValidationReport:
    """Merge the partial reports of shard runs into the report set of one run (:mod:`mexport.validate.shards`):
    every statistic recomputed over the union; ``fail_on`` overrides the parts' policy. Holds the output's lock."""
    return _merge_into(parts, Path(output), fail_on, overwrite)


def _merge_into(
    parts: Sequence[PartialReport | Path | str], output: Path, fail_on: str | None, overwrite: bool
) -> ValidationReport:
    merged = merge_partials([part if isinstance(part, PartialReport) else read_partial(part) for part in parts])
    settings = {**merged.settings, "merged_from": merged.parts}
    if fail_on is not None:
        check_policy(settings["margin_points"], settings["agreement_floor"], fail_on, settings["recipe_margins"])
        settings["fail_on"] = fail_on
    out_dir = _check_output(output, overwrite)
    for part in merged.parts:
        if Path(part["source"]).parent == out_dir:
            raise MexportError(
                f"-o {output}: holds a partial report being merged ({part['source']})",
                hint="write the merged report to a directory of its own",
            )
    report = ValidationReport(
        created=utc_now(),
        settings=settings,
        backends=merged.backends,
        tasks=merged.tasks,
        results=parity_results(
            merged.tasks, merged.backends, merged.scores, margin=settings["margin_points"],
            recipe_margins=settings["recipe_margins"], agreement_floor=settings["agreement_floor"],
            reference_for=merged.reference_for,
        ),
        scores=merged.scores,
        speed=merged.speed,
    )
    write_reports(report, out_dir, drop=(PARTIAL_REPORT,))
    return report


@dataclass
class _ScoredRun:
    """What a run (or one shard of it) scored, before any statistic."""

    out_dir: Path
    settings: dict[str, Any]
    backends: list[BackendInfo]
    tasks: list[TaskInfo]  # provenance of the whole tasks
    questions: dict[str, list[QuestionRef]]  # the questions scored (a shard's share), in question order
    scores: dict[str, dict[str, list[Any]]]
    speed: dict[str, ScoringSpeed]


def _score_run(
    reference: Path | str,
    candidates: Sequence[Path | str],
    tasks: Sequence[str] | str,
    *,
    output: Path | str,
    shard: ShardSpec | None,
    data: Mapping[str, str | Path] | None = None,
    limit: int | None = None,
    seed: int = 1234,
    shots: int = 0,
    device: str = "cpu",
    margin: float = DEFAULT_MARGIN_POINTS,
    recipe_margins: Mapping[str, float] | None = None,
    agreement_floor: float = DEFAULT_AGREEMENT_FLOOR,
    fail_on: str = DEFAULT_FAIL_ON,
    batch_size: int = 8,
    resume: bool = True,
    include_path: Path | str | None = None,
    overwrite: bool = False,
) -> _ScoredRun:
    """Check the inputs, load the tasks, score the reference and every candidate on ``shard``'s questions (all
    without a shard)."""
    recipe_margins = dict(recipe_margins or {})
    check_policy(margin, agreement_floor, fail_on, recipe_margins)
    task_names = _check_tasks(tasks, data or {}, include_path)
    if not candidates:
        raise MexportError("no candidate to validate", hint="pass --candidate DIR (an export, quantize or engine dir)")
    if batch_size < 1:
        raise MexportError(f"batch size must be >= 1, got {batch_size}")
    out_dir = _check_output(Path(output), overwrite)

    task_data = {
        name: load_task(name, (data or {}).get(name), limit=limit, seed=seed, shots=shots, include_path=include_path)
        for name in task_names
    }
    task_infos, questions, task_data = _shard_questions(task_data, shard)

    backends = _open_backends(Path(reference), [Path(c) for c in candidates], device)
    (out_dir / CACHE_DIR).mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, list[Any]]] = {name: {} for name in task_names}
    speed: dict[str, ScoringSpeed] = {}
    for backend in backends:
        if backend.runtime is not None:
            _score_or_skip(backend, task_data, out_dir / CACHE_DIR, batch_size, resume, scores, speed)
        if backend.info.role == "reference":
            _check_reference_scored(scores)
    settings = {
        "tasks": task_names,
        "data": {name: str(path) for name, path in sorted((data or {}).items())},
        "limit": limit,
        "seed": seed,
        "shots": shots,
        "device": device,
        "margin_points": margin,
        "recipe_margins": dict(sorted(recipe_margins.items())),
        "agreement_floor": agreement_floor,
        "fail_on": fail_on,
        "batch_size": batch_size,
        "include_path": str(include_path) if include_path else None,
        **({"shard": str(shard)} if shard is not None else {}),
    }
    return _ScoredRun(
        out_dir, settings, [backend.info for backend in backends], task_infos, questions, scores, speed
    )


def _shard_questions(
    task_data: dict[str, Any], shard: ShardSpec | None
) -> tuple[list[TaskInfo], dict[str, list[QuestionRef]], dict[str, Any]]:
    """Each loaded task's info (of the whole task), the questions ``shard`` holds (all without a shard) with their
    positions in the whole task, and the tasks cut down to those questions; a task with no usable question is
    refused."""
    for name, loaded in task_data.items():
        if not loaded.items:
            raise MexportError(f"{name}: no usable questions in {loaded.source} ({loaded.skipped} rows skipped)")
    task_infos = [_task_info(loaded) for loaded in task_data.values()]
    questions = {
        name: [
            QuestionRef(position, item_key(item), item.doc_id)
            for position, item in enumerate(loaded.items)
            if shard is None or shard.holds(name, item.doc_id)
        ]
        for name, loaded in task_data.items()
    }
    if shard is not None:
        task_data = {
            name: dataclasses.replace(loaded, items=[loaded.items[ref.position] for ref in questions[name]])
            for name, loaded in task_data.items()
        }
    return task_infos, questions, task_data


def _shard_worker(arguments: dict[str, Any], quiet: bool, verbose: bool) -> tuple[int, str, str | None] | None:
    """One shard in its own process: None when it scored, else (exit code, message, hint) of its failure."""
    console.configure(quiet=quiet, verbose=verbose)
    try:
        validate_shard(**{**arguments, "device": _claim_device(arguments["device"])})
    except MexportError as exc:
        return (exc.exit_code, exc.message, exc.hint)
    return None


def _claim_device(device: str) -> str:
    """In a shard's own process, ``cuda:N`` becomes ``cuda`` with only GPU N visible, so PyTorch, ONNX Runtime and
    TensorRT all run on it (N counts among the GPUs the parent could see)."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index:
        return device
    visible = [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
    return "cuda"


def check_devices(devices: Sequence[str]) -> list[str]:
    """Device names for one shard each (cpu, cuda, cuda:N), stripped; bad input when one is not a device."""
    names = [device.strip() for device in devices]
    for name in names:
        kind, colon, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (colon and (kind != "cuda" or not index.isdigit())):
            raise MexportError(f"--devices: {name!r} is not a device", hint="cpu, cuda or cuda:N, e.g. cuda:0,cuda:1")
    visible = [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    for name in names:
        if name.startswith("cuda:") and visible and int(name[5:]) >= len(visible):
            raise MexportError(f"--devices: {name} but CUDA_VISIBLE_DEVICES shows {len(visible)} GPU(s)")
    return names


def _validate_on_devices(arguments: dict[str, Any], devices: list[str], output: Path | str) -> ValidationReport:
    """One shard per device, each in a process of its own (spawned: CUDA does not survive a fork), then the merge.
    Shard K's partial report and score cache live in ``OUTPUT/.cache/shards/K-of-N`` (a rerun resumes them);
    only shard 1 shows progress bars."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    devices = check_devices(devices)
    out_dir = _check_output(Path(output), arguments["overwrite"])
    count = len(devices)
    shard_dirs = [out_dir / CACHE_DIR / "shards" / f"{k}-of-{count}" for k in range(1, count + 1)]
    quiet = console.is_quiet()
    with ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _shard_worker,
                {**arguments, "device": device, "output": shard_dir, "shard": ShardSpec(k, count)},
                quiet or k > 1,
                console.is_verbose(),
            )
            for k, (device, shard_dir) in enumerate(zip(devices, shard_dirs, strict=True), start=1)
        ]
        outcomes = [future.result() for future in futures]
    for k, (device, outcome) in enumerate(zip(devices, outcomes, strict=True), start=1):
        if outcome is not None:
            code, message, hint = outcome
            error = MexportError(f"shard {k}/{count} on {device}: {message}", hint=hint)
            error.exit_code = code
            raise error
    return _merge_into(shard_dirs, out_dir, arguments["fail_on"], arguments["overwrite"])


# ---------------------------------------------------------------------------------------------------- inputs


def _check_tasks(
    tasks: Sequence[str] | str, data: Mapping[str, Any], include_path: Path | str | None = None
) -> list[str]:
    """Known task names in the order given ("a,b" or a list; duplicates dropped); ``data`` names only these."""
    requested = tasks.split(",") if isinstance(tasks, str) else tasks
    names = list(dict.fromkeys(name.strip() for name in requested if name.strip()))
    if not names:
        raise MexportError("no task to validate on", hint="pass --tasks medmcqa,pubmedqa (comma-separated)")
    for name in names:
        check_task(name, include_path)
    for name in data:
        if name not in names:
            raise MexportError(f"--data {name}=...: {name} is not among the requested tasks ({', '.join(names)})")
    return names


def _check_output(out_dir: Path, overwrite: bool) -> Path:
    """A new or empty directory, or one holding an earlier report of ours; never someone else's files: without
    ``overwrite`` a report file mexport did not write (or that was edited since) is refused. Other files in the
    directory are kept either way."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MexportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not overwrite:
        entries = {entry.name for entry in out_dir.iterdir()}
        foreign = foreign_report_files(out_dir)
        if foreign or (entries and not entries & {*REPORT_FILES, WRITTEN_RECORD, CACHE_DIR, PARTIAL_REPORT}):
            what = f"holds {', '.join(foreign)} not written by mexport (or edited since)" if foreign else (
                "holds files that are not an mexport report"
            )
            raise MexportError(
                f"{out_dir}: directory {what}",
                hint="pass --overwrite to write the report there anyway (other files are kept), "
                "or choose a new or empty report directory",
            )
    return out_dir.resolve()


def _open_backends(reference: Path, candidates: list[Path], device: str) -> list[_Backend]:
    """Open (not load) every backend, hashing the files each will read, and refuse what cannot give a meaningful
    verdict before anything is scored: a tokenizer mismatch, a candidate its own stage marked failed, the reference
    itself given as a candidate."""
    runtime, kind, tokenizer = open_backend(reference, kind="torch", device=device)
    backends = [_Backend(_backend_info(REFERENCE_LABEL, "reference", reference, kind, runtime), runtime, tokenizer)]
    reference_fingerprint = tokenizer_fingerprint(tokenizer)
    reference_digest = runtime.files.digest if runtime.files is not None else None
    used_labels = {REFERENCE_LABEL}
    for path in candidates:
        label = unique_label(path.resolve().name, used_labels)
        _refuse_failed_artifact(path)
        try:
            runtime, kind, tokenizer = open_backend(path, device=device)
        except BackendUnavailable as exc:
            info = _backend_info(label, "candidate", path, detect_kind(path), None, skip_reason=exc.message)
            backends.append(_Backend(info))
            continue
        if runtime.files is not None and runtime.files.digest == reference_digest:
            raise MexportError(
                f"candidate {path} is the reference {reference} (the same files, byte for byte): "
                "comparing it with itself would pass vacuously",
                hint="pass the exported, quantized or engine directory as --candidate",
            )
        if tokenizer_fingerprint(tokenizer) != reference_fingerprint:
            raise MexportError(
                f"candidate {path} has a different tokenizer than reference {reference}: "
                "their scores would not be comparable",
                hint="export the candidate from the same checkpoint (its tokenizer files must match)",
            )
        backends.append(_Backend(_backend_info(label, "candidate", path, kind, runtime), runtime, tokenizer))
    for backend in backends:
        if backend.runtime is not None:
            backend.identity = _backend_identity(backend.runtime, backend.info.kind, device)
    return backends


def _refuse_failed_artifact(path: Path) -> None:
    """A candidate whose own stage (or a stage it was made from) recorded a failed check is not validated."""
    manifest: Any = _read_manifest_if_any(path)
    while isinstance(manifest, Mapping):
        if manifest.get("status") == "failed":
            raise MexportError(
                f"candidate {path}: its {manifest.get('kind', 'artifact')} manifest records status failed "
                "(its own numeric check failed), so a parity verdict on it would be about a rejected artifact",
                hint="re-create it until its check passes; to look at its scores anyway, run mexport lm-eval on it",
            )
        manifest = manifest.get("parent")


def _local_dir(path: Path, runtime: Any) -> Path:
    """The directory holding the model: ``path`` itself, or where a hub id was downloaded to."""
    return path if path.exists() else Path(getattr(runtime, "checkpoint", path))


def _read_manifest_if_any(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_NAME
    try:
        return json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _backend_info(
    label: str, role: str, path: Path, kind: str, runtime: Any, skip_reason: str | None = None
) -> BackendInfo:
    """The facts a report reader needs: recipe, dtype, how compute ran and which files were scored, from the
    manifest and runtime."""
    path = _local_dir(path, runtime)
    manifest = _read_manifest_if_any(path)
    recipe = manifest.get("recipe")
    if isinstance(recipe, Mapping):
        recipe = recipe.get("name")
    manifest_path = path / MANIFEST_NAME
    if manifest.get("kind"):
        origin = f"mexport {manifest['kind']}"
    else:
        origin = "Hugging Face checkpoint" if kind == "torch" else "ONNX graph from another tool, no mexport manifest"
    files = getattr(runtime, "files", None)
    return BackendInfo(
        label=label,
        role=role,
        path=str(path.resolve()),
        kind=kind,
        recipe=str(recipe) if recipe else None,
        dtype=manifest.get("dtype") or getattr(runtime, "dtype", None),
        precision=getattr(runtime, "precision", None),
        compute=getattr(runtime, "session_settings", None),
        manifest_sha256=sha256_file(manifest_path) if manifest_path.is_file() else None,
        skip_reason=skip_reason,
        origin=origin,
        files=dict(files.sha256) if files is not None else {},
    )


def _backend_identity(runtime: Any, kind: str, device: str) -> str:
    """Cache key of a backend: its kind, device, how it computes, and the content of every file it reads (hashed
    when it was opened; activating it refuses files changed since), so new weights never reuse old scores."""
    files = runtime.files or runtime.verify_files()
    facts = [kind, device, getattr(runtime, "precision", None), files.digest]
    return sha256_bytes(json.dumps(facts).encode())[:20]


# ---------------------------------------------------------------------------------------------------- scoring


def item_key(item: Any) -> str:
    """Content hash of a question as scored (id, full prompt incl. few-shot prefix, choices, gold)."""
    payload = json.dumps([item.doc_id, item.context, list(item.choices), item.gold], ensure_ascii=False)
    return sha256_bytes(payload.encode())[:24]


class ScoreCache:
    """Append-only JSON-lines cache of one backend's scores on one task, keyed by question content."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self._score_type = QuestionScore
        self.entries: dict[str, Any] = self._load() if resume else {}
        if not resume:
            path.write_text("")

    def _load(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        if not self.path.is_file():
            return entries
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                entries[record["key"]] = self._score_type(**record["score"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interruption: that question is simply scored again
        return entries

    def append(self, keys: Sequence[str], scores: Sequence[Any]) -> None:
        lines = [
            json.dumps({"key": key, "score": dataclasses.asdict(score)}, ensure_ascii=False) + "\n"
            for key, score in zip(keys, scores, strict=True)
        ]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
        self.entries.update(zip(keys, scores))


def _score_or_skip(backend: _Backend, *args: Any) -> None:
    """Score a backend; a candidate whose runtime turns out unavailable when loaded is reported skipped."""
    try:
        _score_backend(backend, *args)
    except BackendUnavailable as exc:
        if backend.info.role == "reference":
            raise
        backend.info = dataclasses.replace(backend.info, skip_reason=exc.message)


def _score_backend(
    backend: _Backend,
    task_data: Mapping[str, Any],
    cache_dir: Path,
    batch_size: int,
    resume: bool,
    scores: dict[str, dict[str, list[Any]]],
    speed: dict[str, ScoringSpeed],
) -> None:
    """Score every task's questions on one backend, loading it only when something is not cached yet; record how
    fast the scoring calls ran in ``speed`` (nothing when every question was cached)."""
    caches = {name: ScoreCache(cache_dir / f"{backend.identity}-{name}.jsonl", resume) for name in task_data}
    # questions the scorer declined (e.g. longer than the runtime's context): never cached, cheap to decide again
    declined: dict[str, dict[str, Any]] = {name: {} for name in task_data}
    pending = {
        name: [item for item in loaded.items if item_key(item) not in caches[name].entries]
        for name, loaded in task_data.items()
    }
    if any(pending.values()):
        measured = ScoringSpeed(0.0, 0, 0)
        with backend.runtime, console.progress() as bar:
            for name, items in pending.items():
                loaded_items = task_data[name].items
                label = f"{backend.info.label} · {name}"
                task_bar = bar.add_task(label, total=len(loaded_items), completed=len(loaded_items) - len(items))
                seconds = _score_in_batches(
                    backend, items, caches[name], declined[name], batch_size, functools.partial(bar.advance, task_bar)
                )
                scored = [item for item in items if item_key(item) not in declined[name]]
                tokens = sum(_question_tokens(backend.tokenizer, item) for item in scored)
                measured = ScoringSpeed(
                    measured.seconds + seconds, measured.questions + len(scored), measured.tokens + tokens
                )
        speed[backend.info.label] = measured
    for name, loaded in task_data.items():
        entries = {**caches[name].entries, **declined[name]}
        scores[name][backend.info.label] = [entries[item_key(item)] for item in loaded.items]


def _score_in_batches(
    backend: _Backend,
    items: list[Any],
    cache: ScoreCache,
    declined: dict[str, Any],
    batch_size: int,
    advance: Callable[[int], None],
) -> float:
    """Score ``items`` batch by batch, caching the scores and putting the declined questions (entries without
    log-likelihoods, see :func:`mexport.validate.reports.is_scored`) in ``declined``; returns the seconds spent
    inside the scoring calls."""
    seconds = 0.0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        started = time.perf_counter()
        batch_scores = score_items(backend.runtime, backend.tokenizer, batch, batch_size=batch_size, progress=False)
        seconds += time.perf_counter() - started
        backend.runtime.check_files_unchanged()  # scores of files changed while being read are never kept
        keys = [item_key(item) for item in batch]
        kept = [(key, entry) for key, entry in zip(keys, batch_scores, strict=True) if is_scored(entry)]
        cache.append([key for key, _ in kept], [entry for _, entry in kept])
        declined.update((key, entry) for key, entry in zip(keys, batch_scores) if not is_scored(entry))
        advance(len(batch))
    return seconds


def _check_reference_scored(scores: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """Refuse a task none of whose questions the reference could score (e.g. every prompt longer than its context):
    there is nothing to compare any candidate with, so no verdict can be given."""
    for task, by_backend in scores.items():
        entries = by_backend[REFERENCE_LABEL]
        if entries and not any(is_scored(entry) for entry in entries):
            reasons = Counter(str(entry.reason) for entry in entries)
            shown = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
            raise MexportError(
                f"{task}: the reference scored none of its {len(entries)} questions ({shown})",
                hint="use shorter prompts (fewer --shots) or a model with a longer context",
            )


def _question_tokens(tokenizer: Any, item: Any) -> int:
    """Tokens a question costs a scorer that reads its prompt once: prompt tokens + every choice's continuation."""
    pairs = [encode_pair(tokenizer, item.context, choice) for choice in item.choices]
    return len(pairs[0][0]) + sum(len(continuation) for _, continuation in pairs)


# ---------------------------------------------------------------------------------------------------- results


def _items_sha256(items: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item_key(item).encode())
    return digest.hexdigest()


def _task_info(loaded: Any) -> TaskInfo:
    """Provenance of a task; acc_norm is reported when some question's choices differ in length (else == acc)."""
    lengths_differ = any(len({len(choice) for choice in item.choice_texts}) > 1 for item in loaded.items)
    return TaskInfo(
        name=loaded.task,
        source=loaded.source,
        source_sha256=loaded.source_sha256,
        items_sha256=_items_sha256(loaded.items),
        n_items=len(loaded.items),
        total_rows=loaded.total_rows,
        skipped=dict(loaded.skip_reasons),
        metrics=("acc", "acc_norm") if lengths_differ else ("acc",),
        rules=loaded.rules,
    )


def parity_results(
    tasks: Sequence[TaskInfo],
    backends: Sequence[BackendInfo],
    scores: Mapping[str, Mapping[str, list[Any]]],
    *,
    margin: float,
    recipe_margins: Mapping[str, float],
    agreement_floor: float,
    reference_for: Mapping[str, str] | None = None,
) -> list[ParityResult]:
    """Every task × candidate comparison from the per-question records: the one computation behind a run and a
    merge of shards. ``reference_for`` maps a candidate to the reference scores it is paired with (default: the
    reference)."""
    return [
        _parity_result(
            task,
            info,
            scores[task.name].get((reference_for or {}).get(info.label, REFERENCE_LABEL), []),
            scores[task.name].get(info.label, []),
            margin,
            recipe_margins,
            agreement_floor,
        )
        for task in tasks
        for info in backends
        if info.role == "candidate"
    ]


def _parity_result(
    task: TaskInfo,
    info: BackendInfo,
    reference_scores: list[Any],
    candidate_scores: list[Any],
    margin: float,
    recipe_margins: Mapping[str, float],
    agreement_floor: float,
) -> ParityResult:
    margin_points = margin_for(info.recipe, margin, recipe_margins)
    if info.skip_reason is not None:
        return ParityResult(task.name, info.label, margin_points, agreement_floor, skipped_verdict(info.skip_reason))
    pairs = list(zip(reference_scores, candidate_scores, strict=True))
    # only questions both sides scored, with finite reference log-likelihoods, are compared; the others are counted
    # by reason (a NaN reference has no answer to compare with; a NaN candidate is compared, and fails the verdict)
    declined = Counter(reason for ref, cand in pairs if (reason := _not_compared_reason(ref, cand)))
    compared = [(ref, cand) for ref, cand in pairs if not _not_compared_reason(ref, cand)]
    reference = [ref for ref, _ in compared]
    candidate = [cand for _, cand in compared]
    pred_field = {"acc": "pred", "acc_norm": "pred_norm"}
    metrics = tuple(
        compare_metric(
            metric,
            [int(getattr(s, metric)) for s in reference],
            [int(getattr(s, metric)) for s in candidate],
            [getattr(s, pred_field[metric]) for s in reference],
            [getattr(s, pred_field[metric]) for s in candidate],
        )
        for metric in task.metrics
    )
    finite = [(ref, cand) for ref, cand in compared if _finite(cand)]
    non_finite = len(compared) - len(finite)
    # drift over the questions where it is a number; None when there is none (no NaN ever reaches a report)
    mean_kl, max_abs = (
        distribution_drift([r.logliks for r, _ in finite], [c.logliks for _, c in finite]) if finite else (None, None)
    )
    verdict = parity_verdict(metrics, margin_points, agreement_floor, non_finite)
    return ParityResult(
        task.name, info.label, margin_points, agreement_floor, verdict, metrics, mean_kl, max_abs, dict(declined)
    )


def _finite(score: Any) -> bool:
    return all(math.isfinite(value) for value in score.logliks)


def _not_compared_reason(reference: Any, candidate: Any) -> str | None:
    """Why a question pair is left out of the comparison (a side declined it, or the reference's log-likelihoods
    are NaN/inf), or None when it is compared."""
    for entry in (candidate, reference):
        if not is_scored(entry):
            return str(entry.reason)
    return None if _finite(reference) else "reference log-likelihood NaN/inf"
