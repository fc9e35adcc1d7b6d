"""Sharded validation: score one slice of every task's questions, then merge the slices into one paired verdict.

A question belongs to shard ``k`` of ``n`` when ``sha256(task NUL doc_id) mod n == k - 1``: a stable hash, not the
file order, so adding a candidate, another GPU or reordering nothing moves a question to another shard. A shard
run writes a *partial report* (``partial.json``): its shard, the settings, every backend with its identity (the
manifest's sha256, or a content hash of a checkpoint), each task's provenance for the *whole* task, and every
per-question record (log-likelihoods, or why it was not scored) with the question's position in the whole task.
It states no verdict. :func:`merge_partials` checks that the parts belong together (same reference, settings and
questions; per set of candidates every shard exactly once), puts the records back in question order and computes
every statistic with the same function a single run uses (:func:`mexport.validate.runner.parity_results`), so N
merged shards give exactly the unsharded numbers. Parts from different target GPUs (same reference and questions,
other candidates) merge into one report with a row per candidate; each candidate is paired with the reference
scores of its own run (one reference row when those runs scored the reference identically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mexport.errors import MexportError
from mexport.manifest import file_records, sha256_bytes, utc_now
from mexport.strict_json import non_finite_text
from mexport.validate.reports import REFERENCE_LABEL, BackendInfo, ScoringSpeed, TaskInfo, is_scored
from mexport.validate.scoring import QuestionScore, SkippedQuestion

PARTIAL_REPORT = "partial.json"
PARTIAL_KIND = "mexport-partial-report"
PARTIAL_SCHEMA = 1
# settings every part of one merge must share (device and batch size may differ between hosts)
MERGED_SETTINGS = ("tasks", "limit", "seed", "shots", "margin_points", "recipe_margins", "agreement_floor", "fail_on")
_SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class ShardSpec:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"K/N"`` with 1 <= K <= N (a Kubernetes ``JOB_COMPLETION_INDEX`` is 0-based: pass ``$((i + 1))/N``)."""
        match = _SHARD_PATTERN.match(str(text))
        if not match:
            raise MexportError(f"--shard {text!r}: expected K/N, e.g. 2/4", hint="K counts from 1 to N")
        index, count = int(match.group(1)), int(match.group(2))
        if not 1 <= index <= count:
            raise MexportError(
                f"--shard {text}: K must be between 1 and N={count}",
                hint="for a 0-based job index (JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID from 0) pass $((i + 1))/N",
            )
        return cls(index, count)

    def holds(self, task: str, doc_id: str) -> bool:
        return shard_of(task, doc_id, self.count) == self.index


