"""The validation report and its renderings for CI: report.json, report.md, junit.xml, accuracy.png, parity.png.

Every file is a pure function of the report, and the report of the inputs: the same run gives the same bytes
except for ``created`` and the measured scoring speed (``speed`` in report.json, the speed table in report.md).
Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mexport import strict_json
from mexport.errors import EXIT_INCONCLUSIVE, VERDICT_WORDS, verdict_word
from mexport.fsutil import replace_files_as_set
from mexport.junit import JUnitCase, junit_xml
from mexport.manifest import sha256_file
from mexport.strict_json import non_finite_text
from mexport.validate.stats import CONFIDENCE, MetricComparison, resolvable_difference, wilson_interval
from mexport.validate.verdict import (
    DEFAULT_FAIL_ON,
    FAIL,
    INCONCLUSIVE,
    PASS,
    SKIPPED,
    Verdict,
    points,
    run_exit_code,
    run_fails,
)

REPORT_FILES = ("report.json", "report.md", "junit.xml", "accuracy.png", "parity.png")
# written with every report set: each report file's sha256, so a later run replaces only files mexport wrote
WRITTEN_RECORD = ".mexport-report.json"
REFERENCE_LABEL = "reference"
METHODS = {
    "accuracy_ci": f"Wilson score interval, {CONFIDENCE:.0%}",
    "delta_ci": f"Tango's asymptotic score interval for the difference of paired proportions, {CONFIDENCE:.0%} "
    "(Tango 1998, Statistics in Medicine 17:891-908): inverts the score test with the restricted ML variance; "
    "valid with zero or few flipped questions (±z²/(n+z²) when none flips)",
    "resolvable_difference": "half-width of the paired CI when no question flips, z²/(n+z²): the smallest "
    "difference (and margin) these questions can resolve",
    "mcnemar": "exact two-sided binomial test of b (right->wrong) vs b+c at 0.5; 1.0 when b+c = 0",
    "kl": "mean over questions of KL(ref || cand) between softmax distributions over the choices' log-likelihoods",
    "verdict": "PASS when every metric's paired delta CI lies within ±margin points and its answer agreement >= floor; "
    "FAIL when a CI lies entirely outside ±margin, agreement < floor or a log-likelihood is not finite; "
    "INCONCLUSIVE when a CI crosses ±margin",
    "speed": "wall time of the scoring calls of this run (model loading and cached questions excluded); tokens = "
    "prompt tokens + every choice's continuation tokens",
}


@dataclass(frozen=True)
class ScoringSpeed:
    """How fast one backend scored the questions it scored in this run (cached questions are not counted)."""

    seconds: float
    questions: int
    tokens: int

    @property
    def questions_per_second(self) -> float:
        return self.questions / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "seconds": round(self.seconds, 3),
            "questions": self.questions,
            "tokens": self.tokens,
            "questions_per_second": round(self.questions_per_second, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
        }


@dataclass(frozen=True)
class BackendInfo:
    """One scored (or skipped) model, with the manifest facts a reader needs to interpret its numbers."""

    label: str
    role: str  # "reference" | "candidate"
    path: str
    kind: str  # "torch" | "ort" | "trt"
    recipe: str | None = None
    dtype: str | None = None
    precision: str | None = None  # e.g. "bf16 weights, fp32 compute (CPU emulation, ORT_ENABLE_ALL)"
    # how the runtime computes: ONNX Runtime's providers, optimisation level and session config, compute dtype
    compute: dict[str, Any] | None = None
    manifest_sha256: str | None = None
    skip_reason: str | None = None
    origin: str | None = None  # "mexport quantize", "Hugging Face checkpoint", an ONNX graph without a manifest
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 of every file scored, hashed at load


@dataclass(frozen=True)
class TaskInfo:
    """Where a task's questions came from and what was dropped on the way."""

    name: str
    source: str
    source_sha256: str | None  # of the data file; None for the hub
    items_sha256: str  # of the scored questions (prompts, choices, gold): what the numbers are about
    n_items: int
    total_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("acc",)
    rules: str = ""  # the task's scoring rules (e.g. AfriMedQA as its authors score it)


