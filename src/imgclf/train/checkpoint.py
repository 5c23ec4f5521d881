"""Per-stage training checkpoints, so a killed run resumes from its last complete epoch.

After an epoch (at most every ``SAVE_EVERY_S``, and when the stage ends)
:func:`imgclf.train.loops.fit_loop` writes the whole state of its loop into one file per stage (``layout.CHECKPOINT``): model, optimiser, best-so-far model and the
torch generator/RNG states as tensors, everything else (epoch, best score, patience
counter, history rows, optimiser groups, scheduler counters, numpy and Python RNG states)
as JSON in the safetensors header. One file, written with ``atomic_write_bytes``, so a kill
leaves the previous epoch's checkpoint or the new one, never a mix; no pickle anywhere.
Restoring all of it makes the remaining epochs draw the same random numbers as an
uninterrupted run, so the resumed run ends with the same model.

The file records what it belongs to (the stage's settings, data shapes, a digest of the
labels): a checkpoint of other settings or data is refused. A file that fails its checksum
is reported and ignored; the stage then starts again from its first epoch (same seed, same
result, only slower).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgclf.fileio import atomic_write_bytes, content_hash_or_empty

log = logging.getLogger("imgclf")

FORMAT = "imgclf-checkpoint-1"
# an epoch's state is written once this many seconds have passed since the stage began or last
# wrote one (and always when the stage ends): a head epoch on cached features takes milliseconds,
# its checkpoint (hash + atomic write) longer, so writing every epoch would cost more than a
# kill can lose; a stage-2 epoch takes longer than this and is written every epoch
SAVE_EVERY_S = 10.0


def save_every_s() -> float:
    """``SAVE_EVERY_S``, or ``$IMGCLF_CHECKPOINT_EVERY_S`` (0: every epoch, as the resume tests need)."""
    value = os.environ.get("IMGCLF_CHECKPOINT_EVERY_S")
    if value is None:
        return SAVE_EVERY_S
    try:
        return max(0.0, float(value))
    except ValueError:
        log.warning("IMGCLF_CHECKPOINT_EVERY_S=%r is not a number of seconds; checkpoints every %g s", value, SAVE_EVERY_S)
        return SAVE_EVERY_S


class CheckpointMismatch(ValueError):
    """A checkpoint made with other settings or data than the stage being resumed."""


@dataclass
class LoopState:
    """Everything ``fit_loop`` needs to continue after ``epoch`` (or, when ``done``, to skip the stage)."""

    epoch: int
    done: bool
    model: dict[str, torch.Tensor]
    history: list[dict]
    best: tuple[float, float]
    best_epoch: int
    stale: int
    best_state: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    generator: torch.Tensor | None = None
    summary: dict | None = None
    rng: dict = field(default_factory=dict)  # torch (tensor), numpy and python global RNG states


def capture_global_rng() -> dict:
    """The global RNG states a training epoch can draw from (dropout uses torch's)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }


def restore_global_rng(rng: dict) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in rng:
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _own(t: torch.Tensor) -> torch.Tensor:
    """A detached contiguous copy: safetensors refuses views that share memory."""
    return t.detach().clone().contiguous()


def _split_optimizer(sd: dict, tensors: dict) -> dict:
    """Optimizer state dict → JSON part; its tensors go into ``tensors`` as ``optim/<param>/<name>``."""
    scalars: dict[str, dict] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = _own(value)
            else:
                scalars.setdefault(str(index), {})[name] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(meta: dict, tensors: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _read_header(raw: bytes) -> dict:
    (size,) = struct.unpack_from("<Q", raw)
    if size > len(raw) - 8:
        raise ValueError("truncated header")
    return json.loads(raw[8:8 + size])


class EpochCheckpoint:
    """The checkpoint file of one training stage; ``fit_loop`` saves to it and resumes from it.

    ``data``: a digest of the training and validation images' bytes (:func:`images_digest`),
    part of the identity, so a state saved on other pictures under the same names and labels
    is refused instead of continued."""

    def __init__(self, path: str | os.PathLike, data: str | None = None):
        self.path = Path(path)
        self.data = data
        self.every_s = save_every_s()
        self._last = time.monotonic()  # the stage begins when its checkpoint object is made

    def due(self) -> bool:
        """Whether an unfinished epoch's state should be written now (see ``SAVE_EVERY_S``)."""
        return time.monotonic() - self._last >= self.every_s

    def _identity(self, identity: dict) -> dict:
        return identity if self.data is None else {**identity, "images": self.data}

    def save(self, state: LoopState, identity: dict) -> None:
        """Write ``state`` atomically (the previous checkpoint stays until the new one is complete)."""
        from safetensors.torch import save

        tensors = {f"model/{k}": _own(v) for k, v in state.model.items()}
        if state.best_state is not None:
            tensors.update({f"best/{k}": _own(v) for k, v in state.best_state.items()})
        if state.generator is not None:
            tensors["rng/generator"] = _own(state.generator)
        if "torch" in state.rng:
            tensors["rng/torch"] = _own(state.rng["torch"])
        optimizer = _split_optimizer(state.optimizer, tensors) if state.optimizer is not None else None
        meta = {
            "epoch": state.epoch, "done": state.done, "history": state.history, "best": list(state.best), "best_epoch": state.best_epoch,
            "stale": state.stale, "has_best_state": state.best_state is not None, "optimizer": optimizer, "scheduler": state.scheduler,
            "summary": state.summary, "rng": {k: v for k, v in state.rng.items() if k != "torch"},
        }
        header = {"format": FORMAT, "identity": json.dumps(self._identity(identity), sort_keys=True), "state": json.dumps(meta), "digest": _tensor_digest(tensors)}
        atomic_write_bytes(self.path, save(tensors, metadata=header))
        self._last = time.monotonic()

    def load(self, identity: dict) -> LoopState | None:
        """The saved state, or None without a (usable) file; raises :class:`CheckpointMismatch`
        when the file belongs to other settings or data."""
        from safetensors.torch import load

        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            header = _read_header(raw).get("__metadata__") or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            tensors = load(raw)
            if _tensor_digest(tensors) != header.get("digest"):
                raise ValueError("checksum mismatch")
            meta = json.loads(header["state"])
            saved_identity = json.loads(header["identity"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is ignored the same way; the stage restarts
            log.warning("checkpoint %s is unreadable (%s); this stage starts again from its first epoch", self.path, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        wanted = json.loads(json.dumps(self._identity(identity), sort_keys=True))  # the same JSON round trip (tuples → lists)
        if "images" in wanted and "images" not in saved_identity:  # written before checkpoints held the images' digest
            log.warning("checkpoint %s predates the images' digest in checkpoints: resumed without checking that the pictures are the same", self.path)
            wanted.pop("images")
        if saved_identity != wanted:
            diff = sorted(k for k in set(saved_identity) | set(wanted) if saved_identity.get(k) != wanted.get(k))
            raise CheckpointMismatch(f"checkpoint {self.path} was made with other {', '.join(diff)}; it cannot be resumed with these")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        rng = dict(meta["rng"])
        if "rng/torch" in tensors:
            rng["torch"] = tensors["rng/torch"]
        return LoopState(
            epoch=meta["epoch"], done=meta["done"], model=part("model/"), history=meta["history"], best=tuple(meta["best"]),
            best_epoch=meta["best_epoch"], stale=meta["stale"], best_state=part("best/") if meta["has_best_state"] else None,
            optimizer=_join_optimizer(meta["optimizer"], tensors) if meta["optimizer"] is not None else None,
            scheduler=meta["scheduler"], generator=tensors.get("rng/generator"), summary=meta["summary"], rng=rng,
        )

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def images_digest(paths) -> str:
    """Digest of the images' bytes in order (an unreadable file counts as empty), part of a
    checkpoint's identity."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(content_hash_or_empty(p).encode() + b"|")
    return h.hexdigest()


def labels_digest(*labels: torch.Tensor) -> str:
    """Digest of label tensors, part of a checkpoint's identity."""
    h = hashlib.blake2b(digest_size=16)
    for y in labels:
        h.update(np.ascontiguousarray(y.numpy(), dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()