def shard_of(task: str, doc_id: str, count: int) -> int:
    """The 1-based shard of question ``doc_id`` of ``task`` among ``count`` shards (stable across runs and hosts)."""
    digest = hashlib.sha256(f"{task}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def backend_fingerprint(info: BackendInfo) -> str:
    """What a backend *is*, for telling parts apart: its manifest's sha256, else a hash of every file's sha256."""
    if info.manifest_sha256:
        return info.manifest_sha256
    path = Path(info.path)
    if not path.is_dir():
        return sha256_bytes(str(path).encode())
    return sha256_bytes(json.dumps(file_records(path), sort_keys=True).encode())


@dataclass(frozen=True)
class QuestionRef:
    """Where a question of a shard sits in its whole task: position in question order, content key and id."""

    position: int
    key: str
    doc_id: str


@dataclass
class PartialReport:
    """One shard's scores: everything a merge needs, no verdict."""

    shard: ShardSpec
    settings: dict[str, Any]
    backends: list[BackendInfo]
    fingerprints: dict[str, str]  # backend label -> backend_fingerprint
    tasks: list[TaskInfo]  # provenance of each whole task (all shards)
    questions: dict[str, list[QuestionRef]]  # task -> this shard's questions, in question order
    scores: dict[str, dict[str, list[Any]]]  # task -> label -> entries aligned with ``questions``
    speed: dict[str, ScoringSpeed] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    run: dict[str, Any] = field(default_factory=lambda: _run_facts())
    source: str = ""  # where this part was read from (not written)

    exit_code = 0

    @property
    def candidates(self) -> list[BackendInfo]:
        return [b for b in self.backends if b.role == "candidate"]

    def summary(self) -> dict[str, Any]:
        """The CLI's --json for a shard run: what was scored, and no verdict."""
        return {
            "partial": True,
            "shard": str(self.shard),
            "questions": {task: len(refs) for task, refs in self.questions.items()},
            "backends": {b.label: b.skip_reason or "scored" for b in self.backends},
            "speed": {label: speed.to_dict() for label, speed in self.speed.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PARTIAL_KIND,
            "schema": PARTIAL_SCHEMA,
            "created": self.created,
            "shard": {"index": self.shard.index, "count": self.shard.count},
            "run": self.run,
            "settings": self.settings,
            "backends": [{**asdict(b), "fingerprint": self.fingerprints[b.label]} for b in self.backends],
            "speed": {label: dataclasses.astuple(speed) for label, speed in self.speed.items()},
            "tasks": {
                task.name: {
                    **asdict(task),
                    "questions": [
                        {
                            "position": ref.position,
                            "key": ref.key,
                            "doc_id": ref.doc_id,
                            "backends": {
                                label: _entry_dict(entries[i]) for label, entries in self.scores[task.name].items()
                            },
                        }
                        for i, ref in enumerate(self.questions[task.name])
                    ],
                }
                for task in self.tasks
            },
        }

    def render(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def _run_facts() -> dict[str, Any]:
    """Which process on which host scored a shard (and the GPUs it could see), for the merged report's provenance."""
    facts: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        facts["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return facts


def _entry_dict(entry: Any) -> dict[str, Any]:
    if not is_scored(entry):
        return {"skipped": entry.reason}
    return {
        "gold": entry.gold,
        "logliks": [non_finite_text(v) or v for v in entry.logliks],  # strict JSON: "nan", "inf", "-inf"
        "choice_chars": list(entry.choice_chars),
        "pred": entry.pred,
        "pred_norm": entry.pred_norm,
    }


def _entry_from(doc_id: str, record: Mapping[str, Any]) -> Any:
    if "skipped" in record:
        return SkippedQuestion(doc_id, str(record["skipped"]))
    return QuestionScore(
        doc_id=doc_id,
        gold=int(record["gold"]),
        logliks=[float(v) for v in record["logliks"]],
        choice_chars=[int(c) for c in record["choice_chars"]],
        pred=int(record["pred"]),
        pred_norm=int(record["pred_norm"]),
    )


def make_partial(
    shard: ShardSpec,
    settings: dict[str, Any],
    backends: Sequence[BackendInfo],
    tasks: Sequence[TaskInfo],
    questions: Mapping[str, list[QuestionRef]],
    scores: dict[str, dict[str, list[Any]]],
    speed: dict[str, ScoringSpeed],
) -> PartialReport:
    return PartialReport(
        shard=shard,
        settings=settings,
        backends=list(backends),
        fingerprints={b.label: backend_fingerprint(b) for b in backends},
        tasks=list(tasks),
        questions=dict(questions),
        scores=scores,
        speed=speed,
    )


def read_partial(path: Path | str) -> PartialReport:
    """A partial report from ``partial.json`` or the directory holding it; bad input (exit 2) when it is not one."""
    path = Path(path).expanduser()
    file = path / PARTIAL_REPORT if path.is_dir() else path
    if not file.is_file():
        hint = "a shard run (validate --shard K/N) writes partial.json into its -o directory"
        if (path / "report.json").is_file():
            hint = "that is a full report; merge the partial reports of shard runs"
        raise MexportError(f"{path}: no partial report ({PARTIAL_REPORT}) found", hint=hint)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        if document.get("kind") != PARTIAL_KIND or document.get("schema") != PARTIAL_SCHEMA:
            raise ValueError(f"not an {PARTIAL_KIND} of schema {PARTIAL_SCHEMA}")
        return _partial_from(document, str(file))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MexportError(f"{file}: not a readable partial report ({exc})") from None


def _partial_from(document: Mapping[str, Any], source: str) -> PartialReport:
    backend_fields = {f.name for f in dataclasses.fields(BackendInfo)}
    backends = [BackendInfo(**{k: v for k, v in b.items() if k in backend_fields}) for b in document["backends"]]
    fingerprints = {b["label"]: str(b["fingerprint"]) for b in document["backends"]}
    task_fields = {f.name for f in dataclasses.fields(TaskInfo)}
    tasks, questions, scores = [], {}, {}
    for name, task in document["tasks"].items():
        info = {k: v for k, v in task.items() if k in task_fields}
        tasks.append(TaskInfo(**{**info, "metrics": tuple(info["metrics"])}))
        refs = [QuestionRef(int(q["position"]), str(q["key"]), str(q["doc_id"])) for q in task["questions"]]
        questions[name] = refs
        scores[name] = {
            b.label: [_entry_from(q["doc_id"], q["backends"][b.label]) for q in task["questions"]]
            for b in backends
            if b.skip_reason is None
        }
    shard = document["shard"]
    return PartialReport(
        shard=ShardSpec(int(shard["index"]), int(shard["count"])),
        settings=dict(document["settings"]),
        backends=backends,
        fingerprints=fingerprints,
        tasks=tasks,
        questions=questions,
        scores=scores,
        speed={label: ScoringSpeed(*values) for label, values in document.get("speed", {}).items()},
        created=str(document.get("created", "")),
        run=dict(document.get("run", {})),
        source=source,
    )


# ---------------------------------------------------------------------------------------------------- merging


@dataclass
class MergedScores:
    """The union of the parts, in question order, ready for the statistics."""

    settings: dict[str, Any]
    backends: list[BackendInfo]
    tasks: list[TaskInfo]
    scores: dict[str, dict[str, list[Any]]]
    speed: dict[str, ScoringSpeed]
    reference_for: dict[str, str]  # candidate label -> label of the reference scores it is paired with
    parts: list[dict[str, Any]]


def _comparable_task(task: TaskInfo) -> dict[str, Any]:
    """A task as parts must agree on it: everything but the data path (it differs between checkouts and hosts)."""
    return {k: v for k, v in asdict(task).items() if k != "source"}


def _candidate_set(part: PartialReport) -> tuple[str, ...]:
    return tuple(part.fingerprints[b.label] for b in part.candidates)


def _describe(part: PartialReport) -> str:
    names = ", ".join(f"{b.label} ({part.fingerprints[b.label][:12]})" for b in part.candidates)
    return f"shard {part.shard} of [{names}]"


def check_parts(parts: Sequence[PartialReport]) -> list[list[PartialReport]]:
    """Refuse (exit 2, naming the difference) parts that do not make one merge; return them grouped by their set
    of candidates, each group complete and in shard order."""
    if not parts:
        raise MexportError("no partial report to merge", hint="pass the partial.json of every shard")
    first = parts[0]
    ref_label = REFERENCE_LABEL
    for part in parts[1:]:
        if part.fingerprints[ref_label] != first.fingerprints[ref_label]:
            raise MexportError(
                f"{part.source} scored another reference than {first.source} "
                f"({part.fingerprints[ref_label][:12]} vs {first.fingerprints[ref_label][:12]})",
                hint="merge only shards validated against the same reference checkpoint",
            )
        for key in MERGED_SETTINGS:
            if part.settings.get(key) != first.settings.get(key):
                raise MexportError(
                    f"{part.source} was run with {key}={part.settings.get(key)!r}, "
                    f"{first.source} with {key}={first.settings.get(key)!r}",
                    hint="run every shard with the same tasks, limit, seed, shots, margins and fail-on",
                )
        mine = {t.name: _comparable_task(t) for t in part.tasks}
        theirs = {t.name: _comparable_task(t) for t in first.tasks}
        for name, task in theirs.items():
            difference = next((k for k, v in task.items() if mine.get(name, {}).get(k) != v), None)
            if difference is not None:
                raise MexportError(
                    f"{part.source} and {first.source} scored different questions of {name} ({difference} differs)",
                    hint="every shard must read the same data file (same content) with the same settings",
                )
    groups: dict[tuple[str, ...], list[PartialReport]] = {}
    for part in parts:
        groups.setdefault(_candidate_set(part), []).append(part)
    for group in groups.values():
        counts = {part.shard.count for part in group}
        if len(counts) > 1:
            raise MexportError(
                f"{_describe(group[0])}: parts split the questions {sorted(counts)} ways",
                hint="every shard of one run must use the same N in --shard K/N",
            )
        count = counts.pop()
        seen: dict[int, PartialReport] = {}
        for part in group:
            if part.shard.index in seen:
                raise MexportError(
                    f"shard {part.shard} given twice: {seen[part.shard.index].source} and {part.source}",
                    hint="pass each shard's partial report once",
                )
            seen[part.shard.index] = part
        missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in seen]
        if missing:
            others = [_describe(g[0]) for key, g in groups.items() if g is not group]
            extra = f"; other parts score other candidates: {'; '.join(others)}" if others else ""
            raise MexportError(
                f"incomplete shard set for {_describe(group[0])}: missing {', '.join(missing)}{extra}",
                hint="every shard 1..N of each set of candidates is needed (a candidate is told apart by its "
                "manifest's sha256)",
            )
        group.sort(key=lambda part: part.shard)
    return list(groups.values())


def _merge_group(group: Sequence[PartialReport]) -> tuple[dict[str, dict[str, list[Any]]], dict[str, ScoringSpeed]]:
    """One set of candidates' shards as whole tasks in question order; speed summed over the shards."""
    tasks = {t.name: t for t in group[0].tasks}
    scores: dict[str, dict[str, list[Any]]] = {}
    for name, task in tasks.items():
        by_position: dict[int, tuple[QuestionRef, PartialReport, int]] = {}
        for part in group:
            for i, ref in enumerate(part.questions[name]):
                if ref.position in by_position:
                    raise MexportError(
                        f"{name}: question {ref.doc_id} is in {by_position[ref.position][1].source} and {part.source}",
                        hint="the parts overlap: were they run with different --shard N?",
                    )
                if shard_of(name, ref.doc_id, part.shard.count) != part.shard.index:
                    raise MexportError(f"{part.source}: question {ref.doc_id} of {name} is not in shard {part.shard}")
                by_position[ref.position] = (ref, part, i)
        if sorted(by_position) != list(range(task.n_items)):
            raise MexportError(
                f"{name}: the parts hold {len(by_position)} of its {task.n_items} questions",
                hint="a part is missing questions (or comes from a run on other data)",
            )
        digest = hashlib.sha256()
        for position in range(task.n_items):
            digest.update(by_position[position][0].key.encode())
        if digest.hexdigest() != task.items_sha256:
            raise MexportError(f"{name}: the parts' questions do not add up to the task's questions (sha256 differs)")
        ordered = [by_position[position] for position in range(task.n_items)]
        scored = [b.label for b in group[0].backends if all(b.label in part.scores[name] for part in group)]
        scores[name] = {label: [part.scores[name][label][i] for _, part, i in ordered] for label in scored}
    speed: dict[str, ScoringSpeed] = {}
    for part in group:
        for label, measured in part.speed.items():
            total = speed.get(label, ScoringSpeed(0.0, 0, 0))
            speed[label] = ScoringSpeed(
                total.seconds + measured.seconds, total.questions + measured.questions, total.tokens + measured.tokens
            )
    return scores, speed


def _records_equal(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return [_entry_dict(x) for x in a] == [_entry_dict(x) for x in b]


def merge_partials(parts: Sequence[PartialReport]) -> MergedScores:
    """Check the parts (:func:`check_parts`) and join them: one reference, a row per candidate of every group."""
    groups = check_parts(parts)
    first = groups[0][0]
    backends: list[BackendInfo] = [first.backends[0]]
    used = {REFERENCE_LABEL}
    scores: dict[str, dict[str, list[Any]]] = {t.name: {} for t in first.tasks}
    speed: dict[str, ScoringSpeed] = {}
    reference_for: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        group_scores, group_speed = _merge_group(group)
        reference_label = REFERENCE_LABEL
        if number > 1 and not all(
            _records_equal(group_scores[t][REFERENCE_LABEL], scores[t][REFERENCE_LABEL]) for t in scores
        ):
            reference_label = unique_label(f"{REFERENCE_LABEL}-{number}", used)
            backends.append(dataclasses.replace(group[0].backends[0], label=reference_label))
        if number == 1 or reference_label != REFERENCE_LABEL:
            for task, task_scores in scores.items():
                task_scores[reference_label] = group_scores[task][REFERENCE_LABEL]
            if REFERENCE_LABEL in group_speed:
                speed[reference_label] = group_speed[REFERENCE_LABEL]
        for info in group[0].candidates:
            label = unique_label(info.label, used)
            skipped = next((f"shard {p.shard}: {b.skip_reason}" for p in group for b in p.candidates
                            if b.label == info.label and b.skip_reason), None)
            backends.append(dataclasses.replace(info, label=label, skip_reason=skipped))
            reference_for[label] = reference_label
            for task, task_scores in scores.items():
                if skipped is None:
                    task_scores[label] = group_scores[task][info.label]
            if info.label in group_speed:
                speed[label] = group_speed[info.label]
    settings = {k: v for k, v in first.settings.items() if k != "shard"}
    part_list = [
        {"source": part.source, "shard": str(part.shard), "run": part.run, "device": part.settings.get("device")}
        for group in groups
        for part in group
    ]
    return MergedScores(settings, backends, list(first.tasks), scores, speed, reference_for, part_list)


def unique_label(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... when taken; the result is added to ``used``."""
    label, counter = name, 2
    while label in used:
        label, counter = f"{name}-{counter}", counter + 1
    used.add(label)
    return label
