"""One frozen backbone with its weights, identity and fastest runtime, built only when an
image actually has to go through it (a fully cached run loads no backbone).

The frozen backbone is exported to ONNX once (kept beside its features) and run on the
fastest engine available: OpenVINO (bf16 where the CPU has it), then ONNX Runtime
(fp32), then eager PyTorch. With a GPU (``device``), engine auto is eager PyTorch on it
(bf16 autocast where the GPU has bf16, else fp16); ONNX Runtime and OpenVINO stay on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.backbones.modules import build_feature_extractor
from imgclf.backbones.specs import BackboneSpec, WeightsRef
from imgclf.backbones.weights import WeightsFileError, tensors_digest, weights_fingerprint
from imgclf.config.settings import ENGINES
from imgclf.engines.cache import cache_key
from imgclf.engines.runtimes import (
    Engine,
    OnnxRuntimeEngine,
    OpenVinoEngine,
    TorchEngine,
    export_backbone_onnx,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger("imgclf")


@dataclass
class BackboneRunner:
    """Builds the engine lazily: a run whose features are all cached loads no backbone."""

    spec: BackboneSpec
    weights: WeightsRef
    cache_root: Path
    engine: str = "auto"
    precision: str = "auto"
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda | cuda:N, resolved here (resolve_device)
    _engine: Engine | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        self.device = resolve_device(self.device)
        if not self.device.startswith("cpu") and self.engine in ("onnxruntime", "openvino"):
            log.warning("engine %s runs on the CPU; only the torch engine uses %s (fine-tuning still does)", self.engine, self.device)
        self.precision = resolve_precision(self.precision, self.device if self.engine in ("auto", "torch") else "cpu")
        if self.engine == "onnxruntime" and self.precision == "bf16":
            log.info("onnxruntime runs fp32 on CPU; using fp32")
            self.precision = "fp32"
        self.fingerprint = weights_fingerprint(self.spec, self.weights)
        self.base_fingerprint = self.fingerprint
        self.tuned_digest = None

    def cache_key(self, transform=None) -> str:
        """Feature-cache folder of this backbone at its precision (and of ``transform``'s view)."""
        return cache_key(self.spec.name, self.fingerprint, self.precision, transform=transform)

    def exported_onnx_path(self, *qualifiers: str) -> Path:
        """Where the ONNX export of this backbone (or of a part named by ``qualifiers``) is kept."""
        return self.cache_root / "backbones" / f"{cache_key(self.spec.name, self.fingerprint, *qualifiers)}.onnx"

    @property
    def onnx_path(self) -> Path:
        return self.exported_onnx_path()

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = self._make()
        return self._engine

    def apply_tuned(self, tensors: dict) -> None:
        """Use fine-tuned backbone tensors: new identity, so new cache entries and exports."""
        import torch

        fx = self.torch_module()
        own = fx.state_dict()
        bad = [k for k in tensors if k not in own or tuple(own[k].shape) != tuple(tensors[k].shape)]
        if bad:
            raise ValueError(f"fine-tuned tensors do not fit {self.spec.name} (e.g. {bad[0]})")
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)
        self.tuned_digest = tensors_digest(tensors)
        self.fingerprint = hashlib.sha256(f"{self.base_fingerprint}:{self.tuned_digest}".encode()).hexdigest()[:24]
        self._engine = None

    def torch_module(self):
        """The frozen PyTorch feature extractor (built once; for Grad-CAM, export, fine-tuning)."""
        if not hasattr(self, "_fx"):
            self._fx = build_feature_extractor(self.spec, self.weights, seed=self.seed)
        return self._fx

    def _make(self) -> Engine:
        return self.engine_for(self.torch_module, self.onnx_path, "backbone")

    def engine_for(self, module_fn: Callable[[], object], onnx_path: Path, what: str) -> Engine:
        """Fastest engine for a frozen module taking uint8 images (exported to ONNX once)."""
        if self.engine != "auto":
            order = [self.engine]
        elif not self.device.startswith("cpu"):  # a GPU: only eager PyTorch runs there
            order = ["torch"]
        elif self.precision == "fp32":
            order = ["onnxruntime", "openvino", "torch"]  # fastest fp32 first; see benchmarks/README.md
        else:  # bf16: ORT has no bf16 CPU kernels, so only the engines that run bf16
            order = ["openvino", "torch"]
        errors = []
        for name in order:
            try:
                if name == "torch":
                    return TorchEngine(module_fn(), self.precision, self.device)
                if not onnx_path.is_file():
                    t = time.perf_counter()
                    export_backbone_onnx(module_fn(), self.spec.preprocessing.input_size, onnx_path)
                    log.info("exported %s %s to ONNX in %.1f s: %s", self.spec.name, what, time.perf_counter() - t, onnx_path)
                if name == "openvino":
                    return OpenVinoEngine(onnx_path, self.precision)
                return OnnxRuntimeEngine(onnx_path)
            except WeightsFileError:  # the user's file, not the engine: every engine would fail the same way
                raise
            except Exception as e:  # an engine missing or failing must not stop the run
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                errors.append(f"{name}: {first}")
                log.warning("engine %s unavailable for the %s (%s); trying the next", name, what, first)
        raise RuntimeError(f"no inference engine could run the {what}: " + "; ".join(errors))
