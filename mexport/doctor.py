"""`mexport doctor`: what this machine can do, each line OK / missing with the fix.

Checks never raise: a probe that fails is itself a finding. Heavy modules (torch, onnxruntime, tensorrt) are
imported only here, one at a time, so a broken install shows as one failed line, not a crash.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mexport.errors import first_line
from mexport.formats import EXPORT_DTYPES
from mexport.fsutil import format_bytes
from mexport.hardware import Probe, probe
from mexport.lazy import INSTALL_HINTS
from mexport.optimize.engine.precision import PRECISION_MIN_CAPABILITY
from mexport.optimize.quantize.recipes import RECIPES, cuda_supported_recipes
from mexport.trt_common import TENSORRT_STUBS_ONLY

# Meditron3-Gemma2-9B in bf16: 9.24e9 parameters x 2 bytes.
REAL_MODEL_BF16_BYTES = 18_480_000_000
# Measured peak of `mexport onnx --dtype bf16` with its numeric check on the 9B shape: 21.08 GB (docs/export.md).
EXPORT_RAM_BYTES = 22_000_000_000
# checkpoint (hub cache) + the export's single weight file, both bf16
EXPORT_DISK_BYTES = 2 * REAL_MODEL_BF16_BYTES

OK, MISSING, WARN, INFO = "ok", "missing", "warn", "info"


@dataclass(frozen=True)
class Check:
    """One finding: what was probed, its state, what was seen, and how to fix it when not OK."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", OK if ok else MISSING, platform.python_version(), "" if ok else "install Python >= 3.11")


def check_packages() -> list[Check]:
    required = {"torch": "torch", "transformers": "transformers", "optimum-onnx": "optimum", "onnx": "onnx",
                "typer": "typer"}  # distribution -> import name
    checks = []
    for package, module in required.items():
        version = _version(package)
        fix = "" if version else INSTALL_HINTS[module]
        checks.append(Check(package, OK if version else MISSING, version or "not installed", fix))
    ort_version = _version("onnxruntime") or _version("onnxruntime-gpu")
    checks.append(
        Check(
            "onnxruntime",
            OK if ort_version else MISSING,
            ort_version or "not installed",
            "" if ort_version else INSTALL_HINTS["onnxruntime"],
        )
    )
    return checks


