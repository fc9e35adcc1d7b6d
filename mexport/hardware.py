"""What can run here: CUDA GPUs, ONNX Runtime's execution providers and TensorRT, asked one way.

`mexport doctor`, the pipeline (build an engine or only plan it) and validate (can a TensorRT engine or an ORT
CUDA session be scored) all read :func:`probe`, so they never disagree about this machine. GPUs come from
torch.cuda when torch sees one, else from ``nvidia-smi`` (a CPU build of torch on a GPU host still finds the GPU
TensorRT builds for). Nothing heavy is imported until a probe runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass

from mexport.errors import EnvironmentFailure, MexportError
from mexport.trt_common import require_tensorrt

MIB = 1 << 20
GPU_HOST_HINT = (
    "build and run engines on a host with an NVIDIA GPU and its driver (check `nvidia-smi`); "
    "`mexport engine MODEL_DIR -o OUT --plan` works without a GPU"
)
ORT_CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class GpuInfo:
    """A GPU's name, memory and compute capability (None when only a memory size was given)."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None = None

    @property
    def capability_text(self) -> str:
        if self.compute_capability is None:
            return "unknown"
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            raise EnvironmentFailure(
                f"unexpected nvidia-smi output line: {line!r}",
                hint="check the NVIDIA driver install (`nvidia-smi` should list each GPU)",
            )
        name, memory_mib, capability = fields
        major, minor = capability.split(".")
        gpus.append(GpuInfo(name, int(float(memory_mib)) * MIB, (int(major), int(minor))))
    return gpus


def _torch_gpus() -> list[GpuInfo]:
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(props.name, int(props.total_memory), (props.major, props.minor)))
    return gpus


def _nvidia_smi_gpus() -> list[GpuInfo]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    query = [executable, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []  # e.g. "No devices were found" or a driver/library mismatch
    return parse_nvidia_smi(result.stdout)


def detect_gpus() -> list[GpuInfo]:
    """Local CUDA GPUs, via torch.cuda when torch is installed, else nvidia-smi; empty when there are none."""
    if importlib.util.find_spec("torch") is not None:
        gpus = _torch_gpus()
        if gpus:
            return gpus
    return _nvidia_smi_gpus()


def _no_gpu() -> EnvironmentFailure:
    return EnvironmentFailure(
        "no CUDA GPU found: TensorRT is installed, but neither torch.cuda nor nvidia-smi sees an NVIDIA GPU",
        hint=GPU_HOST_HINT,
    )


def require_cuda_gpu() -> GpuInfo:
    """The first CUDA GPU (the one TensorRT builds for, asked once TensorRT imports), or a clear error."""
    gpus = detect_gpus()
    if not gpus:
        raise _no_gpu()
    return gpus[0]


def ort_providers() -> tuple[list[str], str | None]:
    """ONNX Runtime's available execution providers, and why there are none when it does not import."""
    try:
        ort = importlib.import_module("onnxruntime")
        return list(ort.get_available_providers()), None
    except Exception as exc:  # noqa: BLE001 - a broken install is an answer, not a crash
        return [], f"onnxruntime unusable: {exc}"


def tensorrt_version() -> str:
    """The installed TensorRT's version, or MissingDependencyError saying why it cannot be used."""
    return require_tensorrt()


@dataclass(frozen=True)
class Probe:
    """One look at the machine: GPUs, ORT providers (or why none), TensorRT's version (or why not)."""

    gpus: tuple[GpuInfo, ...]
    ort_providers: tuple[str, ...]
    ort_problem: str | None
    tensorrt: str | None
    tensorrt_problem: MexportError | None

    @property
    def ort_cuda(self) -> bool:
        """ONNX Runtime can run on a CUDA GPU here (the provider is installed and a GPU is visible)."""
        return ORT_CUDA_PROVIDER in self.ort_providers and bool(self.gpus)

    def engine_problem(self) -> MexportError | None:
        """Why a TensorRT engine cannot be built or run here, or None."""
        if self.tensorrt_problem is not None:
            return self.tensorrt_problem
        return None if self.gpus else _no_gpu()


def probe() -> Probe:
    """What can run here, asked now (GPUs can appear and drivers break, so nothing is cached)."""
    providers, ort_problem = ort_providers()
    try:
        version: str | None = tensorrt_version()
        problem: MexportError | None = None
    except MexportError as exc:
        version, problem = None, exc
    return Probe(tuple(detect_gpus()), tuple(providers), ort_problem, version, problem)
