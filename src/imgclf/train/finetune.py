"""Stage 2 of the ``finetune`` recipe: train the last K backbone blocks with the head.

Speed on a CPU comes from not recomputing what does not change: the frozen prefix
(all blocks before the last K) runs once per image and augmented view, its output is
kept in memory (bf16), and each epoch only runs the trainable tail — bf16 autocast
where the CPU has native bf16 (contiguous layout), else fp32 channels-last (faster for
the depthwise tail in fp32, not once bf16 is on; see benchmarks/README.md). The frozen
prefix itself runs on the same fast engine as feature extraction (exported to ONNX once).
With the feature cache on, the activations are also kept on disk (:class:`PrefixCache`),
so a resumed or repeated stage 2 reads them back instead of running the prefix again, and
the plain view's come from feature extraction itself (:func:`plain_view_extraction`):
each training and validation image goes through the prefix once for both stages.
BatchNorm layers of frozen blocks stay in
eval mode (their statistics never move). By default (``--finetune-bn frozen``) so do the
tail's: their scale and shift train but their running statistics are kept, as Keras
advises for fine-tuning: under batch statistics (``train``) the pretrained features
shift, the training loss jumps at the start of stage 2 and the tuned model struggles to
beat the frozen one (measurements in benchmarks/README.md, "History of stage 2").
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf import distributed
from imgclf.config.settings import TAIL_BN_MODES
from imgclf.data.augment import AugmentConfig, AugmentedView
from imgclf.backbones.blocks import backbone_blocks
from imgclf.engines.cache import ChecksummedFileCache, cache_key
from imgclf.engines.runtimes import cuda_autocast_dtype
from imgclf.fileio import content_hash_or_empty
from imgclf.data.preprocess import decode_array as _decode
from imgclf.data.preprocess import decoded_batches
from imgclf.train.checkpoint import EpochCheckpoint
from imgclf.train.loops import ShardBatch, TrainConfig, epoch_order, fit_loop, loss_denominator, seed_everything

log = logging.getLogger("imgclf")

LAYER_DECAY = 0.5  # discriminative learning rates: each block down gets this times the one above
PREFIX_CACHE_MB = int(os.environ.get("IMGCLF_PREFIX_CACHE_MB", "4096"))


class TailModel(nn.Module):
    """Trainable tail blocks → the entry's pooling → head."""

    def __init__(self, tail: list[nn.Module], pool: nn.Module, head: nn.Module, autocast_bf16: bool, tail_bn: str = "frozen",
                 autocast_dtype: torch.dtype | None = None):
        """``autocast_bf16``: bf16 autocast (the CPU's); ``autocast_dtype`` overrides it (a GPU's bf16
        or fp16). Autocast runs on the device of the inputs. Contiguous layout until
        :meth:`use_channels_last`."""
        super().__init__()
        if tail_bn not in TAIL_BN_MODES:
            raise ValueError(f"finetune_bn must be one of {', '.join(TAIL_BN_MODES)}, got {tail_bn!r}")
        self.tail_bn = tail_bn
        self.tail = nn.Sequential(*tail)
        self.pool = pool
        self.head = head
        self.autocast_bf16 = autocast_bf16
        self.autocast_dtype = autocast_dtype if autocast_dtype is not None else (torch.bfloat16 if autocast_bf16 else None)
        self.channels_last = False  # activations (and conv weights) in channels-last layout

    def use_channels_last(self, on: bool) -> TailModel:
        """The tail's conv weights in channels-last layout (``on``) or back to contiguous; the
        parameters stay the same objects, so the runner's blocks and optimisers see the change."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.tail_bn == "frozen":  # statistics stay; scale and shift still train
            for m in self.tail.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, h):
        h = h.to(torch.float32)
        if self.channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(h.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            f = self.pool(self.tail(h)).flatten(1)
        return self.head(f.float())


def _has_spatial_conv(modules: list[nn.Module]) -> bool:
    """Whether any convolution in ``modules`` has a kernel larger than 1x1 (depthwise included)."""
    return any(isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 for b in modules for m in b.modules())


def split_blocks(fx, spec, unfreeze: int) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    blocks = backbone_blocks(fx, spec)
    if not 1 <= unfreeze <= len(blocks):
        raise ValueError(f"unfreeze must be between 1 and {len(blocks)} for {spec.name} (blocks: {', '.join(n for n, _ in blocks)})")
    return blocks[:-unfreeze], blocks[-unfreeze:]


def tail_state_keys(fx: nn.Module, tail: list[tuple[str, nn.Module]]) -> list[str]:
    """Names (in ``fx.state_dict()``) of every tensor that belongs to the tail blocks."""
    ids = {id(t) for _, m in tail for t in list(m.parameters()) + list(m.buffers())}
    return [k for k, v in fx.state_dict(keep_vars=True).items() if id(v) in ids]


class PrefixModule(nn.Module):
    """uint8 images → frozen prefix activations (normalisation included), for export."""

    def __init__(self, fx, prefix: list[nn.Module]):
        super().__init__()
        self.fx = fx
        self.prefix = nn.Sequential(*prefix)

    def forward(self, x):
        return self.prefix(self.fx.normalize(x))


class PrefixCache(ChecksummedFileCache):
    """Frozen-prefix activations on disk, one checksummed bf16 file per (key, image content hash).

    The key (:func:`prefix_cache_key`) names everything an activation depends on, so an
    entry is reused only where it would be recomputed bit for bit: a resumed run (or a
    second run with other stage-2 settings) reads them instead of running the prefix again.
    """

    def __init__(self, root: str | os.PathLike, key: str, shape: tuple[int, ...]):
        self.shape = tuple(int(d) for d in shape)
        header = _PREFIX_MAGIC + struct.pack(f"<I{len(self.shape)}I", len(self.shape), *self.shape)
        super().__init__(Path(root) / "prefix" / key, header, 2 * math.prod(self.shape), ".bf16", "prefix cache")
        self.hits = 0  # activations read back by compute_prefix

    def get(self, h: str) -> torch.Tensor | None:
        payload = self.get_payload(h)
        return None if payload is None else torch.frombuffer(bytearray(payload), dtype=torch.bfloat16).reshape(self.shape)

    def put(self, h: str, activation: torch.Tensor) -> None:
        if tuple(activation.shape) != self.shape:
            raise ValueError(f"prefix activation of shape {tuple(activation.shape)} does not match the cache's {self.shape}")
        self.put_payload(h, activation.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())


_PREFIX_MAGIC = b"IMGCLF-P1"


def prefix_cache_key(runner, engine, prefix_name: str, transform=None) -> str:
    """Backbone, weights/preprocessing fingerprint, precision, prefix end, engine and view."""
    return cache_key(runner.spec.name, runner.fingerprint, runner.precision, "prefix", prefix_name.replace("/", "_"), engine.name, engine.precision, transform=transform)


def prefix_engine(runner, fx, prefix_named: list[tuple[str, nn.Module]]):
    """The fast engine that runs the frozen prefix (exported to ONNX once), its name (the last
    prefix block, ``input`` when empty) and the shape of one image's activations."""
    prefix = [m for _, m in prefix_named]
    prefix_name = prefix_named[-1][0] if prefix_named else "input"
    with torch.inference_mode():
        s = runner.spec.preprocessing.input_size
        item_shape = tuple(PrefixModule(fx, prefix)(torch.zeros(1, 3, s, s, dtype=torch.uint8))[0].shape)
    engine = runner.engine_for(lambda: PrefixModule(fx, prefix).eval(), runner.exported_onnx_path("prefix", prefix_name),
                               f"frozen prefix (up to {prefix_name})")
    return engine, prefix_name, item_shape


