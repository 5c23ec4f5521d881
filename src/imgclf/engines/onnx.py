"""ONNX helpers shared by the frozen-backbone engine and the whole-model export: one
exporter call and one ONNX Runtime session setup, so both paths behave the same."""

from __future__ import annotations

import io
import os

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
OPSET = 17


def export_graph_bytes(graph, size: int, output_name: str = OUTPUT_NAME) -> bytes:
    """uint8 (N, 3, size, size) → ``output_name``, dynamic batch, legacy exporter (one call
    for full models and frozen backbones alike)."""
    import warnings

    import torch

    buf = io.BytesIO()
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
        )
    return buf.getvalue()


def ort_session(onnx: bytes | str, threads: int | None = None):
    import onnxruntime as ort

    from imgclf.distributed import threads_per_rank

    so = ort.SessionOptions()
    # under torchrun the ranks of one machine share its cores
    so.intra_op_num_threads = threads or threads_per_rank() or (os.cpu_count() or 1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(onnx, so, providers=["CPUExecutionProvider"])


def run_session(session, arrays: np.ndarray, batch_size: int = 32) -> np.ndarray:
    outs = [session.run(None, {INPUT_NAME: arrays[k:k + batch_size]})[0] for k in range(0, len(arrays), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0, 0), np.float32)
