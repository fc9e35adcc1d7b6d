"""`mexport pipeline`: checkpoint → export → quantize → engine → validate → one combined report, resumable.

Each step writes into its own directory under the pipeline output and records, in ``pipeline-state.json``, the
hash of its settings and of the content of the files it reads (checkpoint, data and calibration files), chained with
its upstream steps' hashes (which include their outputs' file hashes). A re-run skips every step whose hash matches and
whose artifact manifest is still there, so a run that failed half-way resumes where it stopped; ``force`` redoes
everything. Every config field has a CLI flag; the CLI merges flags over the file and calls :func:`run_pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from mexport import console, strict_json
from mexport.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INCONCLUSIVE,
    EXIT_OK,
    EnvironmentFailure,
    IntegrityError,
    MexportError,
    verdict_word,
)
from mexport.export import export_onnx
from mexport.export.exporter import check_opset
from mexport.fixtures import FIXTURE_NAMES, write_fixture
from mexport.formats import DEFAULT_EXPORT_DTYPE, EXPORT_DTYPES
from mexport.fsutil import claimed_output, write_atomic
from mexport.hardware import probe
from mexport.junit import FAILURE, SKIPPED, JUnitCase, junit_xml
from mexport.manifest import (
    MANIFEST_NAME,
    file_records,
    hash_files,
    read_manifest,
    settings_hash,
    sha256_file,
    utc_now,
    verify_files,
)
from mexport.optimize import quantize
from mexport.optimize.engine import build_engine, plan_engine, write_plan
from mexport.optimize.engine.gpus import gpu_budget
from mexport.optimize.engine.precision import PRECISIONS
from mexport.optimize.quantize.calibration import calibration_task_names
from mexport.optimize.quantize.recipes import cuda_recipe_support, get_recipe
from mexport.trt_common import EngineSettings
from mexport.validate import validate
from mexport.validate.backends import HUB_ID
from mexport.validate.runner import check_devices
from mexport.validate.tasks import SHIPPED_SETS, data_file, get_task
from mexport.validate.verdict import (
    DEFAULT_FAIL_ON,
    check_agreement_floor,
    check_fail_on,
    check_margin,
    check_recipe_margins,
)

STATE_FILE = "pipeline-state.json"
FIXTURE_PREFIX = "fixture:"
ENGINE_MODES = ("auto", "build", "plan", "off")


def _one_or_many(value: Any) -> Any:
    """``recipes = "int8-wo"`` means one recipe (a bare string is never split into characters)."""
    return [value] if isinstance(value, str) else value


def _home(value: Any) -> Any:
    """A path setting with a leading ``~`` expanded (a hub id, fixture or task name never starts with one)."""
    if isinstance(value, (str, Path)) and str(value).startswith("~"):
        return type(value)(Path(value).expanduser())
    if isinstance(value, dict):
        return {key: _home(item) for key, item in value.items()}
    return value


HomePath = BeforeValidator(_home)


def _checked(check: Callable[..., Any], *args: Any) -> None:
    """Run one of the library's own checks inside a validator, so pydantic collects its message with the rest."""
    try:
        check(*args)
    except MexportError as exc:
        raise ValueError(exc.message) from None


ENGINE_DEFAULTS = EngineSettings()
# PipelineConfig field -> the EngineSettings field it sets (and its key in the TOML file's [engine] table)
ENGINE_FIELDS = {
    "engine_precision": "precision", "max_batch": "max_batch", "max_input_len": "max_input_len",
    "max_context": "max_context", "target": "target", "gpu_memory_gb": "gpu_memory_gb",
}


