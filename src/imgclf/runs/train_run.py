"""``train_run()``: one training run from dataset to a complete run folder, callable from Python.

Reads top to bottom in the order it runs (as torchvision's reference trainer does):
check the settings and paths, load the dataset, resolve the backbone, make the run
folder, save the configuration, fit, save the model, evaluate on test, write the
per-image and per-epoch tables, the report. The CLI's ``train`` and ``demo`` call it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from imgclf import distributed
from imgclf.config import layout
from imgclf.config.recipes import make_settings
from imgclf.config.settings import RunOptions, RuntimeOptions, TrainSettings, make_run_options, make_runtime
from imgclf.data.datasets import load_dataset, load_manifest, with_validation_folder, write_split_csv
from imgclf.data.exclusions import apply_exclusions
from imgclf.evaluation.metrics import format_metrics
from imgclf.evaluation.thresholds import apply_threshold
from imgclf.model.run_status import mark_finished, mark_running
from imgclf.fileio import default_cache_dir, file_sha256, is_within, write_csv, write_json
from imgclf.report.cv import small_test_split_note
from imgclf.report.html import write_run_report
from imgclf.runs.cv import format_cv, plan_folds, run_cross_validation
from imgclf.runs.environment import environment_info
from imgclf.runs.folders import attach_run_log, detach, new_run_dir
from imgclf.runs.resume import check_same_split, resumable_config, resumed_options
from imgclf.train.classifier import ImageClassifier

log = logging.getLogger("imgclf")

METRICS_COLUMNS = ["stage", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_calibrated_loss", "best", "lr"]


def format_counts(counts: dict[str, dict[str, int]], class_names: list[str]) -> str:
    """Images per class and split, as a console table."""
    splits = [s for s in ("train", "validation", "test") if s in counts]
    width = max(5, *(len(c) for c in class_names))
    lines = [f"{'class':<{width}}" + "".join(f"{s:>12}" for s in splits) + f"{'total':>10}"]
    for c in class_names:
        row = [counts[s].get(c, 0) for s in splits]
        lines.append(f"{c:<{width}}" + "".join(f"{v:>12d}" for v in row) + f"{sum(row):>10d}")
    tot = [sum(counts[s].values()) for s in splits]
    lines.append(f"{'total':<{width}}" + "".join(f"{v:>12d}" for v in tot) + f"{sum(tot):>10d}")
    return "\n".join(lines)


def prediction_rows(clf) -> list[dict]:
    """Per-image test results of the last evaluation: path, true and predicted class, probabilities."""
    ev = clf.last_eval_
    names = clf.class_names_
    return [
        {"path": p, "true": names[int(t)], "predicted": names[int(k)], **{c: f"{v:.6f}" for c, v in zip(names, pr)}}
        for p, t, pr, k in zip(ev["paths"], ev["y_true"], ev["probs"], apply_threshold(ev["probs"], clf.threshold_))
    ]


def _print_epoch(echo: Callable[[str], None]):
    echo(f"{'stage':>8} {'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8}")

    def on_epoch(row):
        mark = " *" if row["best"] else ""
        echo(f"{row['stage']:>8} {row['epoch']:>5} {row['train_loss']:>10.4f} {row['train_accuracy']:>9.4f} {row['val_loss']:>9.4f} {row['val_accuracy']:>8.4f}{mark}")

    return on_epoch


def _quiet(_text: str) -> None:
    pass


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(layout.CHECKPOINT.format(stage="*")))  # every stage's: head, head2…, finetune


def _dataset_root(data, manifest) -> Path:
    """The folder imgclf must never write into: DATA, or the manifest's folder; exactly one source."""
    if (data is None) == (not manifest):
        raise ValueError("give exactly one of DATA (a dataset folder) and --manifest FILE.csv" if data is None else
                         f"give either DATA ({data}) or --manifest ({manifest}), not both")
    return Path(manifest).parent if manifest else Path(data)


def check_not_beside_images(ds, places: dict[str, Path]) -> None:
    """A manifest may list images outside its own folder: no output goes into their folders either."""
    folders = {Path(os.path.realpath(os.path.dirname(os.path.abspath(s.path)))) for s in ds.all_samples()}
    for what, place in places.items():
        resolved = Path(place).resolve()
        for folder in (resolved, *resolved.parents):
            if folder in folders:
                raise ValueError(f"{what} {place} is inside {folder}, a folder of the manifest's images; imgclf never writes into the dataset folder")


