"""Running one imgclf command as several processes launched by ``torchrun``, on one machine
or many, through PyTorch's own process group (``torch.distributed``): no shared filesystem
is needed, every exchange goes through the group.

``detect()`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``); a plain ``imgclf`` command sees none of it and never touches
``torch.distributed``. ``setup()`` joins the group once (gloo on CPU; gloo for CPU tensors
plus NCCL for CUDA tensors on GPUs) and splits the machine's cores between the ranks on it.

A rank that dies or hangs must not leave the others waiting forever. A dead rank's
connections close, so the others' next exchange fails at once; an exchange that fails raises
:class:`DistributedError` with one line, which the command line prints before exiting 1, and
the SIGTERM torchrun's agent sends to the survivors ends them with one line too (exit 143).
A rank that hangs alive is given up on after ``IMGCLF_DIST_TIMEOUT_S`` (default 6 h, which
must cover the longest wait for another rank's work) per exchange.

Imports nothing from imgclf and torch only inside functions, so ``imgclf --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# One exchange may wait for another rank's long one-sided work (the slowest rank's extraction
# share, rank 0 training the head or stage 2): hours. A rank that dies ends the wait at once
# (its connections close), so the timeout only gives up on a rank that hangs alive.
DEFAULT_TIMEOUT_S = 6 * 3600.0
TIMEOUT_ENV = "IMGCLF_DIST_TIMEOUT_S"
THREADS_ENV = "IMGCLF_THREADS_PER_RANK"


class DistributedError(RuntimeError):
    """A collective failed: another rank died, was stopped, or did not answer in time."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job."""

    world_size: int  # processes in the job, all machines together
    rank: int  # 0 .. world_size - 1; rank 0 writes the outputs
    local_rank: int  # 0 .. local_world_size - 1 on this machine (the GPU index on GPUs)
    local_world_size: int  # processes on this machine
    backend: str  # "gloo", or "cpu:gloo,cuda:nccl" on GPUs

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context: DistContext | None = None
_solo_depth = 0  # > 0 inside solo(): this rank works alone, as a single process
_previous_sigterm = None


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise DistributedError(f"{name} is not set; launch with torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None


def detect() -> DistContext | None:
    """The job this process belongs to, from torchrun's environment; None for a single process
    (``WORLD_SIZE`` unset or 1), which then runs with no distributed setup at all."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None or raw.strip() in ("", "1"):
        return None
    world = _env_int("WORLD_SIZE")
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be at least 1")
    if world == 1:
        return None
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if not 0 <= local_rank < local_world or local_world > world:
        raise DistributedError(f"LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world} do not fit WORLD_SIZE={world}")
    return DistContext(world, rank, local_rank, local_world, backend="gloo")


def timeout_seconds() -> float:
    """The bound on one collective: ``IMGCLF_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return value


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank() -> int | None:
    """CPU threads one process should use: ``IMGCLF_THREADS_PER_RANK`` if set, else under torchrun
    this machine's cores divided by its ranks, so ranks do not fight over cores; None for a
    single process (the engines keep their own defaults)."""
    raw = os.environ.get(THREADS_ENV)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise DistributedError(f"{THREADS_ENV}={raw!r} is not an integer") from None
        if value < 1:
            raise DistributedError(f"{THREADS_ENV}={raw!r} must be at least 1")
        return value
    ctx = current()
    if ctx is None:
        return None
    return max(1, _cores() // ctx.local_world_size)


def decode_threads(requested: int) -> int:
    """Image-decoding threads for this process: ``requested``, capped under torchrun at the
    threads of this rank (the ranks of one machine share its cores)."""
    per_rank = threads_per_rank() if current() is not None else None
    return max(1, min(requested, per_rank)) if per_rank else max(1, requested)


SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process ended by it


def _on_sigterm(signum, frame):
    """torchrun's agent stops the surviving ranks with SIGTERM when one fails: one line, then
    exit at once. Not an exception: it could land inside code that catches broad errors (a
    weights reader) and come out as a wrong message. A run folder left ``running`` by a dead
    process is resumable (``--resume``, or a torchrun restart)."""
    ctx = _context
    who = f"rank {ctx.rank}" if ctx else "this rank"
    try:
        sys.stderr.write(f"imgclf: error: {who} stopped by SIGTERM from the launcher: another rank failed or the job was cancelled\n")
        sys.stderr.flush()
    finally:
        os._exit(SIGTERM_EXIT_CODE)


def setup(device_type: str = "cpu", timeout_s: float | None = None) -> DistContext | None:
    """Join torchrun's process group (once) and return this process's place in it; None when
    there is no torchrun job (nothing is set up then).

    ``device_type`` ``"cuda"``: NCCL for CUDA tensors (this rank's GPU is ``local_rank``) and
    gloo for the CPU tensors the feature exchange uses. ``timeout_s`` bounds every collective
    (default: :func:`timeout_seconds`).
    """
    global _context, _previous_sigterm
    if _context is not None:
        return _context
    ctx = detect()
    if ctx is None:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    timeout = timeout_seconds() if timeout_s is None else float(timeout_s)
    cuda = device_type.startswith("cuda")
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        if not torch.cuda.is_available():
            raise DistributedError("device cuda asked for under torchrun, but no CUDA device is available")
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {ctx.rank}: cannot join the torchrun process group ({_first_line(e)})") from None
    _context = DistContext(ctx.world_size, ctx.rank, ctx.local_rank, ctx.local_world_size, backend)
    threads = threads_per_rank()
    if threads:
        torch.set_num_threads(threads)
    try:
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        _previous_sigterm = None
    return _context


def teardown() -> None:
    """Leave the process group (every rank, at the end of a command) and restore SIGTERM."""
    global _context, _previous_sigterm, _solo_depth
    if _context is None:
        return
    _context = None
    _solo_depth = 0
    if _previous_sigterm is not None:
        try:
            signal.signal(signal.SIGTERM, _previous_sigterm)
        except ValueError:
            pass
        _previous_sigterm = None
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass


def current() -> DistContext | None:
    """The job joined by :func:`setup`; None in a single process and inside :func:`solo`."""
    return None if _solo_depth else _context


def work_alone() -> None:
    """From now until :func:`teardown` this rank works as a single process: for rank 0's part
    of a command after the others left (writing the run folder, its report)."""
    global _solo_depth
    _solo_depth += 1


@contextmanager
def solo():
    """Inside, this rank works as a single process: no sharding, no collectives. For the work
    rank 0 does alone after the others finished (writing the report of a run)."""
    global _solo_depth
    _solo_depth += 1
    try:
        yield
    finally:
        _solo_depth -= 1


def is_main() -> bool:
    """True in rank 0 and in a single process: the one that writes files and prints results."""
    return _context is None or _context.is_main


def world_size() -> int:
    ctx = current()
    return 1 if ctx is None else ctx.world_size


def shard(n: int) -> range:
    """This rank's share of ``n`` items, ``rank::world_size`` (all of them in a single process).

    Deterministic and interleaved, so ranks get similar work whatever the order of the items.
    """
    ctx = current()
    return range(n) if ctx is None else range(ctx.rank, n, ctx.world_size)


def _first_line(e: BaseException) -> str:
    """The first line of an error, without the C++ source location gloo puts in front."""
    import re

    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line)[:300]


def _collective(what: str, fn, *args, **kwargs):
    """Run one collective, turning its failure into a one-line :class:`DistributedError`."""
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # torch's DistBackendError is a RuntimeError
        rank = _context.rank if _context else "?"
        raise DistributedError(
            f"rank {rank}: {what} failed, another rank died, was stopped or did not answer in time "
            f"({_first_line(e)})"
        ) from None


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if current() is None:
        return
    import torch.distributed as dist

    _collective("barrier", dist.barrier)


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
    if current() is None:
        return obj
    import torch.distributed as dist

    box = [obj if _context.rank == src else None]
    _collective("broadcast", dist.broadcast_object_list, box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if current() is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * _context.world_size
    _collective("all_gather_object", dist.all_gather_object, out, obj)
    return out


def all_gather_rows(local: "np.ndarray") -> list["np.ndarray"]:
    """Every rank's array of rows (same dtype and row shape everywhere, any number of rows),
    in rank order, on every rank. Sent as tensors, not pickles, so large feature matrices
    travel efficiently."""
    import numpy as np

    local = np.ascontiguousarray(local)
    if current() is None:
        return [local]
    import torch
    import torch.distributed as dist

    metas = all_gather_object((tuple(local.shape), local.dtype.str))
    row_shapes = {shape[1:] for shape, _ in metas}
    dtypes = {dt for _, dt in metas}
    if len(row_shapes) != 1 or len(dtypes) != 1:
        raise DistributedError(f"ranks disagree on the rows to gather: shapes {sorted(row_shapes)}, dtypes {sorted(dtypes)}")
    row_shape, dtype = row_shapes.pop(), np.dtype(dtypes.pop())
    longest = max(shape[0] for shape, _ in metas)
    if longest == 0:
        return [np.zeros((0, *row_shape), dtype) for _ in metas]
    padded = np.zeros((longest, *row_shape), dtype)
    padded[: len(local)] = local
    tensor = torch.from_numpy(padded)
    received = [torch.empty_like(tensor) for _ in metas]
    _collective("all_gather", dist.all_gather, received, tensor)
    return [t.numpy()[: shape[0]] for t, (shape, _) in zip(received, metas)]


def gather_rows(local: "np.ndarray", local_indices, n_total: int) -> "np.ndarray":
    """The full (n_total, ...) array on every rank, in original order: each rank holds the rows
    ``local_indices`` (e.g. its :func:`shard`); together the ranks must cover every index."""
    import numpy as np

    local = np.asarray(local)
    local_indices = np.asarray(list(local_indices), dtype=np.int64)
    if len(local_indices) != len(local):
        raise ValueError(f"{len(local)} rows but {len(local_indices)} indices")
    parts = all_gather_rows(local)
    index_parts = all_gather_rows(local_indices)
    out = np.zeros((n_total, *local.shape[1:]), local.dtype)
    seen = np.zeros(n_total, bool)
    for rows, idx in zip(parts, index_parts):
        if len(idx) and (idx.min() < 0 or idx.max() >= n_total):
            raise ValueError(f"gathered index outside 0..{n_total - 1}")
        out[idx] = rows
        seen[idx] = True
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise ValueError(f"{len(missing)} of {n_total} rows were not held by any rank (first: {int(missing[0])})")
    return out


def items_digest(items) -> str:
    """A digest of a list of paths (or any items with a stable ``str``), to compare across ranks."""
    import hashlib

    digest = hashlib.sha256()
    for item in items:
        digest.update(str(item).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def check_same_items(items, what: str) -> None:
    """Every rank must hold the same ``items`` in the same order before sharding them; a
    machine that sees other files (another dataset version, a missing mount) is refused."""
    digests = all_gather_object((len(items), items_digest(items)))
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(f"rank(s) {', '.join(map(str, differ))} see other {what} than rank 0 "
                               f"({digests[differ[0]][0]} vs {digests[0][0]} items); every machine needs the same files at the same paths")


def map_sharded(items: list, work) -> list:
    """``work(items) -> one result per item``, each rank doing its :func:`shard` alone (inside
    :func:`solo`, so ``work`` may be any single-process code); every rank gets all results in
    the order of ``items``. In a single process this is ``work(items)``."""
    ctx = current()
    if ctx is None:
        return list(work(items))
    check_same_items(items, "inputs")
    mine = shard(len(items))
    with solo():
        local = list(work([items[i] for i in mine]))
    if len(local) != len(mine):
        raise ValueError(f"{len(local)} results for {len(mine)} items")
    out: list = [None] * len(items)
    for rank, part in enumerate(all_gather_object(local)):
        for position, result in zip(range(rank, len(items), ctx.world_size), part):
            out[position] = result
    return out


def main_decides(decide):
    """``decide()`` run on rank 0 only, its result on every rank: for what only rank 0 can see
    (the run folder). A ValueError, FileNotFoundError or PermissionError it raises (a user's
    mistake) is raised on every rank, with the same message. In a single process: ``decide()``."""
    if current() is None:
        return decide()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", decide())
        except (ValueError, FileNotFoundError, PermissionError) as e:
            kind = next(t for t in (FileNotFoundError, PermissionError, ValueError) if isinstance(e, t))
            broadcast_object(("error", kind.__name__, str(e)))
            raise
    kind, *rest = broadcast_object(outcome)
    if kind == "error":
        raise {"FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError}.get(rest[0], ValueError)(rest[1])
    return rest[0]
