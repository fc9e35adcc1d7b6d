"""`mexport pipeline`: checkpoint → export → quantize → engine → validate → one combined report, resumable.

Each step writes into its own directory under the pipeline output and records, in ``pipeline-state.json``, the
hash of its settings chained with its upstream steps' hashes. A re-run skips every step whose hash matches and
whose artifact manifest is still there, so a run that failed half-way resumes where it stopped; ``force`` redoes
everything. Every config field has a CLI flag; the CLI merges flags over the file and calls :func:`run_pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from mexport import console
from mexport.errors import EXIT_CHECK_FAILED, EXIT_INCONCLUSIVE, EXIT_OK, MexportError
from mexport.fixtures import FIXTURE_NAMES
from mexport.fsutil import write_atomic
from mexport.manifest import MANIFEST_NAME, settings_hash, utc_now
from mexport.validate.tasks import SHIPPED_SETS
from mexport.validate.verdict import DEFAULT_FAIL_ON

STATE_FILE = "pipeline-state.json"
FIXTURE_PREFIX = "fixture:"
ENGINE_MODES = ("auto", "build", "plan", "off")


@dataclass
class PipelineConfig:
    """Everything a pipeline run needs; the TOML file's tables map onto these fields (see examples/)."""

    model: str
    output: Path
    revision: str | None = None
    dtype: str = "bf16"
    opset: int = 18
    export_device: str = "cpu"
    recipes: list[str] = field(default_factory=list)
    calib: str | None = None
    calib_size: int = 64
    engine: str = "auto"
    engine_precision: str = "bf16"
    max_batch: int = 8
    max_input_len: int = 2048
    max_context: int = 4096
    target: str | None = None
    gpu_memory_gb: float | None = None
    tasks: list[str] = field(default_factory=lambda: ["medmcqa", "medqa", "pubmedqa", "afrimedqa"])
    data: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 1234
    device: str = "cpu"
    margin: float = 1.0
    recipe_margins: dict[str, float] = field(default_factory=dict)
    agreement_floor: float | None = None
    fail_on: str = DEFAULT_FAIL_ON

    def check(self) -> None:
        """Refuse bad names before any step runs, so a typo never costs a finished export."""
        from mexport.formats import EXPORT_DTYPES
        from mexport.optimize.quantize.recipes import get_recipe
        from mexport.validate.tasks import get_task

        if self.dtype not in EXPORT_DTYPES:
            raise MexportError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}")
        for recipe in self.recipes:
            get_recipe(recipe)
        for task in self.tasks:
            get_task(task)
        if self.engine not in ENGINE_MODES:
            raise MexportError(f"engine mode {self.engine!r} is not one of {', '.join(ENGINE_MODES)}")
        if self.model.startswith(FIXTURE_PREFIX) and self.model[len(FIXTURE_PREFIX):] not in FIXTURE_NAMES:
            raise MexportError(
                f"unknown fixture {self.model!r}; available: "
                + ", ".join(FIXTURE_PREFIX + name for name in FIXTURE_NAMES)
            )


# TOML table.key -> PipelineConfig field
_TOML_FIELDS = {
    ("model",): "model", ("output",): "output", ("revision",): "revision",
    ("export", "dtype"): "dtype", ("export", "opset"): "opset", ("export", "device"): "export_device",
    ("quantize", "recipes"): "recipes", ("quantize", "calib"): "calib", ("quantize", "calib_size"): "calib_size",
    ("engine", "mode"): "engine", ("engine", "precision"): "engine_precision", ("engine", "max_batch"): "max_batch",
    ("engine", "max_input_len"): "max_input_len", ("engine", "max_context"): "max_context",
    ("engine", "target"): "target", ("engine", "gpu_memory_gb"): "gpu_memory_gb",
    ("validate", "tasks"): "tasks", ("validate", "data"): "data", ("validate", "limit"): "limit",
    ("validate", "seed"): "seed", ("validate", "device"): "device", ("validate", "margin"): "margin",
    ("validate", "recipe_margins"): "recipe_margins", ("validate", "agreement_floor"): "agreement_floor",
    ("validate", "fail_on"): "fail_on",
}


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline TOML file (relative paths resolve against its folder) and apply CLI ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise MexportError(f"{path}: pipeline config not found")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MexportError(f"{path}: invalid TOML ({exc})") from exc
    values: dict[str, Any] = {}
    known = set(_TOML_FIELDS)
    for key, value in _flatten(document):
        if key not in known:
            raise MexportError(f"{path}: unknown setting {'.'.join(key)!r}", hint="see examples/pipeline-tiny.toml")
        values[_TOML_FIELDS[key]] = value
    for name in ("output",):
        if name in values:
            values[name] = (path.parent / values[name]).resolve()
    if isinstance(values.get("model"), str) and not values["model"].startswith(FIXTURE_PREFIX):
        local = path.parent / values["model"]
        if local.exists():
            values["model"] = str(local.resolve())
    if isinstance(values.get("data"), dict):
        values["data"] = {
            task: source if source in SHIPPED_SETS else str((path.parent / source).resolve())
            for task, source in values["data"].items()
        }
    return config_from(values, overrides)


