"""Run folders: ``runs/<name>/`` per training, never overwritten, files written atomically.

Holds the full config (every flag, versions, split seed), ``split.csv``, per-epoch
``metrics.csv``, the model bundle, ``test_metrics.json``, ``skipped.csv`` and ``train.log``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from imgclf.config import layout

log = logging.getLogger("imgclf")


def new_run_dir(project: str | os.PathLike, name: str) -> Path:
    """Create ``project/name``, or ``name-2``, ``name-3``… if taken (mkdir is the lock)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise ValueError(f"name {name!r}: use letters, digits, '.', '_' or '-'")
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        d = project / (name if k == 1 else f"{name}-{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {project}")


class _Formatter(logging.Formatter):
    def format(self, record):
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


class _CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted, like
    the standard library's last-resort handler: a stderr replaced after setup (a caller's
    redirect, a test runner's capture that is later closed) is followed, never written to stale."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Console handler on stderr for the ``imgclf`` logger (idempotent)."""
    logger = logging.getLogger("imgclf")
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        if getattr(h, "_imgclf_console", False):
            logger.removeHandler(h)
    h = _CurrentStderrHandler()
    h._imgclf_console = True
    h.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    h.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(h)
    logger.propagate = False


def attach_run_log(run_dir: Path) -> logging.Handler:
    """Everything the run logs also goes to ``run_dir/train.log``."""
    h = logging.FileHandler(run_dir / layout.LOG, encoding="utf-8", errors="backslashreplace")  # a non-UTF-8 file name must not break logging
    h.setLevel(logging.DEBUG)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("imgclf").addHandler(h)
    return h


def detach(handler: logging.Handler) -> None:
    logging.getLogger("imgclf").removeHandler(handler)
    handler.close()
