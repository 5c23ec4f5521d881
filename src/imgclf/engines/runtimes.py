"""The inference runtimes a frozen backbone can run on (OpenVINO, ONNX Runtime, eager
PyTorch) behind one call signature, and the precision each may use on this CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imgclf.config.settings import PRECISIONS
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


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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
    def __init__(self, module, precision: str):
        import torch

        self.torch = torch
        self.module = module.eval().to(memory_format=torch.channels_last)
        self.name = "torch"
        self.precision = precision

    def __call__(self, batch):
        torch = self.torch
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = self.module(x)
            else:
                out = self.module(x)
        return out.float().numpy()


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

        core = ov.Core()
        hint = "bf16" if precision == "bf16" else "f32"
        self.compiled = core.compile_model(
            str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        )
        self.name = "openvino"
        self.precision = precision

    def __call__(self, batch):
        return np.asarray(self.compiled(batch)[0], dtype=np.float32)


def export_backbone_onnx(module, input_size: int, path: Path) -> Path:
    """Export the frozen feature extractor (uint8 in, features out, dynamic batch), atomically."""
    from imgclf.engines.onnx import export_graph_bytes

    atomic_write_bytes(path, export_graph_bytes(module.eval(), input_size, output_name="features"))
    return path
