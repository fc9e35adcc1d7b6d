"""TensorRT engines: plan (pure Python, no GPU), build (TensorRT + Polygraphy + CUDA GPU) and run.

``plan_engine`` decides profiles, precision / typing and checks GPU memory from the model directory's manifest;
``build_engine`` builds and writes an engine directory; ``mexport.runtime.trt.TrtDecoder`` runs it.
Importing this package imports neither TensorRT nor torch.
"""

from mexport.optimize.engine.builder import EngineResult, build_engine
from mexport.optimize.engine.gpus import GPU_TARGETS, GpuInfo, detect_gpus
from mexport.optimize.engine.plan import EnginePlan, EngineSettings, MemoryEstimate, plan_engine, write_plan
from mexport.trt_common import require_tensorrt

__all__ = [
    "GPU_TARGETS",
    "EnginePlan",
    "EngineResult",
    "EngineSettings",
    "GpuInfo",
    "MemoryEstimate",
    "build_engine",
    "detect_gpus",
    "plan_engine",
    "require_tensorrt",
    "write_plan",
]