def check_onnxruntime_providers(machine: Probe) -> Check:
    if machine.ort_problem:
        return Check("onnxruntime providers", MISSING, machine.ort_problem, INSTALL_HINTS["onnxruntime"])
    gpu = [p for p in machine.ort_providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return Check(
        "onnxruntime providers",
        OK if gpu else WARN,
        ", ".join(machine.ort_providers),
        "" if gpu else "CPU only: for CUDA runs `pip uninstall onnxruntime && pip install onnxruntime-gpu` on a GPU host",
    )


def check_ort_cuda_recipes(machine: Probe) -> list[Check]:
    """Which recipes ONNX Runtime's CUDA provider runs on the GPU without falling back to the CPU, per export dtype
    (static: from its kernel table, so it answers on a CPU machine too); the others validate through TensorRT.
    "ok" only where this machine has the CUDA provider and a GPU: elsewhere the table is information."""
    checks = []
    for dtype in EXPORT_DTYPES:
        support = cuda_supported_recipes(dtype)
        runs = [name for name, gap in support.items() if gap is None]
        gaps: dict[str, list[str]] = {}
        for name, gap in support.items():
            if gap is not None:
                gaps.setdefault(gap, []).append(name)
        detail = f"{dtype} exports: CUDA runs {', '.join(runs) or 'no recipe'}"
        if gaps:
            detail += "; not " + "; ".join(f"{', '.join(names)}: {gap}" for gap, names in gaps.items())
        fix = "validate those through their TensorRT engine, or with --backend-device cpu" if gaps else ""
        if not machine.ort_cuda:
            detail += " (on a CUDA host; this machine has no ONNX Runtime CUDA provider with a GPU)"
        checks.append(Check(f"onnxruntime-cuda recipes ({dtype})", OK if machine.ort_cuda and not gaps else INFO,
                            detail, fix))
    return checks


def check_cuda_devices(machine: Probe) -> list[Check]:
    if not machine.gpus:
        return [
            Check(
                "cuda",
                MISSING,
                "no CUDA GPU visible (export, quantize, ORT-CPU validation and `engine --plan` still work)",
                "engines need an NVIDIA GPU with CUDA drivers",
            )
        ]
    checks = []
    for index, gpu in enumerate(machine.gpus):
        capability = gpu.compute_capability or (0, 0)
        bf16 = capability >= PRECISION_MIN_CAPABILITY["bf16"]
        fp8 = capability >= RECIPES["fp8"].min_capability
        detail = (
            f"{gpu.name}, {format_bytes(gpu.memory_bytes)}, sm_{capability[0]}{capability[1]}, "
            f"bf16 {'yes' if bf16 else 'no'}, fp8 {'yes' if fp8 else 'no'}"
        )
        fix = "" if bf16 else "the models need bf16 (fp16 overflows Gemma2): use an Ampere (sm_80) or newer GPU"
        checks.append(Check(f"cuda:{index}", OK if bf16 else WARN, detail, fix))
    return checks


def check_tensorrt(machine: Probe) -> list[Check]:
    """TensorRT and Polygraphy; the type stubs alone (what CI installs for mypy) are "not installed", not a fault."""
    fix = (
        "pip install 'mexport[gpu]' on a Linux host with an NVIDIA GPU and CUDA; `mexport engine --plan` works "
        "without it"
    )
    problem = machine.tensorrt_problem
    if problem is None:
        checks = [Check("tensorrt", OK, machine.tensorrt or "?")]
    elif problem.message == TENSORRT_STUBS_ONLY:
        checks = [Check("tensorrt", INFO, problem.message.split(":")[0], fix)]
    else:
        checks = [Check("tensorrt", MISSING, problem.message, fix)]
    try:
        polygraphy = importlib.import_module("polygraphy")
        checks.append(Check("polygraphy", OK, getattr(polygraphy, "__version__", _version("polygraphy") or "?")))
    except Exception as exc:  # noqa: BLE001 - report any broken install as a finding
        checks.append(Check("polygraphy", MISSING, f"not importable ({type(exc).__name__}: {first_line(exc)})", fix))
    return checks


def check_resources(path: Path) -> list[Check]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_disk = shutil.disk_usage(probe).free
    disk_ok = free_disk >= EXPORT_DISK_BYTES
    checks = [
        Check(
            "disk",
            OK if disk_ok else WARN,
            f"{format_bytes(free_disk)} free at {probe} (9B export needs ~{format_bytes(EXPORT_DISK_BYTES)})",
            "" if disk_ok else "free disk space or export to another filesystem with -o",
        )
    ]
    try:
        total_ram = importlib.import_module("psutil").virtual_memory().total
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("ram", WARN, f"cannot read RAM size: {exc}", INSTALL_HINTS["psutil"]))
        return checks
    ram_ok = total_ram >= EXPORT_RAM_BYTES
    checks.append(
        Check(
            "ram",
            OK if ram_ok else WARN,
            f"{format_bytes(total_ram)} (9B bf16 export with validation needs ~{format_bytes(EXPORT_RAM_BYTES)})",
            "" if ram_ok else "export with --no-validate, then validate on a larger machine",
        )
    )
    return checks


def diagnose(path: Path = Path(".")) -> list[Check]:
    """All checks, in the order they print, from one probe of the machine (:func:`mexport.hardware.probe`)."""
    machine = probe()
    return [
        check_python(),
        *check_packages(),
        check_onnxruntime_providers(machine),
        *check_ort_cuda_recipes(machine),
        *check_cuda_devices(machine),
        *check_tensorrt(machine),
        *check_resources(Path(path).resolve()),
    ]


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(check) for check in checks]