def config_from(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A config from field values (file first, then non-None CLI overrides)."""
    merged = {**values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    missing = [name for name in ("model", "output") if name not in merged]
    if missing:
        raise MexportError(f"pipeline needs {' and '.join(missing)} (in the config file or as options)")
    merged["output"] = Path(merged["output"])
    config = PipelineConfig(**merged)
    config.check()
    return config


def _flatten(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    items = []
    for key, value in table.items():
        if isinstance(value, dict) and (*prefix, key) not in _TOML_FIELDS:
            items.extend(_flatten(value, (*prefix, key)))
        else:
            items.append(((*prefix, key), value))
    return items


@dataclass
class StepRecord:
    """What happened to one step: done (ran now), resumed (up to date), skipped (with why) or failed."""

    name: str
    status: str
    output: str | None = None
    seconds: float = 0.0
    detail: str = ""


@dataclass
class PipelineResult:
    output: Path
    steps: list[StepRecord]
    validation: dict[str, Any] | None
    failed: bool

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this run (see :mod:`mexport.errors`): 4 when only inconclusive verdicts fail it."""
        step_failed = any(step.status == "failed" for step in self.steps)
        if self.failed and not step_failed and (self.validation or {}).get("outcome") == "inconclusive":
            return EXIT_INCONCLUSIVE
        return EXIT_CHECK_FAILED if self.failed else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "failed": self.failed,
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "validation": self.validation,
        }


class _Runner:
    """Runs steps in order with resume bookkeeping; one instance per pipeline run."""

    def __init__(self, config: PipelineConfig, force: bool) -> None:
        self.config = config
        self.force = force
        self.out = config.output.resolve()
        self.state_path = self.out / STATE_FILE
        self.state: dict[str, Any] = self._load_state()
        self.steps: list[StepRecord] = []

    def _load_state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        if self.out.is_dir() and any(self.out.iterdir()):
            raise MexportError(
                f"{self.out}: exists, is not empty and holds no {STATE_FILE} (not a pipeline output)",
                hint="choose another --output directory",
            )
        return {"steps": {}}

    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, (json.dumps(self.state, indent=2, sort_keys=True) + "\n").encode())

    def step(
        self, name: str, settings: dict[str, Any], target: Path, action: Callable[[], str], marker: str = MANIFEST_NAME
    ) -> str:
        """Run ``action`` (which writes ``target`` and returns a short detail) unless it is already up to date.

        Up to date: the same settings hash as the last successful run and ``target / marker`` still there.

        Returns the step's settings hash, which downstream steps fold into theirs.
        """
        digest = settings_hash(settings)
        previous = self.state["steps"].get(name, {})
        up_to_date = (
            not self.force
            and previous.get("hash") == digest
            and previous.get("status") == "done"
            and (target / marker).is_file()
        )
        if up_to_date:
            console.info(f"[dim]{name}: up to date, skipped (resume)[/dim]")
            self.steps.append(StepRecord(name, "resumed", str(target), 0.0, previous.get("detail", "")))
            return digest
        console.info(f"[bold]{name}[/bold] → {target}")
        started = time.perf_counter()
        self.state["steps"][name] = {"hash": digest, "status": "running", "output": str(target)}
        self._save_state()
        try:
            detail = action()
        except MexportError as exc:
            self._record(name, digest, target, "failed", started, exc.message)
            raise
        self._record(name, digest, target, "done", started, detail)
        return digest

    def skip(self, name: str, reason: str) -> None:
        console.info(f"[yellow]{name}: skipped[/yellow] ({reason})")
        self.steps.append(StepRecord(name, "skipped", None, 0.0, reason))

    def _record(self, name: str, digest: str, target: Path, status: str, started: float, detail: str) -> None:
        seconds = round(time.perf_counter() - started, 2)
        self.state["steps"][name] = {"hash": digest, "status": status, "output": str(target), "detail": detail}
        self._save_state()
        self.steps.append(StepRecord(name, status, str(target), seconds, detail))


