"""A run folder's status (``run.json``): running → complete | failed, written atomically.

A folder whose training failed, or that a kill left half-written, must not pass for a
usable model: :func:`check_usable` refuses a failed run and warns once about one that never
finished, for every reader of a bundle (evaluate, predict, export, serve, explain, report).
A bundle without ``run.json`` (``ImageClassifier.save``, older runs) is not a run folder and
is not checked.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from pathlib import Path

from imgclf._version import __version__
from imgclf.config import layout
from imgclf.fileio import write_json

log = logging.getLogger("imgclf")

RUNNING, COMPLETE, FAILED = "running", "complete", "failed"
_warned: set[str] = set()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def mark_running(run_dir: str | os.PathLike) -> dict:
    status = {"status": RUNNING, "started": _now(), "finished": None, "error": None, "pid": os.getpid(), "host": socket.gethostname(), "imgclf_version": __version__}
    write_json(Path(run_dir) / layout.STATUS, status)
    return status


def mark_finished(run_dir: str | os.PathLike, status: dict, error: BaseException | None = None) -> dict:
    """``complete``, or ``failed`` with the error's first line."""
    text = None if error is None else (str(error).strip().splitlines() or [type(error).__name__])[0]
    done = {**status, "status": COMPLETE if error is None else FAILED, "finished": _now(), "error": None if error is None else f"{type(error).__name__}: {text}"}
    write_json(Path(run_dir) / layout.STATUS, done)
    return done


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The folder's status, None without ``run.json``; an unreadable file reads as interrupted."""
    path = Path(run_dir) / layout.STATUS
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
        return status if isinstance(status, dict) and status.get("status") in (RUNNING, COMPLETE, FAILED) else {"status": RUNNING}
    except (OSError, ValueError):
        return {"status": RUNNING}


def is_alive(status: dict) -> bool:
    """Is the process that wrote ``status`` still running on this host?"""
    if status.get("host") != socket.gethostname() or not isinstance(status.get("pid"), int):
        return False
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_usable(run_dir: str | os.PathLike) -> None:
    """Refuse a failed run (BundleError-like ValueError); warn once about an unfinished one."""
    status = read_status(run_dir)
    if status is None or status["status"] == COMPLETE:
        return
    if status["status"] == FAILED:
        raise ValueError(f"{run_dir}: this training run failed ({status.get('error') or 'no error recorded'}); its model is not usable, train again")
    key = str(Path(run_dir).resolve())
    if key not in _warned:
        _warned.add(key)
        state = "is still training" if is_alive(status) else "never finished (killed or interrupted)"
        log.warning("%s: this run %s; its model was not evaluated and may be incomplete", run_dir, state)