class PrefixThenSuffix:
    """Backbone features computed as suffix(prefix(images)), keeping the prefix activations.

    A fine-tuning run extracts the plain view of its training and validation images this way:
    the prefix runs on the engine stage 2 uses and its activations go to the :class:`PrefixCache`
    (``record``, by content hash), so stage 2 finds the plain view there instead of running the
    prefix a second time; the suffix (the frozen tail blocks and the pooling) is small and runs
    in eager PyTorch fp32. The features equal the whole backbone's up to float rounding, so they
    are cached under the runner's key as usual.
    """

    def __init__(self, prefix, suffix: nn.Module, cache: PrefixCache):
        self.prefix = prefix
        self.suffix = suffix.eval()
        self.cache = cache
        self.name = prefix.name
        self.precision = prefix.precision
        self._last: torch.Tensor | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        act = torch.from_numpy(np.asarray(self.prefix(batch), dtype=np.float32))
        self._last = act
        with torch.inference_mode():
            return self.suffix(act).flatten(1).numpy()

    def record(self, keys: list[str]) -> None:
        """Store the last batch's activations under the images' content hashes."""
        if self._last is not None:
            for key, a in zip(keys, self._last):
                if key:
                    self.cache.put(key, a)
        self._last = None


def plain_view_extraction(runner, unfreeze: int, cache_dir: str | os.PathLike) -> Callable[[], PrefixThenSuffix] | None:
    """An ``engine_factory`` for :func:`~imgclf.engines.extract.extract_features` whose features
    leave stage 2's plain-view prefix activations in the cache (None where that cannot help:
    a GPU, or no stage 2)."""
    if not unfreeze or not str(runner.device).startswith("cpu"):
        return None

    made: list[PrefixThenSuffix] = []  # built once, on the first cache miss

    def make() -> PrefixThenSuffix:
        if not made:
            fx = runner.torch_module().eval()
            prefix_named, tail_named = split_blocks(fx, runner.spec, unfreeze)
            engine, prefix_name, item_shape = prefix_engine(runner, fx, prefix_named)
            suffix = nn.Sequential(*[m for _, m in tail_named], fx.pool)
            made.append(PrefixThenSuffix(engine, suffix, PrefixCache(cache_dir, prefix_cache_key(runner, engine, prefix_name), item_shape)))
        return made[0]

    return make