class PipelineConfig(BaseModel):
    """Everything a pipeline run needs, typed and range-checked; the TOML file's tables map onto these fields
    (see examples/) and every CLI flag of ``mexport pipeline`` sets one. Creating one validates every field and
    reports every problem at once, before any step runs. Name checks reuse the library's own (recipes, tasks,
    engine limits, GPU targets, verdict policy), so a field is defined once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, HomePath] = Field(min_length=1)
    output: Annotated[Path, HomePath]
    revision: str | None = None
    dtype: str = DEFAULT_EXPORT_DTYPE
    opset: int = Field(18, strict=True)
    export_device: Literal["cpu", "cuda"] = "cpu"
    recipes: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(default_factory=list)
    calib: Annotated[str | None, HomePath] = None
    calib_size: int = Field(64, ge=1, strict=True)
    engine: str = "auto"
    engine_precision: str | None = None  # None: the export's dtype (the only choice TensorRT 11 builds)
    max_batch: int = Field(ENGINE_DEFAULTS.max_batch, ge=1, strict=True)
    max_input_len: int | None = Field(None, ge=1, strict=True)  # None: min(2048, max_context)
    max_context: int | None = Field(None, ge=1, strict=True)  # None: min(4096, the model's max_position_embeddings)
    target: str | None = None
    gpu_memory_gb: float | None = Field(None, gt=0, allow_inf_nan=False)
    tasks: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(
        default_factory=lambda: ["medmcqa", "medqa", "pubmedqa", "afrimedqa"], min_length=1
    )
    data: Annotated[dict[str, str], HomePath] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1, strict=True)
    seed: int = Field(1234, strict=True)
    device: Literal["cpu", "cuda"] = "cpu"
    devices: list[str] = Field(default_factory=list)  # one validation shard per device, each in its own process
    margin: float = 1.0
    recipe_margins: dict[str, float] = Field(default_factory=dict)
    agreement_floor: float | None = None
    fail_on: str = DEFAULT_FAIL_ON

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: str) -> str:
        if model.startswith(FIXTURE_PREFIX):
            if model[len(FIXTURE_PREFIX):] not in FIXTURE_NAMES:
                raise ValueError(
                    f"unknown fixture {model!r}; available: {', '.join(FIXTURE_PREFIX + n for n in FIXTURE_NAMES)}"
                )
            return model

        path = Path(model)
        if path.exists() and not (path / "config.json").is_file():
            raise ValueError(f"{model}: not a checkpoint directory (no config.json)")
        if not path.exists() and not HUB_ID.match(model):
            raise ValueError(f"{model}: no such checkpoint directory (and not a hub id like org/name)")
        return model

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, dtype: str) -> str:
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}")
        return dtype

    @field_validator("opset")
    @classmethod
    def _opset_supported(cls, opset: int) -> int:
        _checked(check_opset, opset)
        return opset

    @field_validator("recipes")
    @classmethod
    def _recipes_known(cls, recipes: list[str]) -> list[str]:
        for recipe in recipes:
            _checked(get_recipe, recipe)
        if len(set(recipes)) != len(recipes):
            raise ValueError(f"a recipe is listed twice: {recipes}")
        return recipes

    @field_validator("tasks")
    @classmethod
    def _tasks_known(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            _checked(get_task, task)
        return tasks

    @field_validator("data")
    @classmethod
    def _data_files_exist(cls, data: dict[str, str]) -> dict[str, str]:
        for task, source in data.items():
            _checked(get_task, task)
            if source not in SHIPPED_SETS and not Path(source).is_file():
                raise ValueError(f"data file for {task} not found: {source}")
        return data

    @field_validator("calib")
    @classmethod
    def _calib_exists(cls, calib: str | None) -> str | None:
        names = calibration_task_names()
        if calib is not None and calib not in names and not Path(calib).is_file():
            raise ValueError(f"calibration file not found: {calib} (nor is it a task name: {', '.join(names)})")
        return calib

    @field_validator("engine")
    @classmethod
    def _engine_mode(cls, engine: str) -> str:
        if engine not in ENGINE_MODES:
            raise ValueError(f"engine mode {engine!r} is not one of {', '.join(ENGINE_MODES)}")
        return engine

    @field_validator("engine_precision")
    @classmethod
    def _precision_known(cls, precision: str | None) -> str | None:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"unknown engine precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        return precision

    @field_validator("margin")
    @classmethod
    def _margin_valid(cls, margin: float) -> float:
        _checked(check_margin, margin, "margin")
        return margin

    @field_validator("recipe_margins")
    @classmethod
    def _recipe_margins_valid(cls, margins: dict[str, float]) -> dict[str, float]:
        _checked(check_recipe_margins, margins, "recipe margin")
        return margins

    @field_validator("agreement_floor")
    @classmethod
    def _agreement_floor_valid(cls, floor: float | None) -> float | None:
        if floor is not None:
            _checked(check_agreement_floor, floor, "agreement floor")
        return floor

    @field_validator("fail_on")
    @classmethod
    def _fail_on_known(cls, fail_on: str) -> str:
        _checked(check_fail_on, fail_on, "fail_on")
        return fail_on

    @model_validator(mode="after")
    def _devices_of_the_device_kind(self) -> PipelineConfig:
        _checked(check_devices, self.devices)
        other = [name for name in self.devices if name.strip().split(":")[0] != self.device]
        if other:
            raise ValueError(f"validate.devices {', '.join(other)} are not {self.device} devices (validate.device)")
        return self

    @model_validator(mode="after")
    def _engine_fits_together(self) -> PipelineConfig:
        _checked(EngineSettings(max_batch=self.max_batch, max_input_len=self.max_input_len,
                                max_context=self.max_context).limits.validate)
        _checked(gpu_budget, self.target, self.gpu_memory_gb)
        return self


# TOML table.key -> PipelineConfig field
_TOML_FIELDS = {
    ("model",): "model", ("output",): "output", ("revision",): "revision",
    ("export", "dtype"): "dtype", ("export", "opset"): "opset", ("export", "device"): "export_device",
    ("quantize", "recipes"): "recipes", ("quantize", "calib"): "calib", ("quantize", "calib_size"): "calib_size",
    ("engine", "mode"): "engine", **{("engine", setting): field for field, setting in ENGINE_FIELDS.items()},
    ("validate", "tasks"): "tasks", ("validate", "data"): "data", ("validate", "limit"): "limit",
    ("validate", "seed"): "seed", ("validate", "device"): "device", ("validate", "devices"): "devices",
    ("validate", "margin"): "margin",
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
    unknown = []
    for key, value in _flatten(document):
        if key in _TOML_FIELDS:
            values[_TOML_FIELDS[key]] = value
        else:
            unknown.append(".".join(key))
    if unknown:
        raise MexportError(
            f"{path}: unknown setting {', '.join(map(repr, unknown))}", hint="see examples/pipeline-tiny.toml"
        )
    def beside_config(value: str) -> Path:  # "~/x" is the user's home, a relative path is the config file's folder
        return path.parent / Path(value).expanduser()

    if isinstance(values.get("output"), str):
        values["output"] = beside_config(values["output"]).resolve()
    if isinstance(values.get("calib"), str) and beside_config(values["calib"]).is_file():
        values["calib"] = str(beside_config(values["calib"]).resolve())
    if isinstance(values.get("model"), str) and not values["model"].startswith(FIXTURE_PREFIX):
        local = beside_config(values["model"])
        if local.exists():
            values["model"] = str(local.resolve())
    if isinstance(values.get("data"), dict):
        values["data"] = {
            task: str(beside_config(source).resolve())
            if isinstance(source, str) and source not in SHIPPED_SETS
            else source
            for task, source in values["data"].items()
        }
    return config_from(values, overrides)


def config_from(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A config from field values (file first, then non-None CLI overrides), with every problem in one error."""
    merged = {**values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    missing = [name for name in ("model", "output") if name not in merged]
    if missing:
        raise MexportError(f"pipeline needs {' and '.join(missing)} (in the config file or as options)")
    try:
        return PipelineConfig(**merged)
    except ValidationError as exc:
        raise MexportError(config_problems(exc), hint="see examples/pipeline-tiny.toml") from None


_SETTING_NAMES = {field_name: ".".join(key) for key, field_name in _TOML_FIELDS.items()}


def config_problems(error: ValidationError) -> str:
    """Every problem of a config, one line each, named as in the TOML file (``engine.max_batch``)."""
    lines = []
    for problem in error.errors():
        name = _SETTING_NAMES.get(str(problem["loc"][0]), str(problem["loc"][0])) if problem["loc"] else "config"
        where = ".".join([name, *(str(part) for part in problem["loc"][1:])])
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = "" if problem["type"].startswith("value_error") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{where}: {message}{shown}")
    count = f"{len(lines)} problems" if len(lines) > 1 else "1 problem"
    return f"pipeline config has {count}:\n  " + "\n  ".join(lines)


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
            try:
                state = json.loads(self.state_path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                state = exc
            if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
                raise EnvironmentFailure(
                    f"{self.state_path}: corrupt pipeline state ({state if isinstance(state, Exception) else 'no steps'})",
                    hint="delete it and re-run with --force to redo every step",
                )
            return state
        if self.out.is_dir() and any(self.out.iterdir()):
            raise MexportError(
                f"{self.out}: exists, is not empty and holds no {STATE_FILE} (not a pipeline output)",
                hint="choose another --output directory",
            )
        return {"steps": {}}

    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, (strict_json.dumps(self.state, indent=2, sort_keys=True) + "\n").encode())

    def step(
        self, name: str, settings: dict[str, Any], target: Path, action: Callable[[], str], marker: str = MANIFEST_NAME
    ) -> str:
        """Run ``action`` (which writes ``target`` and returns a short detail) unless it is already up to date.

        Up to date: the same settings hash as the last successful run, and its output verified: every file an
        artifact's manifest records matches its hash (other outputs: the file hashes the state recorded). A step
        whose output is missing, truncated or modified runs again.

        Returns the step's hash (its settings and its output's file hashes), which downstream steps fold into
        theirs: a step that ran again with a different result invalidates what depends on it.
        """
        digest = settings_hash(settings)
        previous = self.state["steps"].get(name, {})
        if not self.force and previous.get("hash") == digest and previous.get("status") == "done":
            try:
                outputs = _verified_outputs(target, marker, previous.get("files"))
            except MexportError as exc:
                console.warn(f"{name}: its earlier output cannot be trusted ({exc.message}); running it again")
            else:
                console.info(f"[dim]{name}: up to date, verified, skipped (resume)[/dim]")
                self.steps.append(StepRecord(name, "resumed", str(target), 0.0, previous.get("detail", "")))
                return settings_hash({"settings": digest, "outputs": outputs})
        console.info(f"[bold]{name}[/bold] → {target}")
        started = time.perf_counter()
        self.state["steps"][name] = {"hash": digest, "status": "running", "output": str(target)}
        self._save_state()
        try:
            detail = action()
        except MexportError as exc:
            self._record(name, digest, target, "failed", started, exc.message)
            raise
        files = None if marker == MANIFEST_NAME else file_records(target)
        self._record(name, digest, target, "done", started, detail, files)
        return settings_hash({"settings": digest, "outputs": _verified_outputs(target, marker, files, verify=False)})

    def skip(self, name: str, reason: str) -> None:
        console.info(f"[yellow]{name}: skipped[/yellow] ({reason})")
        self.steps.append(StepRecord(name, "skipped", None, 0.0, reason))

    def _record(
        self, name: str, digest: str, target: Path, status: str, started: float, detail: str,
        files: dict[str, Any] | None = None,
    ) -> None:
        seconds = round(time.perf_counter() - started, 2)
        self.state["steps"][name] = {
            "hash": digest, "status": status, "output": str(target), "detail": detail, "files": files
        }
        self._save_state()
        self.steps.append(StepRecord(name, status, str(target), seconds, detail))


def _verified_outputs(
    target: Path, marker: str, files: dict[str, Any] | None, verify: bool = True
) -> dict[str, str]:
    """Name -> sha256 of a step's output files: an artifact's per its manifest (checked by :func:`verify_artifact`),
    anything else (fixture checkpoint, engine plan, report) per the hashes the state recorded when it was written.
    ``verify=False`` right after the step wrote them (hashing the 9B's weights twice in a row proves nothing)."""
    if marker == MANIFEST_NAME:
        files = read_manifest(target, verify=verify).get("files")
    elif not (target / marker).is_file():
        raise IntegrityError(f"{target / marker}: missing")
    elif verify:
        verify_files(target, {"files": files}, remember=False)
    if not isinstance(files, dict):
        raise IntegrityError(f"{target}: no recorded file hashes")
    return {name: record["sha256"] for name, record in files.items()}


def _checkpoint_fingerprint(model: str) -> dict[str, Any]:
    """The sha256 of every file of a local checkpoint (a hub id stands for itself), so a checkpoint edited or
    replaced in place, whatever its timestamps, re-runs every step that read it."""
    path = Path(model)
    if not path.is_dir():
        return {"hub_id": model}
    names = [p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]  # hidden: stamps, locks
    return hash_files(path, names).sha256


def _input_file_hashes(config: PipelineConfig) -> dict[str, Any]:
    """The content of the data and calibration files a run reads (by sha256), for the steps' resume keys: a file
    edited in place re-runs what read it. Hub datasets and task names stand for themselves."""

    data = {task: sha256_file(data_file(task, source)) for task, source in sorted(config.data.items())}
    calib = config.calib
    return {"data": data, "calib": sha256_file(Path(calib)) if calib and calib not in calibration_task_names() else calib}


def run_pipeline(config: PipelineConfig, force: bool = False) -> PipelineResult:
    """Run every step of ``config``; raises on a step error, returns the result (with ``failed``) otherwise.

    Holds the output's lock throughout: a second pipeline into the same output fails at once."""
    with claimed_output(config.output):
        return _run_steps(_Runner(config, force), config)


def _run_steps(runner: _Runner, config: PipelineConfig) -> PipelineResult:
    out = runner.out

    checkpoint, upstream = _checkpoint_step(runner, config)
    inputs = _input_file_hashes(config)
    export_dir = out / f"onnx-{config.dtype}"
    export_hash = runner.step(
        "export",
        {"upstream": upstream, "revision": config.revision,
         "dtype": config.dtype, "opset": config.opset, "device": config.export_device},
        export_dir,
        lambda: _export(checkpoint, export_dir, config),
    )

    candidates = [(f"onnx-{config.dtype}", export_dir, export_hash)]
    for recipe in config.recipes:
        quant_dir = out / f"quant-{recipe}"
        quant_hash = runner.step(
            f"quantize:{recipe}",
            {"upstream": export_hash, "recipe": recipe, "calib": config.calib, "calib_sha256": inputs["calib"],
             "calib_size": config.calib_size},
            quant_dir,
            lambda recipe=recipe, quant_dir=quant_dir: _quantize(export_dir, quant_dir, recipe, config),
        )
        candidates.append((f"quant-{recipe}", quant_dir, quant_hash))

    engines = _engine_steps(runner, config, candidates)
    engine_labels = {path.name.removeprefix("engine-") for path, _ in engines}
    validated = [
        (path, digest) for label, path, digest in candidates
        if _runs_on_validate_device(runner, config, label, label in engine_labels)
    ] + engines

    report_dir = out / "report"
    validation: dict[str, Any] | None = None
    report_failed = False

    def _validate() -> str:
        nonlocal validation, report_failed

        report = validate(
            checkpoint,
            [path for path, _ in validated],
            config.tasks,
            output=report_dir,
            data=config.data or None,
            limit=config.limit,
            seed=config.seed,
            device=config.device,
            devices=config.devices or None,
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
         "data": config.data, "data_sha256": inputs["data"], "limit": config.limit, "seed": config.seed, "device": config.device,
         "devices": config.devices,
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


def _runs_on_validate_device(runner: _Runner, config: PipelineConfig, label: str, has_engine: bool) -> bool:
    """On a GPU, ONNX Runtime may not fall back to the CPU (hours for the 9B): a quantized model its CUDA provider
    cannot run is left to its TensorRT engine, and the skip is recorded with the reason."""
    recipe = label.removeprefix("quant-")
    if config.device != "cuda" or recipe == label:
        return True

    gap = cuda_recipe_support(recipe, config.dtype)
    if gap is not None:
        instead = "its TensorRT engine is validated instead" if has_engine else "no engine was built (engine.mode)"
        runner.skip(f"validate-ort:{label}", f"ONNX Runtime's CUDA provider cannot run it ({gap}); {instead}")
    return gap is None


def _checkpoint_step(runner: _Runner, config: PipelineConfig) -> tuple[str, str]:
    """The checkpoint to export and its hash for the steps that read it (content included): the model itself, or a
    built-in fixture written into the output first."""
    if not config.model.startswith(FIXTURE_PREFIX):
        files = _checkpoint_fingerprint(config.model)
        return config.model, settings_hash({"model": config.model, "revision": config.revision, "files": files})
    name = config.model[len(FIXTURE_PREFIX):]
    target = runner.out / "checkpoint"

    def _write() -> str:
        write_fixture(name, target, overwrite=True)
        return f"fixture {name}"

    digest = runner.step("checkpoint", {"fixture": name}, target, _write, marker="config.json")
    return str(target), digest


def _export(checkpoint: str, target: Path, config: PipelineConfig) -> str:
    result = export_onnx(
        checkpoint, target, dtype=config.dtype, opset=config.opset, revision=config.revision,
        device=config.export_device, overwrite=True,
    )
    return f"status {result.manifest.get('status')}"


def _quantize(export_dir: Path, target: Path, recipe: str, config: PipelineConfig) -> str:
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

    settings = EngineSettings(**{setting: getattr(config, field) for field, setting in ENGINE_FIELDS.items()})
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
    problem = probe().engine_problem()
    return problem.message if problem else None


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
        "json": write_atomic(out / "pipeline.json", (strict_json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()),
        "markdown": write_atomic(out / "pipeline.md", render_markdown(result).encode()),
        "junit": write_atomic(out / "pipeline-junit.xml", render_junit(result)),
    }
    return paths


def render_markdown(result: PipelineResult) -> str:
    lines = [
        "# mexport pipeline",
        "",
        f"**Result: {verdict_word(result.exit_code)}**",
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
    """One testcase per step: a failed step a failure, a skipped one skipped."""
    outcomes = {"failed": FAILURE, "skipped": SKIPPED}
    cases = [
        JUnitCase("mexport.pipeline", step.name, outcomes.get(step.status), step.detail, seconds=step.seconds)
        for step in result.steps
    ]
    return junit_xml("mexport.pipeline", cases)
