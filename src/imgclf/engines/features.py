"""Frozen-backbone features: computed once per image, cached on disk, fast engines.

The recipe recomputed the frozen VGG-16 every epoch. Here each image's pooled feature
vector is computed once and stored under a key made of backbone + weights identity +
preprocessing + precision (the directory) and the image's content hash (the file), so a
second ``train`` with other head settings does no backbone work at all.

The frozen backbone is exported to ONNX once (kept beside its features) and run on the
fastest engine available: OpenVINO (bf16 where the CPU has it), then ONNX Runtime
(fp32), then eager PyTorch. Decoding runs in a thread pool ahead of inference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.backbones.registry import BackboneSpec, WeightsRef, build_feature_extractor, tensors_digest, weights_fingerprint
from imgclf.fileio import atomic_write_bytes, content_hash
from imgclf.data.preprocess import decode_array as _decode
from imgclf.data.preprocess import decoded_batches

log = logging.getLogger("imgclf")

ENGINES = ("auto", "openvino", "onnxruntime", "torch")
PRECISIONS = ("auto", "fp32", "bf16")

_MAGIC = b"IMGCLF-F1"
_HEADER = struct.Struct("<9sI16s")  # magic, dim, blake2b-16 digest of the payload


class FeatureCache:
    """One small file per (feature key, image content hash), validated on read.

    A truncated, corrupt or foreign file is detected (length, magic, dimension and a
    checksum of the payload), deleted, and reported as a miss so it is recomputed.
    """

    def __init__(self, root: str | os.PathLike, key: str, dim: int):
        self.dir = Path(root) / "features" / key
        self.dim = dim

    def _path(self, h: str) -> Path:
        return self.dir / h[:2] / f"{h}.f32"

    def get(self, h: str) -> np.ndarray | None:
        p = self._path(h)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return None
        payload = raw[_HEADER.size:]
        try:
            magic, dim, digest = _HEADER.unpack_from(raw)
        except struct.error:
            magic, dim, digest = b"", -1, b""
        if (
            magic != _MAGIC
            or dim != self.dim
            or len(payload) != 4 * self.dim
            or hashlib.blake2b(payload, digest_size=16).digest() != digest
        ):
            log.warning("feature cache: corrupt entry %s, recomputing", p)
            try:
                p.unlink()
            except OSError:
                pass
            return None
        return np.frombuffer(payload, dtype="<f4").copy()

    def put(self, h: str, vec: np.ndarray) -> None:
        payload = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        if len(payload) != 4 * self.dim:
            raise ValueError(f"feature of size {vec.size} does not match cache dimension {self.dim}")
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        atomic_write_bytes(self._path(h), _HEADER.pack(_MAGIC, self.dim, digest) + payload)


# --------------------------------------------------------------------------- engines


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
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}")
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


@dataclass
class BackboneRunner:
    """Builds the engine lazily: a run whose features are all cached loads no backbone."""

    spec: BackboneSpec
    weights: WeightsRef
    cache_root: Path
    engine: str = "auto"
    precision: str = "auto"
    seed: int = 0
    _engine: Engine | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}")
        self.precision = resolve_precision(self.precision)
        if self.engine == "onnxruntime" and self.precision == "bf16":
            log.info("onnxruntime runs fp32 on CPU; using fp32")
            self.precision = "fp32"
        self.fingerprint = weights_fingerprint(self.spec, self.weights)
        self.base_fingerprint = self.fingerprint
        self.tuned_digest = None

    @property
    def cache_key(self) -> str:
        return f"{self.spec.name.replace(':', '_')}-{self.fingerprint}-{self.precision}"

    @property
    def onnx_path(self) -> Path:
        return self.cache_root / "backbones" / f"{self.spec.name.replace(':', '_')}-{self.fingerprint}.onnx"

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
        elif self.precision == "fp32":
            order = ["onnxruntime", "openvino", "torch"]  # ORT fp32 was fastest fp32 here
        else:  # bf16: ORT has no bf16 CPU kernels, and torch bf16 beats ORT fp32
            order = ["openvino", "torch"]
        errors = []
        for name in order:
            try:
                if name == "torch":
                    return TorchEngine(module_fn(), self.precision)
                if not onnx_path.is_file():
                    t = time.perf_counter()
                    export_backbone_onnx(module_fn(), self.spec.preprocessing.input_size, onnx_path)
                    log.info("exported %s %s to ONNX in %.1f s: %s", self.spec.name, what, time.perf_counter() - t, onnx_path)
                if name == "openvino":
                    return OpenVinoEngine(onnx_path, self.precision)
                return OnnxRuntimeEngine(onnx_path)
            except Exception as e:  # an engine missing or failing must not stop the run
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                errors.append(f"{name}: {first}")
                log.warning("engine %s unavailable for the %s (%s); trying the next", name, what, first)
        raise RuntimeError(f"no inference engine could run the {what}: " + "; ".join(errors))


# --------------------------------------------------------------------------- extraction


@dataclass
class ExtractionResult:
    features: np.ndarray  # (n_ok, D) float32, rows in the order of ``ok_indices``
    ok_indices: list[int]
    errors: dict[int, str]  # index → one-line reason (decode failures etc.)
    computed: int = 0  # images that went through the backbone
    cached: int = 0
    seconds: float = 0.0
    engine: str = "cache"
    precision: str = ""

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0


def extract_features(
    paths: Sequence[str | os.PathLike],
    runner: BackboneRunner,
    *,
    use_cache: bool = True,
    batch_size: int = 32,
    decode_threads: int = 2,
    progress: Callable[[int], None] | None = None,
    transform=None,
) -> ExtractionResult:
    """Pooled backbone features for ``paths``; bad files come back in ``errors``.

    ``transform`` (an augmented or test-time view with a ``key``) is applied to each
    decoded image before preprocessing; its key is part of the cache key.
    """
    prep = runner.spec.preprocessing
    dim = runner.spec.feature_dim
    key = runner.cache_key
    if transform is not None:
        key += "-" + hashlib.sha256(transform.key.encode()).hexdigest()[:16]
    cache = FeatureCache(runner.cache_root, key, dim) if use_cache else None
    n = len(paths)
    feats: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    hashes: dict[int, str] = {}

    with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
        def _hash(i):
            try:
                return i, content_hash(paths[i]), None
            except OSError as e:
                return i, None, f"{paths[i]}: cannot read ({e.strerror or e})"

        # content hashes key the cache and seed augmented views; plain uncached runs skip them
        need_hash = cache is not None or transform is not None
        for i, h, err in (pool.map(_hash, range(n)) if need_hash else ((i, "", None) for i in range(n))):
            if err:
                errors[i] = err
            else:
                hashes[i] = h
        todo = []
        for i, h in hashes.items():
            vec = cache.get(h) if cache else None
            if vec is not None:
                feats[i] = vec
            else:
                todo.append(i)
        cached = len(feats)
        if progress and cached:
            progress(cached)

        t0 = time.perf_counter()
        engine_name, precision = "cache", runner.precision
        if todo:
            engine = runner.get()
            engine_name, precision = engine.name, engine.precision
            t0 = time.perf_counter()
            decode = lambda i: _decode(str(paths[i]), prep, transform, hashes[i])  # noqa: E731
            for idx, batch, errs in decoded_batches(todo, decode, batch_size, pool):
                errors.update(errs)
                if batch is not None:
                    out = engine(batch)
                    for i, vec in zip(idx, out):
                        feats[i] = vec
                        if cache:
                            cache.put(hashes[i], vec)
                if progress:
                    progress(len(idx) + len(errs))
    seconds = time.perf_counter() - t0 if todo else 0.0
    ok = sorted(feats)
    mat = np.stack([feats[i] for i in ok]).astype(np.float32) if ok else np.zeros((0, dim), np.float32)
    return ExtractionResult(
        features=mat,
        ok_indices=ok,
        errors=dict(sorted(errors.items())),
        computed=len(todo) - sum(1 for i in todo if i in errors),
        cached=cached,
        seconds=seconds,
        engine=engine_name,
        precision=precision,
    )