def tail_features_from_cache(runner, unfreeze: int, paths: list[str], cache_dir: str | os.PathLike, key: str,
                             shape: tuple[int, ...], batch_size: int = 64) -> tuple[np.ndarray, list[int]]:
    """Plain-view features of ``paths`` through the runner's current (tuned) tail and pooling,
    from the prefix activations that stage 2 left in the disk cache under ``key``: (rows,
    indices of ``paths`` found). Images without an entry are left out for the caller to
    extract. The activations were stored in bf16, so the features differ from a whole-backbone
    pass by that rounding: good for finding similar cases, not for decisions."""
    cache = PrefixCache(cache_dir, key, shape)
    fx = runner.torch_module().eval()
    _, tail_named = split_blocks(fx, runner.spec, unfreeze)
    suffix = nn.Sequential(*[m for _, m in tail_named], fx.pool).eval()
    found: list[int] = []
    acts: list[torch.Tensor] = []
    for i, p in enumerate(paths):
        h = content_hash_or_empty(p)
        a = cache.get(h) if h else None
        if a is not None:
            found.append(i)
            acts.append(a)
    rows = []
    with torch.inference_mode():
        for k in range(0, len(acts), batch_size):
            rows.append(suffix(torch.stack(acts[k:k + batch_size]).float()).flatten(1).numpy())
    return (np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, runner.spec.feature_dim), np.float32)), found


def compute_prefix(engine, paths: list[str], prep, transform, hashes: list[str] | None = None, batch_size: int = 32,
                   cache: PrefixCache | None = None) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
    """Frozen-prefix activations (bf16 in memory) for one view of ``paths``; decoding runs ahead.

    An augmented view needs the files' content ``hashes`` (its seed), and so does ``cache``
    (entries are looked up and stored by content hash; only the misses are computed).
    """
    found: dict[int, torch.Tensor] = {}
    if cache is not None and hashes:
        for i, h in enumerate(hashes):
            if h and (a := cache.get(h)) is not None:
                found[i] = a
    todo = [i for i in range(len(paths)) if i not in found]
    computed: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        decode = lambda i: _decode(paths[i], prep, transform, hashes[i] if hashes else "")  # noqa: E731
        for idx, batch, errs in decoded_batches(todo, decode, batch_size, pool):
            errors.update(errs)
            if batch is not None:
                out = torch.from_numpy(np.asarray(engine(batch))).to(torch.bfloat16)
                for k, i in enumerate(idx):
                    computed[i] = out[k]
                    if cache is not None and hashes and hashes[i]:
                        cache.put(hashes[i], out[k])
    ok = sorted([*found, *computed])
    if cache is not None:
        cache.hits += len(found)
    return (torch.stack([found[i] if i in found else computed[i] for i in ok]) if ok else None), ok, errors


