"""``--resume RUN``: which interrupted run folders may be continued, and with which settings.

A resumed run uses the settings recorded in its ``config.json``; a given flag that differs
is refused, as are a complete run, one still training, other data or a changed split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from imgclf.config import layout
from imgclf.config.settings import RunOptions, RuntimeOptions, TrainSettings
from imgclf.data.datasets import read_split_csv
from imgclf.model.run_status import COMPLETE, RUNNING, is_alive, read_status


def resumable_config(run_dir: str | os.PathLike, root: Path) -> dict:
    """The recorded config.json of an interrupted run folder on dataset ``root``; ValueError (one line) otherwise."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / layout.CONFIG).read_text())
    except (OSError, ValueError):
        raise ValueError(f"--resume {run_dir}: not a training run folder (no readable {layout.CONFIG})") from None
    if not isinstance(config, dict) or config.get("command") != "train" or not all(isinstance(config.get(k), dict) for k in ("settings", "run", "runtime", "dataset")):
        raise ValueError(f"--resume {run_dir}: {layout.CONFIG} is not a training run's configuration")
    status = read_status(run_dir) or {"status": RUNNING}
    if status["status"] == COMPLETE:
        raise ValueError(f"--resume {run_dir}: this run is complete; nothing to resume")
    if status["status"] == RUNNING and is_alive(status):
        raise ValueError(f"--resume {run_dir}: this run is still training (pid {status['pid']}); wait for it or stop it first")
    if config["dataset"].get("root") != str(root.resolve()):
        raise ValueError(f"--resume {run_dir}: the run was trained on {config['dataset'].get('root')}, not {root.resolve()}; resume it on the same data")
    return config


def resumed_options(recorded: dict, run_dir, settings, run, runtime, options: dict, run_given: dict, runtime_given: dict):
    """The recorded (settings, run options, runtime options) of a resumed run; ValueError naming
    every given value that differs from the recorded one (progress bars may change)."""
    from imgclf.config.settings import RUN_FIELDS, RUNTIME_FIELDS, TRAIN_FIELDS, SettingError, coerce

    # a run recorded before --heads (or refit) existed trained one head (and no refit): it resumes as it started
    rec_settings = TrainSettings(**{"heads": 1, "refit": False, **{k: v for k, v in recorded["settings"].items() if k in TRAIN_FIELDS}})
    rec_run = RunOptions(**{**{k: v for k, v in recorded["run"].items() if k in RUN_FIELDS}, "resume": str(run_dir)})
    rec_runtime = RuntimeOptions(**{k: v for k, v in recorded["runtime"].items() if k in RUNTIME_FIELDS})
    given = {
        "settings": (rec_settings, TRAIN_FIELDS, settings.to_dict() if settings is not None else options),
        "run": (rec_run, RUN_FIELDS, run.to_dict() if run is not None else run_given),
        "runtime": (rec_runtime, RUNTIME_FIELDS, runtime.to_dict() if runtime is not None else runtime_given),
    }
    not_objects = {"settings": options, "run": run_given, "runtime": runtime_given}
    differ = []
    for what, (rec, fields, values) in given.items():
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SettingError(f"unknown {what}: {', '.join(unknown)}")
        for k, v in values.items():
            if k in ("resume", "progress") or (v is None and values is not_objects[what]):  # None given by name: not given
                continue
            if coerce(v, fields[k]) != getattr(rec, k):
                differ.append(f"{k}={v!r} (recorded: {getattr(rec, k)!r})")
    if differ:
        raise ValueError(f"--resume {run_dir}: the run's recorded settings are used; these differ: {'; '.join(differ)}")
    progress = runtime.progress if runtime is not None else runtime_given.get("progress", rec_runtime.progress)
    return rec_settings, rec_run, dataclasses.replace(rec_runtime, progress=progress)


def check_same_split(ds, run_dir: Path) -> None:
    """A resumed run must see the images and split it started with (``split.csv``)."""
    try:
        recorded = read_split_csv(run_dir / layout.SPLIT)
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume {run_dir}: {layout.SPLIT} unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    now = {split: [(Path(os.path.abspath(s.path)), ds.class_names[s.label]) for s in ds.samples.get(split, [])] for split in recorded}
    changed = [split for split in recorded if [(Path(p), c) for p, c in recorded[split]] != now[split]]
    if changed:
        same_images = sorted((str(p), c) for split in recorded for p, c in recorded[split]) == sorted((str(p), c) for split in now for p, c in now[split])
        why = ("the same images are split differently (an earlier imgclf version carved exact copies apart)" if same_images
               else "the dataset changed since the run started")
        raise ValueError(f"--resume {run_dir}: {why} ({', '.join(changed)} split differs from {layout.SPLIT}); start a new run")