def _torchrun_run(root: Path, resume_dir, settings, runtime, options: dict, run_given: dict, runtime_given: dict) -> tuple[dict, str | None]:
    """Under torchrun without ``--name``: the run folder is named after the job
    (``TORCHELASTIC_RUN_ID``, the same when ``--max-restarts`` restarts it), and an unfinished
    run there with the same settings and data is resumed rather than started again.
    Returns the run options given (with that name) and the folder to resume (or ``resume_dir``)."""
    import re

    from imgclf.config.settings import RUN_FIELDS

    run_id = re.sub(r"[^A-Za-z0-9._-]", "_", os.environ.get("TORCHELASTIC_RUN_ID", ""))
    if resume_dir or run_given.get("name") is not None or not run_id or run_id == "none":  # torchrun's default --rdzv-id names no job
        return run_given, resume_dir
    run_given = {**run_given, "name": f"{RUN_FIELDS['name'].default}-{run_id}"}
    folder = Path(run_given.get("project") or RUN_FIELDS["project"].default) / run_given["name"]
    if not (folder / layout.CONFIG).is_file():
        return run_given, None
    try:
        recorded = resumable_config(folder, root)
        resumed_options(recorded, folder, settings, None, runtime, options, run_given, runtime_given)
    except ValueError as e:
        log.info("torchrun job %s: %s not resumed (%s); a new run folder", run_id, folder, e)
        return run_given, None
    log.info("torchrun job %s restarted: resuming %s from its cache and last checkpoint", run_id, folder)
    return run_given, str(folder)


def _check_same_dataset(ds) -> None:
    """Every rank must see the same images, labels and split (each extracts its share of them)."""
    import hashlib

    listing = "\n".join(f"{split}\t{s.path}\t{s.label}" for split in sorted(ds.samples) for s in ds.samples[split])
    digests = distributed.all_gather_object(hashlib.sha256(f"{ds.class_names}\n{listing}".encode("utf-8", "surrogateescape")).hexdigest())
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"rank(s) {', '.join(map(str, differ))} see other images, labels or split than rank 0; every machine needs the same dataset at the same path")