class ShardedTail:
    """Stage 2 as DistributedDataParallel over the ranks of a torchrun job (``fit_loop``'s ``parallel``).

    Each rank holds the prefix activations of its shard of the training and validation images.
    Every rank draws the same epoch order (same seed), and each global batch of the single-process
    run is split by who holds its samples: a rank trains on its part, with the loss normalised by
    the whole batch's denominator (:class:`~imgclf.train.loops.ShardBatch`), and DDP's gradient
    all-reduce makes every step the single-process step (up to the order of float sums). The
    validation logits are gathered, so the monitored score is over all of validation, and rank
    0's score is every rank's. ``communication_seconds`` adds up the time in collectives: each
    gradient all-reduce from launch to completion (it may overlap the backward pass) and every
    gather and broadcast.
    """

    def __init__(self, ctx, owner: np.ndarray, local_pos: np.ndarray, val_rows: np.ndarray, broadcast_buffers: bool):
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.is_main = ctx.is_main
        self.owner = torch.from_numpy(np.asarray(owner, np.int64))  # training sample → rank holding its activations
        self.local_pos = torch.from_numpy(np.asarray(local_pos, np.int64))  # training sample → its row here (-1: elsewhere)
        self.val_rows = np.asarray(val_rows, np.int64)  # validation samples held here, in row order
        self.broadcast_buffers = broadcast_buffers  # BatchNorm statistics that move (--finetune-bn train): rank 0's everywhere
        self.communication_seconds = 0.0
        self.current: tuple[int, torch.Tensor] = (0, torch.zeros(0, dtype=torch.long))  # (global batch size, rows here) of the batch in flight

    def _timed(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.communication_seconds += time.perf_counter() - t

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DDP, its dropout layers drawing the global batch's masks (:class:`GlobalBatchDropout`,
        put back by :meth:`unwrap`)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        self._dropouts = []
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout:
                    parent._modules[name] = GlobalBatchDropout(child.p, self)
                    self._dropouts.append((parent, name, child))
        device = next(model.parameters()).device
        # newer torch names the per-forward buffer sync forward_sync_buffers (broadcast_buffers is deprecated);
        # it also syncs buffers once at init, harmless here: every rank starts from the same model
        import inspect

        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers"
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **{sync: self.broadcast_buffers})

        def timed_allreduce(state, bucket):
            start = time.perf_counter()

            def done(fut):
                self.communication_seconds += time.perf_counter() - start
                return fut.value()

            return allreduce_hook(state, bucket).then(done)

        ddp.register_comm_hook(None, timed_allreduce)
        return ddp

    def batches(self, xt: torch.Tensor, yt: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, weights: torch.Tensor | None):
        """This rank's part of each global batch of :func:`~imgclf.train.loops.view_batches` (same draws)."""
        order = epoch_order(yt, cfg, gen)
        view = torch.randint(0, xt.shape[0], (len(yt),), generator=gen) if xt.shape[0] > 1 else torch.zeros(len(yt), dtype=torch.long)
        for k in range(0, len(order), cfg.batch_size):
            idx = order[k:k + cfg.batch_size]
            here = self.owner[idx] == self.rank
            mine = idx[here]
            norm = loss_denominator(yt[idx], weights) / self.world_size
            self.current = (len(idx), torch.nonzero(here).flatten())
            yield ShardBatch(xt[view[mine], self.local_pos[mine]], yt[mine], norm, len(idx), self.world_size)

    def unwrap(self) -> None:
        """The model's own dropout layers back (the head is saved with them)."""
        for parent, name, child in self._dropouts:
            parent._modules[name] = child
        self._dropouts = []

    def gather_logits(self, local: torch.Tensor, n_total: int) -> torch.Tensor:
        return torch.from_numpy(self._timed(distributed.gather_rows, local.numpy(), self.val_rows, n_total))

    def agree(self, obj):
        """Rank 0's ``obj`` on every rank: decisions are made once."""
        return self._timed(distributed.broadcast_object, obj)

    def sum(self, values: list[float]) -> list[float]:
        parts = self._timed(distributed.all_gather_object, list(values))
        return [sum(p[i] for p in parts) for i in range(len(values))]