def _checkpoint_fingerprint(model: str) -> dict[str, Any]:
    """Sizes and mtimes of a local checkpoint's files, so editing it in place invalidates the export step."""
    path = Path(model)
    if not path.is_dir():
        return {"hub_id": model}
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(path.iterdir()) if p.is_file()}


def run_pipeline(config: PipelineConfig, force: bool = False) -> PipelineResult:
    """Run every step of ``config``; raises on a step error, returns the result (with ``failed``) otherwise."""
    config.check()
    runner = _Runner(config, force)
    out = runner.out

    checkpoint, upstream = _checkpoint_step(runner, config)
    export_dir = out / f"onnx-{config.dtype}"
    export_hash = runner.step(
        "export",
        {"upstream": upstream, "checkpoint": _checkpoint_fingerprint(checkpoint), "revision": config.revision,
         "dtype": config.dtype, "opset": config.opset, "device": config.export_device},
        export_dir,
        lambda: _export(checkpoint, export_dir, config),
    )

    candidates = [(f"onnx-{config.dtype}", export_dir, export_hash)]
    for recipe in config.recipes:
        quant_dir = out / f"quant-{recipe}"
        quant_hash = runner.step(
            f"quantize:{recipe}",
            {"upstream": export_hash, "recipe": recipe, "calib": config.calib, "calib_size": config.calib_size},
            quant_dir,
            lambda recipe=recipe, quant_dir=quant_dir: _quantize(export_dir, quant_dir, recipe, config),
        )
        candidates.append((f"quant-{recipe}", quant_dir, quant_hash))

    engines = _engine_steps(runner, config, candidates)
    validated = [(path, digest) for _, path, digest in candidates] + engines

    report_dir = out / "report"
    validation: dict[str, Any] | None = None
    report_failed = False

    def _validate() -> str:
        nonlocal validation, report_failed
        from mexport.validate import validate

        report = validate(
            checkpoint,
            [path for path, _ in validated],
            config.tasks,
            output=report_dir,
            data=config.data or None,
            limit=config.limit,
            seed=config.seed,
            device=config.device,
            margin=config.margin,
            recipe_margins=config.recipe_margins or None,
            fail_on=config.fail_on,
            **({"agreement_floor": config.agreement_floor} if config.agreement_floor is not None else {}),
        )
        validation, report_failed = report.summary(), report.failed
        runner.state["validation"] = {"summary": validation, "failed": report_failed}
        return f"parity {report.outcome.lower()}"

    runner.step(
        "validate",
        {"upstream": [digest for _, digest in validated], "checkpoint": upstream, "tasks": config.tasks,
         "data": config.data, "limit": config.limit, "seed": config.seed, "device": config.device,
         "margin": config.margin, "recipe_margins": config.recipe_margins, "floor": config.agreement_floor,
         "fail_on": config.fail_on},
        report_dir,
        _validate,
        marker="report.json",
    )
    if validation is None:  # resumed: the summary the earlier run recorded
        validation = runner.state["validation"]["summary"]
        report_failed = runner.state["validation"]["failed"]
    failed = report_failed or any(step.status == "failed" for step in runner.steps)
    result = PipelineResult(out, runner.steps, validation, failed)
    write_pipeline_reports(result)
    return result


def _checkpoint_step(runner: _Runner, config: PipelineConfig) -> tuple[str, str]:
    """The checkpoint to export: the model itself, or a built-in fixture written into the output first."""
    if not config.model.startswith(FIXTURE_PREFIX):
        return config.model, settings_hash({"model": config.model, "revision": config.revision})
    name = config.model[len(FIXTURE_PREFIX):]
    target = runner.out / "checkpoint"

    def _write() -> str:
        from mexport.fixtures import write_fixture

        write_fixture(name, target, overwrite=True)
        return f"fixture {name}"

    digest = runner.step("checkpoint", {"fixture": name}, target, _write, marker="config.json")
    return str(target), digest


def _export(checkpoint: str, target: Path, config: PipelineConfig) -> str:
    from mexport.export import export_onnx

    result = export_onnx(
        checkpoint, target, dtype=config.dtype, opset=config.opset, revision=config.revision,
        device=config.export_device, overwrite=True,
    )
    return f"status {result.manifest.get('status')}"