def _cross_validate(ds, cv_plan, settings, runtime, run_dir: Path, bootstrap: int, fit_summary: dict, echo) -> None:
    """``--cv`` after the model is saved: a failing or interrupted cross-validation (K x R fits,
    possibly hours) costs its own numbers only, never the finished model (the run stays complete)."""
    try:
        cv_table = format_cv(run_cross_validation(ds, cv_plan, settings, runtime, run_dir, bootstrap=bootstrap, fit_summary=fit_summary))
    except KeyboardInterrupt:
        log.warning("cross-validation interrupted: no cv_* files; the model and its test metrics are complete")
        return
    except Exception as e:  # noqa: BLE001 - the model is already saved and tested
        log.warning("cross-validation failed (%s): no cv_* files; the model and its test metrics are complete", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return
    log.debug("%s", cv_table)  # train.log keeps it; the console gets it once, with the test metrics
    echo(cv_table)


def _resolve_options(root: Path, resume_dir, settings, run, runtime, options: dict, run_given: dict, runtime_given: dict):
    """(resume folder, its recorded config or None, settings, run options, runtime options): what
    was given, or with ``--resume`` the run folder's recorded values (flags may only repeat them);
    a torchrun job restarted by ``--max-restarts`` continues its own run."""
    if run is None and distributed.current() is not None:
        run_given, resume_dir = _torchrun_run(root, resume_dir, settings, runtime, options, run_given, runtime_given)
    recorded = None
    if resume_dir:
        recorded = resumable_config(resume_dir, root)
        settings, run, runtime = resumed_options(recorded, resume_dir, settings, run, runtime, options, run_given, runtime_given)
    return resume_dir, recorded, settings or make_settings(**options), run or make_run_options(**run_given), runtime or make_runtime(**runtime_given)


def train_run(
    data: str | os.PathLike | None = None,
    settings: TrainSettings | None = None,
    run: RunOptions | None = None,
    runtime: RuntimeOptions | None = None,
    *,
    command_line: dict | None = None,
    echo: Callable[[str], None] | None = None,
    **options,
) -> dict:
    """Train on ``data`` (or the run option ``manifest``, a CSV) and write a complete run folder; returns the test metrics (with ``run``).

    ``options`` are declared settings, run options or runtime options by name (checked
    here, before any work), e.g. ``train_run("DATA", recipe="fast", epochs=10,
    project="runs")``; or pass the resolved objects. ``command_line`` is what the CLI
    was given (recorded in config.json); ``echo`` prints progress lines (None: silent).
    """
    from imgclf.config.settings import RUN_FIELDS, RUNTIME_FIELDS

    t0 = time.perf_counter()
    echo = echo or _quiet
    run_given = {k: options.pop(k) for k in list(options) if k in RUN_FIELDS}
    runtime_given = {k: options.pop(k) for k in list(options) if k in RUNTIME_FIELDS}
    resume_dir = run.resume if run is not None else run_given.get("resume")
    manifest = run.manifest if run is not None else run_given.get("manifest")
    root = _dataset_root(data, manifest)

    # under torchrun rank 0 alone reads the run folder; every rank gets its decision
    resume_dir, recorded, settings, run, runtime = distributed.main_decides(functools.partial(
        _resolve_options, root, resume_dir, settings, run, runtime, options, run_given, runtime_given))
    cache_dir = Path(runtime.cache_dir) if runtime.cache_dir else default_cache_dir()
    if is_within(Path(run.project), root):
        raise ValueError(f"project {run.project} is inside the dataset {root}{' (the manifest folder)' if manifest else ''}; imgclf never writes into the dataset folder")
    if is_within(cache_dir, root):
        raise ValueError(f"cache_dir {cache_dir} is inside the dataset {root}{' (the manifest folder)' if manifest else ''}; imgclf never writes into the dataset folder")

    clf = ImageClassifier(settings=settings, **runtime.to_dict())
    clf.prepare_backbone()  # backbone, weights and unfreeze checked before the dataset scan and before a run folder exists
    clf.stage2_blocks()
    split_options = dict(val_fraction=0.0 if run.validation else settings.val_fraction, test_fraction=settings.test_fraction, seed=settings.seed)
    ds = load_manifest(manifest, **split_options) if manifest else load_dataset(root, **split_options)
    if manifest:
        check_not_beside_images(ds, {"project": Path(run.project), "cache_dir": cache_dir})
    if run.validation:  # the validation folder replaces carving: train keeps all its images
        ds = with_validation_folder(ds, run.validation)
    excluded: list[tuple[str, str]] = []
    if run.exclude:  # images the user rejected (imgclf audit): dropped here, each logged and listed in skipped.csv
        ds, excluded, unmatched = apply_exclusions(ds, run.exclude)
    cv_plan = plan_folds(ds, run.cv, run.cv_repeats, settings.seed) if run.cv else None  # K too large: refused before the run folder
    if distributed.current() is not None:
        _check_same_dataset(ds)
        if not distributed.is_main():  # the same computation as rank 0 (features sharded, head taken from rank 0); no files, no output
            clf.fit(ds)
            return clf.evaluate(bootstrap=run.bootstrap)
    if recorded is not None:
        run_dir = Path(resume_dir)
        check_same_split(ds, run_dir)
    else:
        run_dir = new_run_dir(run.project, run.name)
    status = mark_running(run_dir)
    handler = attach_run_log(run_dir)
    try:
        log.info("run folder: %s", run_dir)
        log.info("device: %s (--device %s)", clf.backbone_runner().device, runtime.device)
        log.info("dataset %s (%s layout), %d classes: %s", manifest or root, ds.layout, len(ds.class_names), ", ".join(ds.class_names))
        for split, src in ds.split_source.items():
            log.info("  %s: %s", split, src)
        for p in ds.ignored:
            log.info("ignored stray entry %s", p)
        for p, why in excluded:
            log.info("%s: %s", why, p)
        if run.exclude:
            log.info("--exclude %s: %d image(s) left out%s", run.exclude, len(excluded), f", {len(unmatched)} listed path(s) match no image of the dataset" if unmatched else "")
        echo(format_counts(ds.counts(), ds.class_names))
        config = {**recorded, "resumed": [*recorded.get("resumed", []), {
            "at": status["started"], "args": command_line if command_line is not None else {**options, **run_given, **runtime_given},
        }]} if recorded is not None else {
            "command": "train",
            "args": command_line if command_line is not None else {**options, **run.to_dict()},
            "settings": settings.to_dict(),
            "run": run.to_dict(),
            "runtime": runtime.to_dict(),
            "dataset": {"root": str(root.resolve()), "layout": ds.layout, "class_names": ds.class_names, "split_source": ds.split_source,
                        "split_seed": settings.seed, "counts": ds.counts(),
                        **({"manifest": str(Path(manifest).resolve()), "manifest_sha256": file_sha256(manifest)} if manifest else {})},
            "environment": environment_info(),
        }
        write_json(run_dir / layout.CONFIG, config)
        if recorded is None:
            write_split_csv(ds, run_dir / layout.SPLIT)
        else:
            log.info("resuming run %s (%s)", run_dir, "checkpoints: " + (", ".join(p.name for p in _checkpoints(run_dir) if p.exists()) or "none, the run starts again from its first epoch"))

        clf.fit(ds, on_epoch=_print_epoch(echo), checkpoint_dir=run_dir)
        for st in clf.fit_summary_["stages"]:
            log.info("%s: best epoch %d of %d (%s)", st["stage"], st["best_epoch"], st["epochs_run"], st["monitor"])
        write_csv(run_dir / layout.EPOCH_METRICS, clf.history_, METRICS_COLUMNS)
        clf.save(run_dir)

        metrics = clf.evaluate(bootstrap=run.bootstrap)
        distributed.work_alone()  # under torchrun the other ranks are done: the rest is rank 0's, as a single process
        metrics["run"] = str(run_dir)
        write_json(run_dir / layout.TEST_METRICS, metrics)
        write_csv(run_dir / layout.TEST_PREDICTIONS, prediction_rows(clf), ["path", "true", "predicted", *clf.class_names_])
        skipped = excluded + [(str(p), e) for p, e in ds.unreadable] + clf.skipped_ + [(s["path"], s["error"]) for s in metrics["skipped"]]
        write_csv(run_dir / layout.SKIPPED, [{"path": p, "error": e} for p, e in skipped], ["path", "error"])
        if cv_plan is not None:  # the bundle above is the normal run's; the fold models are only measured (runs/cv.py)
            _cross_validate(ds, cv_plan, settings, runtime, run_dir, run.bootstrap, clf.fit_summary_, echo)
        ex = clf.last_extraction_
        config["fit_summary"] = clf.fit_summary_
        config["backbone_engine"] = {"engine": ex.engine, "precision": ex.precision, "device": clf.backbone_runner().device}
        config["wall_seconds"] = round(time.perf_counter() - t0, 3)
        write_json(run_dir / layout.CONFIG, config)

        if run.report:
            try:
                echo(f"report: {write_run_report(run_dir, clf=clf)}")
            except Exception as e:  # noqa: BLE001 - the run succeeded; `imgclf report RUN` can redo it
                log.warning("report.html not written (%s); regenerate with: imgclf report %s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, run_dir)
        echo(format_metrics(metrics))
        small_test = small_test_split_note(metrics)
        if small_test:
            log.debug("%s", small_test)
            echo(small_test)
        if skipped:
            echo(f"skipped {len(skipped)} unreadable file(s) or folder(s): listed in {run_dir / layout.SKIPPED}")
        log.info("wall time %.1f s", time.perf_counter() - t0)
        for checkpoint in _checkpoints(run_dir):  # the bundle is the result now; a complete run is never resumed
            checkpoint.unlink(missing_ok=True)
        mark_finished(run_dir, status)
        echo(f"run folder: {run_dir}")
        return metrics
    except BaseException as e:
        done = mark_finished(run_dir, status, e)
        # into train.log only: the console gets the CLI's one error line
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s", (done["error"],), None))
        raise
    finally:
        detach(handler)