class GlobalBatchDropout(nn.Module):
    """Dropout whose mask is drawn for the whole global batch, of which this rank keeps its rows.

    Every rank then draws the same random numbers as the single process does for that batch
    (``empty((n, ...)).bernoulli_(1 - p)``, as torch's CPU dropout), so the ranks' global RNG
    streams stay in step and each sample gets the mask it gets in one process.
    """

    def __init__(self, p: float, plan: ShardedTail):
        super().__init__()
        self.p = p
        self.plan = plan

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        n, rows = self.plan.current
        noise = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        noise = noise.div_(1 - self.p) if self.p < 1 else noise
        return x * noise[rows.to(x.device)]


def _gathered(local_global_indices: list[int]) -> tuple[list[int], list[int]]:
    """Every rank's (global) indices, sorted, and the rank holding each."""
    parts = distributed.all_gather_object(list(local_global_indices))
    owned = sorted((i, r) for r, part in enumerate(parts) for i in part)
    return [i for i, _ in owned], [r for _, r in owned]


def tail_autocast(runner, device: torch.device) -> torch.dtype | None:
    """The tail's autocast: bf16 on a CPU with native bf16; on a GPU bf16 where it has it, else
    fp16 (with a GradScaler), unless fp32 was forced; None = fp32."""
    if device.type == "cpu":
        return torch.bfloat16 if runner.precision == "bf16" else None
    if runner.precision == "fp32" and runner.engine in ("auto", "torch"):  # fp32 asked for (a GPU run resolves auto to bf16/fp16)
        return None
    return cuda_autocast_dtype(str(device))