def _quantize(export_dir: Path, target: Path, recipe: str, config: PipelineConfig) -> str:
    from mexport.optimize import quantize

    result = quantize(export_dir, target, recipe, calib=config.calib, calib_size=config.calib_size, overwrite=True)
    check = result.report.get("numeric_check")
    return f"top-1 agreement vs export {check['top1_agreement']:.1%}" if check else "quantized (no numeric check)"


def _engine_steps(
    runner: _Runner, config: PipelineConfig, candidates: list[tuple[str, Path, str]]
) -> list[tuple[Path, str]]:
    """Build an engine per candidate when TensorRT and a GPU are here (or asked); otherwise write the plan only."""
    if config.engine == "off":
        runner.skip("engine", "disabled in the config (engine.mode = off)")
        return []
    from mexport.optimize.engine import EngineSettings, build_engine, plan_engine, write_plan

    settings = EngineSettings(
        precision=config.engine_precision, max_batch=config.max_batch, max_input_len=config.max_input_len,
        max_context=config.max_context, gpu_memory_gb=config.gpu_memory_gb, target=config.target,
    )
    unavailable = None if config.engine == "plan" else _engine_unavailable_reason()
    if config.engine == "build" and unavailable:
        raise MexportError(f"engine.mode = build but {unavailable}")
    built = []
    for label, model_dir, digest in candidates:
        target = runner.out / f"engine-{label}"
        step_settings = {"upstream": digest, **settings.to_dict()}
        if unavailable is None and config.engine != "plan":
            engine_hash = runner.step(
                f"engine:{label}", step_settings, target,
                lambda model_dir=model_dir, target=target: _build(build_engine, model_dir, target, settings),
            )
            built.append((target, engine_hash))
            continue
        runner.step(
            f"engine-plan:{label}", {**step_settings, "plan_only": True}, target,
            lambda model_dir=model_dir, target=target: _plan(plan_engine, write_plan, model_dir, target, settings),
            marker="plan.json",
        )
        reason = "plan only (engine.mode = plan)" if config.engine == "plan" else unavailable
        runner.skip(f"engine:{label}", f"{reason}; plan written to {target / 'plan.json'}")
    return built


def _engine_unavailable_reason() -> str | None:
    from mexport.optimize.engine import require_tensorrt
    from mexport.optimize.engine.gpus import require_cuda_gpu

    try:
        require_tensorrt()
        require_cuda_gpu()
    except MexportError as exc:
        return exc.message
    return None


def _build(build_engine: Callable[..., Any], model_dir: Path, target: Path, settings: Any) -> str:
    result = build_engine(model_dir, target, settings, overwrite=True)
    return f"engine {result.manifest.get('engine_bytes', '?')} bytes"


def _plan(plan_engine: Callable[..., Any], write_plan: Callable[..., Any], model_dir: Path, target: Path,
          settings: Any) -> str:
    plan = plan_engine(model_dir, settings)
    write_plan(plan, target, overwrite=True)
    return "plan written"


def write_pipeline_reports(result: PipelineResult) -> dict[str, Path]:
    """pipeline.json, pipeline.md (steps + the validation summary) and pipeline-junit.xml (one case per step)."""
    out = result.output
    payload = {"created": utc_now(), **result.to_dict()}
    paths = {
        "json": write_atomic(out / "pipeline.json", (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()),
        "markdown": write_atomic(out / "pipeline.md", render_markdown(result).encode()),
        "junit": write_atomic(out / "pipeline-junit.xml", render_junit(result)),
    }
    return paths


def render_markdown(result: PipelineResult) -> str:
    lines = [
        "# mexport pipeline",
        "",
        f"**Result: {({1: 'FAILED', 4: 'INCONCLUSIVE'}).get(result.exit_code, 'passed')}**",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in result.steps]
    validation_md = result.output / "report" / "report.md"
    if validation_md.is_file():
        lines += ["", validation_md.read_text().replace("\n# ", "\n## ", 1)]
    return "\n".join(lines) + "\n"


def render_junit(result: PipelineResult) -> bytes:
    suite = ElementTree.Element(
        "testsuite",
        name="mexport.pipeline",
        tests=str(len(result.steps)),
        failures=str(sum(s.status == "failed" for s in result.steps)),
        skipped=str(sum(s.status == "skipped" for s in result.steps)),
    )
    for step in result.steps:
        case = ElementTree.SubElement(suite, "testcase", classname="mexport.pipeline", name=step.name,
                                      time=f"{step.seconds:.2f}")
        if step.status == "failed":
            ElementTree.SubElement(case, "failure", message=step.detail)
        elif step.status == "skipped":
            ElementTree.SubElement(case, "skipped", message=step.detail)
    return ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)
