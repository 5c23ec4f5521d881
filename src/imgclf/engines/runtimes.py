"""The inference runtimes a frozen backbone can run on (OpenVINO, ONNX Runtime, eager
PyTorch) behind one call signature, and the precision each may use on this CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imgclf.config.settings import PRECISIONS, check_device
from imgclf.fileio import atomic_write_bytes

log = logging.getLogger("imgclf")



def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class DeviceError(ValueError):
    """A ``device`` this machine does not have (one line, before any work)."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → the torch device this process computes on.

    auto: the GPU when ``torch.cuda.is_available()``, else the CPU. Under torchrun (a
    process group joined by :func:`imgclf.distributed.setup`, or torchrun's ``LOCAL_RANK``)
    ``cuda`` and auto's GPU are ``cuda:LOCAL_RANK``, so each rank of a machine has its own GPU.
    CUDA asked for without CUDA, or an index past the last GPU, is a :class:`DeviceError`.
    """
    check = check_device(device) if isinstance(device, str) else "must be text"
    if check:
        raise DeviceError(f"device {check}")
    if device == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "auto" and not available:
        return "cpu"
    if not available:
        raise DeviceError(f"device {device}: CUDA is not available here (torch {torch.__version__}"
                          f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if ":" in device:
        index = int(device.split(":", 1)[1])
        where = ""
        ctx = _context()
        if ctx is not None and ctx.local_world_size > 1:  # every rank of the machine on one GPU: NCCL refuses, late
            raise DeviceError(f"device {device}: under torchrun with {ctx.local_world_size} processes per machine each rank takes GPU "
                              "LOCAL_RANK; use --device cuda or auto (or one process per machine for a chosen GPU)")
    else:
        index, where = _local_rank(), " (torchrun's LOCAL_RANK)"
    if index >= count:
        raise DeviceError(f"device cuda:{index}{where} is out of range: {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return f"cuda:{index}"


def _context():
    from imgclf.distributed import current, detect

    return current() or detect()


def _local_rank() -> int:
    ctx = _context()
    return ctx.local_rank if ctx is not None else 0


def cuda_autocast_dtype(device: str):
    """bf16 where the GPU has it, else fp16 (which needs a GradScaler when training)."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` | ``fp32`` | ``bf16`` → what runs: on the CPU bf16 only with native bf16; on a GPU
    auto and bf16 are bf16 where it has bf16, else fp16 (autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.startswith("cuda") and precision != "fp32":
        import torch

        return "bf16" if cuda_autocast_dtype(device) == torch.bfloat16 else "fp16"
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and not cpu_has_bf16():
        log.warning("this CPU has no native bf16; running fp32")
        return "fp32"
    return precision


class Engine:
    """Runs uint8 (N,3,S,S) batches through the frozen backbone → float32 (N,D)."""

    name: str = "?"
    precision: str = "fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class TorchEngine(Engine):
    """Eager PyTorch on ``device`` (the CPU, or a GPU: the only engine that runs on one);
    bf16/fp16 precision runs under autocast. On a GPU it runs a copy of ``module``, so the
    module itself stays on the CPU for Grad-CAM and export."""

    def __init__(self, module, precision: str, device: str = "cpu"):
        import copy

        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type != "cpu":
            module = copy.deepcopy(module)
        self.module = module.eval().to(self.device, memory_format=torch.channels_last)
        self.name = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def __call__(self, batch):
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    out = self.module(x)
            else:
                out = self.module(x)
        return out.float().cpu().numpy()


class OnnxRuntimeEngine(Engine):
    def __init__(self, onnx_path: Path, threads: int | None = None):
        from imgclf.engines.onnx import ort_session

        self.session = ort_session(str(onnx_path), threads)
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime"
        self.precision = "fp32"

    def __call__(self, batch):
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)


class OpenVinoEngine(Engine):
    def __init__(self, onnx_path: Path, precision: str):
        import openvino as ov

        from imgclf.distributed import threads_per_rank

        core = ov.Core()
        hint = "bf16" if precision == "bf16" else "f32"
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        threads = threads_per_rank()
        if threads:  # under torchrun the ranks of one machine share its cores
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(str(onnx_path), "CPU", config)
        self.name = "openvino"
        self.precision = precision

    def __call__(self, batch):
        return np.asarray(self.compiled(batch)[0], dtype=np.float32)


def export_backbone_onnx(module, input_size: int, path: Path) -> Path:
    """Export the frozen feature extractor (uint8 in, features out, dynamic batch), atomically."""
    from imgclf.engines.onnx import export_graph_bytes

    atomic_write_bytes(path, export_graph_bytes(module.eval(), input_size, output_name="features"))
    return path