def finetune(
    runner,
    head: nn.Module,
    train_paths: list[str],
    y_train: np.ndarray,
    val_paths: list[str],
    y_val: np.ndarray,
    n_classes: int,
    cfg: TrainConfig,
    *,
    unfreeze: int,
    augment: AugmentConfig,
    views: int,
    tail_bn: str = "frozen",
    on_epoch: Callable[[dict], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
    checkpoint: EpochCheckpoint | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Fine-tune the last ``unfreeze`` blocks + ``head`` in place.

    ``tail_bn``: ``frozen`` keeps the tail's BatchNorm statistics (scale/shift train),
    ``train`` lets them follow the batches. ``cache_dir``: where frozen-prefix activations
    are kept on disk (:class:`PrefixCache`; None: computed every time, held in memory only).
    ``checkpoint``: saved after every epoch and resumed from (see :func:`fit_loop`).
    Returns (tuned backbone tensors keyed as in ``fx.state_dict()``, history, summary);
    the tensors are empty when no fine-tuned epoch beat the starting (frozen) model on
    validation (``cfg.monitor``), in which case that model is kept. The runner's torch module is
    updated in place (its tail blocks are shared).

    The tail trains on ``runner.device`` (a GPU when there is one) and returns to the CPU.
    Under torchrun (:func:`imgclf.distributed.setup` joined) each rank computes the prefix
    activations of its shard of the images and the tail trains as DistributedDataParallel
    (:class:`ShardedTail`); every rank returns the same tensors, and only rank 0 writes the
    checkpoint.
    """
    cfg.validate()
    spec = runner.spec
    fx = runner.torch_module()
    prefix_named, tail_named = split_blocks(fx, spec, unfreeze)
    tail = [m for _, m in tail_named]
    device = torch.device(runner.device)
    autocast_dtype = tail_autocast(runner, device)
    prep = spec.preprocessing
    views = max(1, views if augment.active else 1)
    ctx = distributed.current()
    world = 1 if ctx is None else ctx.world_size
    # this rank's images (all of them in a single process)
    train_mine, val_mine = list(distributed.shard(len(train_paths))), list(distributed.shard(len(val_paths)))
    local_train, local_val = [train_paths[i] for i in train_mine], [val_paths[i] for i in val_mine]

    # memory budget for the cached prefix activations (an empty prefix is the identity)
    engine, prefix_name, item_shape = prefix_engine(runner, fx, prefix_named)
    per_item = math.prod(item_shape) * 2  # bf16 bytes
    slots = PREFIX_CACHE_MB * 2**20 // per_item  # activations that fit in the budget
    most_train, most_val = math.ceil(len(train_paths) / world), math.ceil(len(val_paths) / world)  # the same on every rank
    fit_views = (slots - most_val) // max(1, most_train)
    if fit_views < 1:
        raise ValueError(
            f"fine-tuning {most_train} images with --unfreeze {unfreeze} needs {(most_train + most_val) * per_item / 2**20:.0f} MB "
            f"of cached activations (limit IMGCLF_PREFIX_CACHE_MB={PREFIX_CACHE_MB}); use a smaller --unfreeze or --recipe fast"
        )
    if fit_views < views:
        log.warning("reducing --finetune-views from %d to %d to fit the activation cache", views, fit_views)
        views = fit_views

    t0 = time.perf_counter()

    disk_caches: list[PrefixCache] = []

    def disk_cache(transform=None) -> PrefixCache | None:
        if cache_dir is None:
            return None
        disk_caches.append(PrefixCache(cache_dir, prefix_cache_key(runner, engine, prefix_name, transform), item_shape))
        return disk_caches[-1]

    empty = torch.zeros((0, *item_shape), dtype=torch.bfloat16)
    hashes = val_hashes = None
    if views > 1 or cache_dir is not None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            hashes = list(pool.map(content_hash_or_empty, local_train))
            val_hashes = list(pool.map(content_hash_or_empty, local_val)) if cache_dir is not None else None
    plain, keep, _ = compute_prefix(engine, local_train, prep, None, hashes, cache=disk_cache())
    plain = empty if plain is None else plain
    train_views = [plain]
    if views > 1:
        pos_plain = {i: k for k, i in enumerate(keep)}
    for v in range(1, views):
        view = AugmentedView(augment, v, cfg.seed)
        h, ok, _ = compute_prefix(engine, local_train, prep, view, hashes, cache=disk_cache(view))
        if ok != keep:  # a view that failed to decode falls back to the image's plain view
            pos = {i: k for k, i in enumerate(ok)}
            h = torch.stack([h[pos[i]] if i in pos else plain[pos_plain[i]] for i in keep]) if keep else empty
        train_views.append(h)
    hv, ok_v, _ = compute_prefix(engine, local_val, prep, None, val_hashes, cache=disk_cache())
    prefix_s = time.perf_counter() - t0
    n_prefix = len(keep) * views + len(ok_v)
    n_read = sum(c.hits for c in disk_caches)
    n_run = n_prefix - n_read
    log.info("fine-tune: frozen prefix (up to %s) on %s (%s) for %d image views (%d read from the disk cache) in %.1f s%s, %.0f MB held in memory%s%s",
             prefix_name, engine.name, engine.precision, n_prefix, n_read, prefix_s, f" ({n_run / max(prefix_s, 1e-9):.1f} img/s)" if n_run > 0 else "",
             n_prefix * per_item / 2**20,
             "" if cache_dir is None else f" and kept on disk in {Path(cache_dir) / 'prefix'}",
             "" if ctx is None else f" (rank {ctx.rank} of {world}: its shard)")

    xt = torch.stack(train_views)  # (V, n here, C, H, W) bf16
    xv = hv if hv is not None else empty
    keep_global = [train_mine[i] for i in keep]
    ok_v_global = [val_mine[i] for i in ok_v]
    parallel = None
    if ctx is not None:  # every label, and where each sample's activations are
        keep_all, owners = _gathered(keep_global)
        ok_v_all, _ = _gathered(ok_v_global)
        row_here = {g: k for k, g in enumerate(keep_global)}
        at = {g: k for k, g in enumerate(ok_v_all)}
        parallel = ShardedTail(ctx, owners, [row_here.get(g, -1) for g in keep_all], [at[g] for g in ok_v_global], broadcast_buffers=tail_bn == "train")
        keep_global, ok_v_global = keep_all, ok_v_all
    yt = torch.from_numpy(np.asarray(y_train, np.int64)[keep_global])
    yv = torch.from_numpy(np.asarray(y_val, np.int64)[ok_v_global])

    # seeded here, after everything that may draw random numbers on a cold cache (building
    # the torch module initialises layers before loading weights), so runs repeat exactly
    seed_everything(cfg.seed)
    # trainable: tail + head; frozen prefix stays in eval mode (BN statistics frozen)
    for p in fx.parameters():
        p.requires_grad_(False)
    for m in tail:
        for p in m.parameters():
            p.requires_grad_(True)
    model = TailModel(tail, fx.pool, head, autocast_dtype == torch.bfloat16, tail_bn, autocast_dtype=autocast_dtype).to(device)
    # fp32 on a CPU trains spatial and depthwise convolutions faster channels-last, a tail of 1x1
    # convolutions only slower, and bf16 gained nothing from it (benchmarks/README.md)
    channels_last = device.type == "cpu" and autocast_dtype is None and _has_spatial_conv(tail)
    model.use_channels_last(channels_last)
    for p in model.head.parameters():
        p.requires_grad_(True)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None

    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    for depth, m in enumerate(reversed(tail), start=1):
        groups.append({"params": [p for p in m.parameters()], "lr": cfg.lr * LAYER_DECAY**depth})
    base_lrs = [g["lr"] for g in groups]

    t1 = time.perf_counter()
    try:
        history, summary = fit_loop(model, xt, yt, xv, yv, n_classes, cfg, param_groups=groups, on_epoch=on_epoch, stage="finetune",
                                    keep_start_if_best=True, checkpoint=checkpoint, scaler=scaler, parallel=parallel)
    finally:
        if parallel is not None:
            parallel.unwrap()
        model.use_channels_last(False)  # the runner's blocks go back as they came
        model.to("cpu")  # the tail blocks are the runner's and the head is the classifier's: both live on the CPU
    train_s = time.perf_counter() - t1
    imgs = len(yt) * summary["epochs_run"]
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32")
    summary.update({
        "unfreeze": unfreeze,
        "trainable_blocks": [n for n, _ in tail_named],
        "views": views,
        "prefix_seconds": round(prefix_s, 2),
        "prefix_views_from_cache": n_read,
        "prefix_cache_key": None if cache_dir is None else prefix_cache_key(runner, engine, prefix_name),
        "prefix_shape": list(item_shape),
        "train_seconds": round(train_s, 2),
        "images_per_second": round(imgs / max(train_s, 1e-9), 1),
        "precision": precision,
        "channels_last": channels_last,
        "device": str(device),
        "group_lrs": base_lrs,
        "tail_bn": tail_bn,
    })
    if parallel is not None:
        summary.update({"world_size": world, "communication_seconds": round(parallel.communication_seconds, 3)})
    log.info("fine-tune: %d epochs over the tail at %.1f img/s on %s (%s autocast)%s", summary["epochs_run"], summary["images_per_second"],
             device, precision, "" if parallel is None else f", DistributedDataParallel over {world} ranks ({parallel.communication_seconds:.1f} s in collectives here)")
    for p in fx.parameters():
        p.requires_grad_(False)
    fx.eval()
    head.eval()
    if summary["kept_start"]:
        log.warning("fine-tuning did not beat the frozen model on validation (%s); keeping the frozen model", cfg.monitor)
        return {}, history, summary
    keys = tail_state_keys(fx, tail_named)
    sd = fx.state_dict()
    return {k: sd[k].detach().clone() for k in keys}, history, summary