def is_scored(entry: Any) -> bool:
    """A per-question entry is a score (``QuestionScore``) or a question the scorer declined with a ``reason``
    (``scoring.SkippedQuestion``, e.g. a prompt longer than the runtime's context): only scores have logliks."""
    return hasattr(entry, "logliks")


@dataclass(frozen=True)
class ParityResult:
    """One candidate on one task against the reference."""

    task: str
    candidate: str
    margin_points: float
    agreement_floor: float
    verdict: Verdict
    metrics: tuple[MetricComparison, ...] = ()
    mean_kl: float | None = None
    max_abs_loglik_delta: float | None = None
    # reason -> questions left out of the comparison because this candidate or the reference declined them
    skipped_questions: dict[str, int] = field(default_factory=dict)


@dataclass
class ValidationReport:
    created: str
    settings: dict[str, Any]
    backends: list[BackendInfo]
    tasks: list[TaskInfo]
    results: list[ParityResult]
    # task -> backend label -> per-question scores (QuestionScore), in the task's question order
    scores: dict[str, dict[str, list[Any]]]
    # backend label -> scoring speed in this run (absent when every question came from the cache)
    speed: dict[str, ScoringSpeed] = field(default_factory=dict)

    @property
    def fail_on(self) -> str:
        return str(self.settings.get("fail_on", DEFAULT_FAIL_ON))

    @property
    def compared(self) -> bool:
        """Whether any candidate was compared with the reference on at least one question (else nothing is shown)."""
        return any(metric.n > 0 for result in self.results for metric in result.metrics)

    @property
    def failed(self) -> bool:
        """Whether this run should fail CI under its ``fail_on`` policy."""
        return run_fails((r.verdict.status for r in self.results), self.fail_on, self.compared)

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this run: 1 failed parity, 4 only inconclusive under ``fail_on`` or nothing
        compared, else 0."""
        return run_exit_code((r.verdict.status for r in self.results), self.fail_on, self.compared)

    @property
    def outcome(self) -> str:
        """One word for the run: PASSED, FAILED or INCONCLUSIVE (under its ``fail_on`` policy; a run that compared
        nothing is never PASSED)."""
        if not self.compared:
            return VERDICT_WORDS[EXIT_INCONCLUSIVE]
        return verdict_word(self.exit_code)

    @property
    def outcome_note(self) -> str | None:
        """Why the outcome is what it is when no verdict says so: nothing was compared."""
        return None if self.compared else "no candidate was compared with the reference on any question"

    def backend(self, label: str) -> BackendInfo:
        return next(b for b in self.backends if b.label == label)

    def summary(self) -> dict[str, Any]:
        """The short machine-readable result (the CLI's --json): verdicts and headline numbers."""
        rows = []
        for result in self.results:
            row: dict[str, Any] = {
                "task": result.task,
                "candidate": result.candidate,
                "verdict": result.verdict.status,
                "reasons": list(result.verdict.reasons),
                "skipped_questions": dict(sorted(result.skipped_questions.items())),
            }
            if result.metrics:
                acc = result.metrics[0]
                row.update(
                    reference_acc=acc.reference_acc,
                    candidate_acc=acc.candidate_acc,
                    delta=acc.delta,
                    delta_ci=list(acc.delta_ci),
                    resolvable_difference=resolvable_difference(acc.n),
                    agreement=acc.agreement,
                    mean_kl=result.mean_kl,
                )
            rows.append(row)
        return {
            "failed": self.failed,
            "outcome": self.outcome.lower(),
            "outcome_note": self.outcome_note,
            "fail_on": self.fail_on,
            "results": rows,
            "speed": {label: speed.to_dict() for label, speed in self.speed.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "created": self.created,
            "settings": self.settings,
            "methods": METHODS,
            "failed": self.failed,
            "outcome": self.outcome.lower(),
            "outcome_note": self.outcome_note,
            "backends": [asdict(b) for b in self.backends],
            "speed": {label: speed.to_dict() for label, speed in self.speed.items()},
            "tasks": {t.name: _task_dict(t, self.scores.get(t.name, {})) for t in self.tasks},
            "results": [_result_dict(r) for r in self.results],
        }


def _task_dict(task: TaskInfo, scores: dict[str, list[Any]]) -> dict[str, Any]:
    """Dataset provenance plus every question with every backend's log-likelihoods."""
    labels = list(scores)
    questions = []
    for entries in zip(*(scores[label] for label in labels)):
        scored = [entry for entry in entries if is_scored(entry)]
        question: dict[str, Any] = {"doc_id": entries[0].doc_id}
        if scored:
            question.update(gold=scored[0].gold, choice_chars=list(scored[0].choice_chars))
        question["backends"] = {
            label: {
                "logliks": list(entry.logliks),  # a NaN/inf one is written null, its value in non_finite_logliks
                **_non_finite_logliks(entry.logliks),
                "pred": entry.pred,
                "pred_norm": entry.pred_norm,
                "acc": entry.acc,
                "acc_norm": entry.acc_norm,
            }
            if is_scored(entry)
            else {"skipped": entry.reason}
            for label, entry in zip(labels, entries, strict=True)
        }
        questions.append(question)
    return {
        "source": task.source,
        "source_sha256": task.source_sha256,
        "items_sha256": task.items_sha256,
        "n_items": task.n_items,
        "total_rows": task.total_rows,
        "skipped": dict(sorted(task.skipped.items())),
        "metrics": list(task.metrics),
        "rules": task.rules,
        "resolvable_difference_points": points(resolvable_difference(task.n_items)),
        "questions": questions,
    }


def _non_finite_logliks(logliks: Sequence[float]) -> dict[str, dict[str, str]]:
    """{"non_finite_logliks": {choice index: "nan" | "inf" | "-inf"}} when a log-likelihood is not finite, else {}."""
    shown = {str(index): text for index, value in enumerate(logliks) if (text := non_finite_text(value))}
    return {"non_finite_logliks": shown} if shown else {}


def _result_dict(result: ParityResult) -> dict[str, Any]:
    return {
        "task": result.task,
        "candidate": result.candidate,
        "verdict": result.verdict.status,
        "reasons": list(result.verdict.reasons),
        "margin_points": result.margin_points,
        "agreement_floor": result.agreement_floor,
        "mean_kl": result.mean_kl,
        "max_abs_loglik_delta": result.max_abs_loglik_delta,
        "skipped_questions": dict(sorted(result.skipped_questions.items())),
        "metrics": {m.metric: asdict(m) for m in result.metrics},
    }


# ---------------------------------------------------------------------------------------------------- writers


def write_reports(report: ValidationReport, out_dir: Path, drop: Iterable[str] = ()) -> dict[str, Path]:
    """Write every report file (``REPORT_FILES``) and their record (``WRITTEN_RECORD``) into ``out_dir``, replacing
    an earlier report as one set (and removing the files named in ``drop``); returns report file name -> path."""
    rendered = {
        "report.json": render_json(report).encode(),
        "report.md": render_markdown(report).encode(),
        "junit.xml": render_junit(report),
        "accuracy.png": render_accuracy_png(report),
        "parity.png": render_parity_png(report),
    }
    record = {name: hashlib.sha256(data).hexdigest() for name, data in rendered.items()}
    written = strict_json.dumps(record, indent=2, sort_keys=True) + "\n"
    paths = replace_files_as_set(Path(out_dir), {**rendered, WRITTEN_RECORD: written.encode()}, drop)
    return {name: paths[name] for name in rendered}


def foreign_report_files(out_dir: Path) -> list[str]:
    """The report-named files in ``out_dir`` that mexport did not write, or that changed since it wrote them (their
    sha256 differs from ``WRITTEN_RECORD``'s): the user's own, never replaced without ``--overwrite``."""
    try:
        record = json.loads((out_dir / WRITTEN_RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    return [
        name
        for name in REPORT_FILES
        if (out_dir / name).exists()
        and not ((out_dir / name).is_file() and record.get(name) == sha256_file(out_dir / name))
    ]


def render_json(report: ValidationReport) -> str:
    return strict_json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"


def _pct(fraction: float) -> str:
    return f"{points(fraction):.1f}"


def _interval(ci: Sequence[float], signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(points(ci[0]))}, {fmt.format(points(ci[1]))}]"


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell: a ``|`` would end the cell, a newline the row."""
    return " ".join(str(text).split("\n")).replace("|", "\\|")


_VERDICT_MARK = {PASS: "✅ PASS", FAIL: "❌ FAIL", INCONCLUSIVE: "❔ INCONCLUSIVE", SKIPPED: "⏭️ SKIPPED"}


def _unmanifested_lines(report: ValidationReport) -> list[str]:
    """Candidates without an mexport manifest, with the hash of every file scored (they have no other record)."""
    lines = [
        f"- `{b.label}`: {b.origin}; files scored: "
        + ", ".join(f"{name} `{sha256[:16]}`" for name, sha256 in sorted(b.files.items()))
        for b in report.backends
        if b.role == "candidate" and b.manifest_sha256 is None and b.files
    ]
    return [*lines, ""] if lines else []


def render_markdown(report: ValidationReport) -> str:
    """A summary for humans and $GITHUB_STEP_SUMMARY: one table per task and metric, then skipped backends."""
    settings = report.settings
    recipe_margins = "".join(
        f", {recipe} ±{points_:g}" for recipe, points_ in settings.get("recipe_margins", {}).items()
    )
    lines = [
        "# mexport parity report",
        "",
        (
            f"**Result: {report.outcome}** (fail-on `{report.fail_on}`; margin ±{settings.get('margin_points', 0):g} pts{recipe_margins}, "
            f"agreement floor {settings.get('agreement_floor', 0):.2f}, {settings.get('shots', 0)}-shot)"
        ),
        "",
        "| backend | kind | recipe | dtype | precision | path |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {_cell(b.label)} | {b.kind} | {_cell(b.recipe or '–')} | {_cell(b.dtype or '–')} "
            f"| {_cell(b.precision or '–')} | `{_cell(b.path)}` |"
            for b in report.backends
        ),
        "",
        *_unmanifested_lines(report),
        *_speed_lines(report),
    ]
    for task in report.tasks:
        lines += [f"## {task.name}", "", _task_provenance(task, float(settings.get("margin_points", 0))), ""]
        results = [r for r in report.results if r.task == task.name]
        for metric_name in task.metrics:
            lines += _metric_table(report, task, metric_name, results)
        notes = [f"- skipped `{r.candidate}`: {r.verdict.message}" for r in results if r.verdict.status == SKIPPED]
        notes += [f"- `{r.candidate}`: {_declined_text(r)} not compared" for r in results if r.skipped_questions]
        lines += [*notes, ""] if notes else []
    lines += [
        "## Method",
        "",
        *(f"- {name}: {text}" for name, text in METHODS.items()),
        "",
    ]
    return "\n".join(lines)


def _declined_text(result: ParityResult) -> str:
    """ "3 questions (2 prompt 700 tokens > context 512, 1 ...)": the questions a result leaves out, by reason."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(result.skipped_questions.items()))
    return f"{sum(result.skipped_questions.values())} question(s) ({reasons})"


def _speed_lines(report: ValidationReport) -> list[str]:
    """The scoring-speed table (wall time of this run's scoring calls per backend)."""
    if not report.speed:
        return []
    return [
        "**Scoring speed** (wall time of this run's scoring calls; model loading and cached questions excluded)",
        "",
        "| backend | scoring time (s) | questions | questions/s | tokens/s |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {_cell(label)} | {speed.seconds:.1f} | {speed.questions} | {speed.questions_per_second:.1f} "
            f"| {speed.tokens_per_second:.0f} |"
            for label, speed in report.speed.items()
        ),
        "",
    ]


def _task_provenance(task: TaskInfo, margin_points: float) -> str:
    """Where the questions came from, and the smallest difference this many questions can resolve."""
    dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(task.skipped.items())) or "none"
    resolvable = points(resolvable_difference(task.n_items))
    resolution = f"Resolvable difference: ±{resolvable:.2f} pts (the paired CI when no question flips)"
    if resolvable > margin_points:
        resolution += f", wider than the ±{margin_points:g} margin: at that margin the verdict can only be inconclusive"
    return (
        f"{task.n_items} questions from `{task.source}` (questions sha256 `{task.items_sha256[:12]}`); "
        f"rows dropped: {dropped}. {resolution}." + (f" Rules: {task.rules}." if task.rules else "")
    )


def _metric_table(report: ValidationReport, task: TaskInfo, metric_name: str, results: list[ParityResult]) -> list[str]:
    lines = [
        f"**{metric_name}**",
        "",
        f"| backend | {metric_name} [95% CI] | Δ vs ref [paired CI] | flips b/c | McNemar p | agreement | KL | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reference = accuracy_of(report, task.name, REFERENCE_LABEL, metric_name)
    if reference is not None:
        lines.append(f"| {REFERENCE_LABEL} | {_pct(reference[0])} {_interval(reference[1])} | – | – | – | – | – | – |")
    for result in results:
        metric = next((m for m in result.metrics if m.metric == metric_name), None)
        if metric is None:
            continue
        reasons = f" ({_cell(result.verdict.message)})" if result.verdict.reasons else ""
        lines.append(
            f"| {_cell(result.candidate)} | {_pct(metric.candidate_acc)} {_interval(metric.candidate_ci)} "
            f"| {points(metric.delta):+.1f} {_interval(metric.delta_ci, signed=True)} "
            f"| {metric.right_to_wrong}/{metric.wrong_to_right} | {metric.mcnemar_p:.3g} | {metric.agreement:.3f} "
            f"| {'–' if result.mean_kl is None else f'{result.mean_kl:.2e}'} | {_VERDICT_MARK[result.verdict.status]}{reasons} |"
        )
    lines.append("")
    return lines


def summary_table(report: ValidationReport) -> Any:
    """The end-of-run summary for the terminal (rich): one row per task × candidate, then why anything failed."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    colours = {PASS: "green", FAIL: "red", INCONCLUSIVE: "magenta", SKIPPED: "yellow"}
    table = Table(title=f"parity vs {REFERENCE_LABEL}: {report.outcome}", box=box.SIMPLE_HEAD)
    for column in ("task", "candidate", "acc ref→cand", "Δ pts (paired CI)", "b/c", "agree", "verdict"):
        table.add_column(column, no_wrap=True)
    for result in report.results:
        status = f"[{colours[result.verdict.status]}]{result.verdict.status.upper()}[/]"
        if not result.metrics:
            table.add_row(result.task, escape(result.candidate), "", "", "", "", status)
            continue
        m = result.metrics[0]
        table.add_row(
            result.task,
            escape(result.candidate),
            f"{_pct(m.reference_acc)}→{_pct(m.candidate_acc)}",
            f"{points(m.delta):+.1f} {_interval(m.delta_ci, signed=True)}",
            f"{m.right_to_wrong}/{m.wrong_to_right}",
            f"{m.agreement:.3f}",
            status,
        )
    reasons = [
        Text(f"{r.verdict.status.upper()} {r.task} · {r.candidate}: {r.verdict.message}")
        for r in report.results
        if r.verdict.reasons
    ]
    reasons += [
        Text(f"NOT COMPARED {r.task} · {r.candidate}: {_declined_text(r)}")
        for r in report.results
        if r.skipped_questions
    ]
    if report.speed:
        rates = ", ".join(
            f"{label} {speed.questions_per_second:.1f} q/s ({speed.tokens_per_second:.0f} tok/s)"
            for label, speed in report.speed.items()
        )
        reasons.append(Text(f"scoring speed: {rates}"))
    return Group(table, *reasons)


def _junit_kind(status: str, fail_on: str) -> str | None:
    """JUnit element of a verdict: "failure" when it fails the run (a skipped backend stays "skipped"), "skipped"
    for any other verdict that is not a pass (e.g. inconclusive under ``--fail-on parity``), None for a pass."""
    if status == PASS:
        return None
    return "failure" if status != SKIPPED and run_fails([status], fail_on) else "skipped"


def render_junit(report: ValidationReport) -> bytes:
    """One testcase per task × candidate (classname mexport.parity.<task>); failure text says why."""
    cases = []
    for result in report.results:
        status, message = result.verdict.status, result.verdict.message
        kind = _junit_kind(status, report.fail_on)
        if kind == "skipped" and status != SKIPPED:
            message = f"{status}: {message}"
        cases.append(JUnitCase(
            f"mexport.parity.{result.task}", result.candidate, kind, message,
            failure_type="ParityInconclusive" if status == INCONCLUSIVE else "ParityFailure",
            details=None if kind == "skipped" else _junit_details(result),
        ))
    return junit_xml("mexport.parity", cases)


def _junit_details(result: ParityResult) -> str:
    return "\n".join(
        f"{m.metric}: ref {_pct(m.reference_acc)} cand {_pct(m.candidate_acc)} delta {points(m.delta):+.2f} "
        f"{_interval(m.delta_ci, signed=True)} flips {m.right_to_wrong}/{m.wrong_to_right} "
        f"McNemar p {m.mcnemar_p:.3g} agreement {m.agreement:.3f} "
        f"(n={m.n}: resolvable difference ±{points(resolvable_difference(m.n)):.2f} pts)"
        for m in result.metrics
    )


_VERDICT_COLOURS = {PASS: "tab:green", FAIL: "tab:red", INCONCLUSIVE: "tab:orange"}
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
# candidates are told apart by colour and marker; the reference is black. acc is a filled marker, acc_norm hollow
_CANDIDATE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                      "tab:olive", "tab:cyan", "tab:gray")
_METRIC_OFFSETS = {"acc": -0.18, "acc_norm": 0.18}  # of one candidate's slot width


def _style(index: int) -> tuple[str, str]:
    """(colour, marker) of the ``index``-th candidate (0 = first candidate)."""
    return _CANDIDATE_COLOURS[index % len(_CANDIDATE_COLOURS)], _MARKERS[index % len(_MARKERS)]


def _metric_marker(metric: str, colour: str) -> dict[str, Any]:
    return {"markerfacecolor": colour if metric == "acc" else "white", "markeredgecolor": colour}


def render_accuracy_png(report: ValidationReport) -> bytes:
    return _png_bytes(accuracy_figure(report))


def render_parity_png(report: ValidationReport) -> bytes:
    return _png_bytes(parity_figure(report))


def accuracy_figure(report: ValidationReport) -> Any:
    """Accuracy (acc filled, acc_norm hollow where the task reports it) with its Wilson CI per backend and task, on
    an axis zoomed to the data, so differences of a point or two stay visible (matplotlib Agg, no timestamp or
    version in the metadata)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    candidates = [b.label for b in report.backends if b.role == "candidate"]
    labels = [REFERENCE_LABEL, *candidates]
    figure = Figure(figsize=(max(5.0, 1.6 * len(report.tasks) + 2.0), 4.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(labels))
    extremes: list[float] = []
    for offset, label in enumerate(labels):
        colour, marker = ("black", "o") if offset == 0 else _style(offset - 1)
        for metric, shift in _METRIC_OFFSETS.items():
            xs, ys, lows, highs = [], [], [], []
            for index, task in enumerate(report.tasks):
                acc_ci = accuracy_of(report, task.name, label, metric) if metric in task.metrics else None
                if acc_ci is None:
                    continue
                acc, (low, high) = acc_ci
                xs.append(index - 0.4 + width * (offset + 0.5 + shift))
                ys.append(points(acc))
                lows.append(points(acc - low))
                highs.append(points(high - acc))
                extremes += [points(low), points(high)]
            if xs:
                axes.errorbar(xs, ys, yerr=[lows, highs], fmt=marker, capsize=3, color=colour,
                              label=label if metric == "acc" else None, **_metric_marker(metric, colour))
    axes.set_xticks(range(len(report.tasks)), [task.name for task in report.tasks])
    axes.set_xlim(-0.6, len(report.tasks) - 0.4)
    if extremes:
        pad = max(1.0, 0.08 * (max(extremes) - min(extremes)))
        axes.set_ylim(max(0.0, min(extremes) - pad), min(100.0, max(extremes) + pad))
    axes.set_ylabel(f"accuracy (%), {CONFIDENCE:.0%} Wilson CI (axis zoomed)")
    axes.set_title("filled: acc, hollow: acc_norm", fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing scored: no legend to draw
        axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(labels)))
    return figure


def parity_figure(report: ValidationReport) -> Any:
    """Each candidate's paired difference from the reference with its CI, per task and metric (acc filled,
    acc_norm hollow: AfriMedQA's verdict reads both), against its ±margin band (grey); colour and marker name the
    candidate, the letter above each point its verdict (P pass, F fail, I inconclusive); the legend gives each
    candidate's margin. Skipped candidates are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels = [b.label for b in report.backends if b.role == "candidate" and b.skip_reason is None]
    figure = Figure(
        figsize=(max(5.0, 1.6 * len(report.tasks) + 2.0), 4.4 + 0.25 * ((len(labels) + 3) // 4)), dpi=100
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(labels))
    results = {(r.task, r.candidate): r for r in report.results}
    margins: dict[str, set[float]] = {label: set() for label in labels}
    for index, task in enumerate(report.tasks):
        for offset, label in enumerate(labels):
            result = results.get((task.name, label))
            if result is None or not result.metrics:
                continue
            margins[label].add(result.margin_points)
            colour, marker = _style(offset)
            x = index - 0.4 + width * (offset + 0.5)
            axes.bar(x, 2 * result.margin_points, width * 0.9, bottom=-result.margin_points, color="0.88", zorder=1)
            for metric in result.metrics:
                mx = x + width * _METRIC_OFFSETS.get(metric.metric, 0.0)
                delta, low, high = points(metric.delta), points(metric.delta_ci[0]), points(metric.delta_ci[1])
                axes.errorbar([mx], [delta], yerr=[[delta - low], [high - delta]], fmt=marker, capsize=3,
                              color=colour, zorder=3, **_metric_marker(metric.metric, colour))
            status = result.verdict.status
            top = max(points(metric.delta_ci[1]) for metric in result.metrics)
            axes.annotate(status[:1].upper(), (x, top), textcoords="offset points", xytext=(0, 4), ha="center",
                          fontsize="small", fontweight="bold", color=_VERDICT_COLOURS.get(status, "tab:gray"))
    axes.axhline(0.0, color="0.4", linewidth=0.8, zorder=2)
    axes.set_xticks(range(len(report.tasks)), [task.name for task in report.tasks])
    axes.set_xlim(-0.6, len(report.tasks) - 0.4)
    axes.set_ylabel(f"Δ accuracy vs reference (pts), {CONFIDENCE:.0%} Tango CI")
    axes.set_title("filled: acc, hollow: acc_norm; P/F/I: pass / fail / inconclusive", fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    legend = []
    for offset, label in enumerate(labels):
        colour, marker = _style(offset)
        margin = "/".join(f"{value:g}" for value in sorted(margins[label])) or "?"
        legend.append(Line2D([], [], marker=marker, linestyle="", color=colour, label=f"{label} (±{margin} pts)"))
    legend.append(Line2D([], [], linewidth=8, color="0.88", label="±margin"))
    axes.legend(handles=legend, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    return figure


def _png_bytes(figure: Any) -> bytes:
    """PNG bytes of a laid-out figure, without the Software metadata (so the bytes do not carry a version)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def accuracy_of(
    report: ValidationReport, task: str, label: str, metric: str = "acc"
) -> tuple[float, tuple[float, float]] | None:
    """A backend's accuracy and Wilson CI on a task, from its per-question scores (None when not scored)."""
    scores = [entry for entry in report.scores.get(task, {}).get(label, []) if is_scored(entry)]
    if not scores:
        return None
    right = sum(int(getattr(score, metric)) for score in scores)
    return right / len(scores), wilson_interval(right, len(scores))
