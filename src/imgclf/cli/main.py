"""Command line: a thin face over :class:`imgclf.train.classifier.ImageClassifier` and the run folder.

Errors in the user's input end in one line on stderr and exit code 2; anything
unexpected ends in one line and exit code 1 (``IMGCLF_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from imgclf._version import __version__
from imgclf.fileio import is_within
from imgclf.config.recipes import DEFAULT_RECIPE, RECIPE_NAMES

log = logging.getLogger("imgclf")

EPILOG_TRAIN = """\
dataset layouts: ROOT/{train,validation|val|valid,test}/<class>/<image> or ROOT/<class>/<image>;
missing validation/test splits are carved from train (stratified, seeded, recorded in split.csv).
outputs: PROJECT/NAME[-k]/ with config.json, split.csv, metrics.csv, model.safetensors,
model.json, test_metrics.json, skipped.csv and train.log.
"""


def _add_engine_flags(p: argparse.ArgumentParser, engines=("auto", "openvino", "onnxruntime", "torch"), engine_help="backbone inference engine (default: auto = fastest available)") -> None:
    p.add_argument("--engine", default="auto", choices=list(engines), help=engine_help)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="backbone precision (auto: bf16 where the CPU has it; fp32 forces full precision)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf); never inside the dataset")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from imgclf.config.names import BACKBONE_NAMES, DEFAULT_BACKBONE

    g = p.add_argument_group("model")
    g.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPE_NAMES), help=f"named defaults (any flag below overrides): seed = the tutorial as written (x/255 and sigmoid bugs kept, 5 epochs; comparison only); fast = frozen backbone, cached features, head only; finetune = fast, then the last --unfreeze blocks trained with the head, kept only if they beat the frozen model on validation (--finetune-monitor) (default: {DEFAULT_RECIPE})")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"registry name: {', '.join(BACKBONE_NAMES)} (default: {DEFAULT_BACKBONE})")
    g.add_argument("--weights", default="imagenet", help="imagenet (the entry's pretrained source: cache first, then hub), none, or a .pth/.pt/.bin/.safetensors state-dict path")
    g.add_argument("--head", default=None, choices=["recipe", "linear", "tutorial"], help="recipe: Linear 512 + ReLU + Dropout 0.5 + Linear N; linear: one Linear; tutorial: the recipe head without feature standardisation and with the tutorial's sigmoid before the loss, for comparison (default: recipe; seed: tutorial)")
    g = p.add_argument_group("training (defaults: the recipe's)")
    g.add_argument("--epochs", type=int, default=None, help="maximum head epochs (seed 5, else 30)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate of the head (1e-3)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (32)")
    g.add_argument("--patience", type=int, default=None, help="early stopping: epochs without validation-loss improvement, 0 = off (seed 0, else 5)")
    g.add_argument("--class-weight", default=None, choices=["auto", "balanced", "none"], help="loss class weights; auto = inverse frequency when the largest class is > 1.5x the smallest (seed none, else auto)")
    g.add_argument("--loss", default=None, choices=["ce", "focal"], help="softmax cross-entropy or focal loss (ce)")
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (2.0)")
    g.add_argument("--sampler", default=None, choices=["shuffle", "balanced"], help="shuffle, or class-balanced sampling with replacement (shuffle)")
    g.add_argument("--label-smoothing", type=float, default=None, help="head-stage label smoothing (0)")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha on the trainable part's inputs, 0 = off (0)")
    g.add_argument("--unfreeze", type=int, default=None, help="finetune: number of last backbone blocks to train (entry default, e.g. 3 for efficientnet_lite0, 1 for vgg16)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="finetune: stage-2 epochs (12)")
    g.add_argument("--finetune-lr", type=float, default=None, help="finetune: stage-2 head learning rate; blocks get half per block going down (1e-3)")
    g.add_argument("--finetune-patience", type=int, default=None, help="finetune: stage-2 early stopping patience (4)")
    g.add_argument("--finetune-views", type=int, default=None, help="finetune: augmented views per image whose frozen-prefix activations are computed once and held in memory (4)")
    g.add_argument("--finetune-label-smoothing", type=float, default=None, help="finetune: stage-2 label smoothing (0.1)")
    g.add_argument("--finetune-monitor", default=None, choices=["val_calibrated_loss", "val_accuracy", "val_loss"], help="finetune: what picks the best stage-2 epoch and decides whether it replaces the frozen model: validation cross-entropy after temperature scaling, accuracy (ties: loss), or plain cross-entropy (val_calibrated_loss)")
    g.add_argument("--finetune-cutmix", type=float, default=None, help="finetune: CutMix alpha on the frozen-prefix activation maps in stage 2 (boxes pasted between images, labels mixed by area); with --mixup, one or the other per batch; 0 = off (0)")
    g.add_argument("--finetune-bn", default=None, choices=["frozen", "train"], help="finetune: BatchNorm statistics of the unfrozen blocks: frozen = kept (their scale and shift still train), train = follow the batches (frozen)")
    g = p.add_argument_group("augmentation (training)")
    g.add_argument("--augment", default=None, choices=["none", "light", "strong"], help="preset: light = flips, 90-degree rotations, crop >= 80%% area, jitter 0.1; strong = crop >= 50%%, jitter 0.25 (finetune light, else none)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    g.add_argument("--vflip", action=argparse.BooleanOptionalAction, default=None, help="random vertical flips (lesions have no up)")
    g.add_argument("--rot90", action=argparse.BooleanOptionalAction, default=None, help="random 90-degree rotations")
    g.add_argument("--crop-scale", type=float, default=None, help="random resized crop keeps at least this fraction of the area (1 = off)")
    g.add_argument("--color-jitter", type=float, default=None, help="max relative brightness/contrast/saturation change (0 = off)")
    g.add_argument("--feature-views", type=int, default=None, help="frozen stage: cached augmented views per training image (1)")
    g = p.add_argument_group("decision and evaluation")
    g.add_argument("--threshold-policy", default=None, help="binary: youden | balanced | sensitivity:S | fixed:T, chosen on validation and stored in the model (seed fixed:0.5, else youden)")
    g.add_argument("--tta", default=None, choices=["none", "flips", "d4"], help="test-time augmentation stored with the model: average probabilities over flips/rotations (none)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% confidence intervals (0: none; default: 1000)")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="write plots and report.html into the run folder (default: on)")
    g = p.add_argument_group("data and output")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation, shuffling and augmentation (default: 0)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="fraction of train carved for validation when the dataset has none (default: 0.2)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="fraction of train carved for test when the dataset has none (default: 0.2)")
    g.add_argument("--validation", default=None, help="a folder of class sub-folders to use as the validation split")
    g.add_argument("--project", default="runs", help="parent folder of run folders (default: runs)")
    g.add_argument("--name", default="train", help="run folder name; -2, -3... appended if taken (default: train)")
    _add_engine_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf", description="Folder of labelled images → transfer-learned, evaluated, saved image classifier.")
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and results only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a classifier on a dataset folder", description="Extract (cached) backbone features, train the head, evaluate on test, save a run folder.", epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset root")
    _add_train_flags(p)

    p = sub.add_parser("evaluate", help="metrics of a saved model on a labelled folder", description="Evaluate MODEL on DATA's test/ split, or on all of DATA when it is a folder of class sub-folders.")
    p.add_argument("model", help="run folder or model.json")
    p.add_argument("data", help="dataset root with test/, or a folder of class sub-folders")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--tta", default=None, choices=["none", "flips", "d4"], help="test-time augmentation (default: the model's)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% confidence intervals (0: none; default: 1000)")
    _add_engine_flags(p)

    p = sub.add_parser("predict", help="predict classes of image files or folders", description="Predict each image (folders are searched recursively). A bad file becomes a row with its error.")
    p.add_argument("model", help="run folder or model.json")
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    p.add_argument("--out", default=None, help="write results here (default: stdout)")
    p.add_argument("--format", default=None, choices=["csv", "json"], help="output format (default: from --out's extension, else csv)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--tta", default=None, choices=["none", "flips", "d4"], help="test-time augmentation (default: the model's)")
    _add_engine_flags(p, engines=["auto", "onnx", "torch", "openvino", "onnxruntime"], engine_help="auto: the model's ONNX export (imgclf export) when a valid one exists, else the feature path; onnx: ONNX Runtime on the exported model, exporting now if needed; torch/openvino/onnxruntime: feature path with that backbone engine")

    p = sub.add_parser("inspect", help="counts, image statistics and problems of a dataset", description="Counts per split and class, image sizes, unreadable/truncated/non-image files, exact and near duplicates (perceptual hash) and cross-split leakage. Reads only.")
    p.add_argument("data", help="dataset root")
    p.add_argument("--no-near-duplicates", action="store_true", help="skip the perceptual-hash near-duplicate check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="make a synthetic lesion set, train on it, evaluate", description="Write a small synthetic benign/malignant lesion set, train the default backbone on it offline, evaluate, print the run folder.")
    p.add_argument("--data-dir", default=None, help="where to write the demo set (default: PROJECT/demo-data)")
    p.add_argument("--n-train", type=int, default=40, help="training images per class (default: 40)")
    _add_train_flags(p)
    p.set_defaults(name="demo")
    for module in EXTENSION_MODULES:
        _load_extension(module).register(sub, COMMANDS)
    return parser


# Modules that add sub-commands: each has ``register(subparsers, commands)`` which adds
# its parsers and puts ``name -> function(args) -> int`` into ``commands``.
EXTENSION_MODULES = ("imgclf.cli.report", "imgclf.cli.deploy")


def _load_extension(name: str):
    import importlib

    return importlib.import_module(name)


# --------------------------------------------------------------------------- commands


def _classifier_from_args(args):
    from imgclf.train.classifier import ImageClassifier

    return ImageClassifier(
        backbone=args.backbone, weights=args.weights, recipe=args.recipe, head=args.head, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, patience=args.patience, class_weight=args.class_weight, loss=args.loss,
        focal_gamma=args.focal_gamma, sampler=args.sampler, label_smoothing=args.label_smoothing, mixup=args.mixup,
        augment=args.augment, hflip=args.hflip, vflip=args.vflip, rot90=args.rot90, crop_scale=args.crop_scale,
        color_jitter=args.color_jitter, feature_views=args.feature_views, unfreeze=args.unfreeze,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, finetune_patience=args.finetune_patience,
        finetune_views=args.finetune_views, finetune_label_smoothing=args.finetune_label_smoothing, finetune_bn=args.finetune_bn, finetune_monitor=args.finetune_monitor, finetune_cutmix=args.finetune_cutmix, threshold_policy=args.threshold_policy, tta=args.tta, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, engine=args.engine,
        precision=args.precision, cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.no_progress,
    )


def format_counts(counts: dict[str, dict[str, int]], class_names: list[str]) -> str:
    splits = [s for s in ("train", "validation", "test") if s in counts]
    width = max(5, *(len(c) for c in class_names))
    lines = [f"{'class':<{width}}" + "".join(f"{s:>12}" for s in splits) + f"{'total':>10}"]
    for c in class_names:
        row = [counts[s].get(c, 0) for s in splits]
        lines.append(f"{c:<{width}}" + "".join(f"{v:>12d}" for v in row) + f"{sum(row):>10d}")
    tot = [sum(counts[s].values()) for s in splits]
    lines.append(f"{'total':<{width}}" + "".join(f"{v:>12d}" for v in tot) + f"{sum(tot):>10d}")
    return "\n".join(lines)


def run_train(args) -> dict:
    """The ``train`` command (and the second half of ``demo``); returns the test metrics."""
    from imgclf.data.datasets import load_dataset, with_validation_folder, write_split_csv
    from imgclf.runs.environment import environment_info
    from imgclf.evaluation.metrics import format_metrics
    from imgclf.fileio import write_csv, write_json
    from imgclf.runs.folders import attach_run_log, detach, new_run_dir

    t0 = time.perf_counter()
    root = Path(args.data)
    clf = _classifier_from_args(args)
    ds = load_dataset(root, val_fraction=0.0 if args.validation else args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    if args.validation:  # the validation folder replaces carving: train keeps all its images
        ds = with_validation_folder(ds, args.validation)
    if is_within(Path(args.project), root):
        raise ValueError(f"--project {args.project} is inside the dataset {root}; imgclf never writes into the dataset folder")
    if is_within(clf.cache_dir, root):
        raise ValueError(f"--cache-dir {clf.cache_dir} is inside the dataset {root}; imgclf never writes into the dataset folder")
    clf.backbone_runner()  # resolve backbone + weights now: fail before a run folder exists
    run_dir = new_run_dir(args.project, args.name)
    handler = attach_run_log(run_dir)
    try:
        log.info("run folder: %s", run_dir)
        log.info("dataset %s (%s layout), %d classes: %s", root, ds.layout, len(ds.class_names), ", ".join(ds.class_names))
        for split, src in ds.split_source.items():
            log.info("  %s: %s", split, src)
        for p in ds.ignored:
            log.info("ignored stray entry %s", p)
        print(format_counts(ds.counts(), ds.class_names), flush=True)
        config = {
            "command": "train",
            "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "settings": clf.settings,
            "dataset": {"root": str(root.resolve()), "layout": ds.layout, "class_names": ds.class_names, "split_source": ds.split_source, "split_seed": args.seed, "counts": ds.counts()},
            "environment": environment_info(),
        }
        write_json(run_dir / "config.json", config)
        write_split_csv(ds, run_dir / "split.csv")

        print(f"{'stage':>8} {'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8}", flush=True)

        def on_epoch(row):
            mark = " *" if row["best"] else ""
            print(f"{row['stage']:>8} {row['epoch']:>5} {row['train_loss']:>10.4f} {row['train_accuracy']:>9.4f} {row['val_loss']:>9.4f} {row['val_accuracy']:>8.4f}{mark}", flush=True)

        clf.fit(ds, on_epoch=on_epoch)
        ex = clf.last_extraction_
        for st in clf.fit_summary_["stages"]:
            log.info("%s: best epoch %d of %d (%s)", st["stage"], st["best_epoch"], st["epochs_run"], st["monitor"])
        write_csv(run_dir / "metrics.csv", clf.history_, ["stage", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_calibrated_loss", "best", "lr"])
        clf.save(run_dir)
        metrics = clf.evaluate(bootstrap=args.bootstrap)
        metrics["run"] = str(run_dir)
        write_json(run_dir / "test_metrics.json", metrics)
        write_csv(run_dir / "test_predictions.csv", prediction_rows(clf), ["path", "true", "predicted", *clf.class_names_])
        skipped = clf.skipped_ + [(s["path"], s["error"]) for s in metrics["skipped"]]
        write_csv(run_dir / "skipped.csv", [{"path": p, "error": e} for p, e in skipped], ["path", "error"])
        config["fit_summary"] = clf.fit_summary_
        config["backbone_engine"] = {"engine": ex.engine, "precision": ex.precision}
        config["wall_seconds"] = round(time.perf_counter() - t0, 3)
        write_json(run_dir / "config.json", config)
        if args.report:
            from imgclf.report.html import write_run_report

            try:
                print(f"report: {write_run_report(run_dir, clf=clf)}", flush=True)
            except Exception as e:  # noqa: BLE001 - the run succeeded; `imgclf report RUN` can redo it
                log.warning("report.html not written (%s); regenerate with: imgclf report %s", _one_line(e), run_dir)
        print(format_metrics(metrics), flush=True)
        if skipped:
            print(f"skipped {len(skipped)} unreadable file(s): listed in {run_dir / 'skipped.csv'}", flush=True)
        log.info("wall time %.1f s", time.perf_counter() - t0)
        print(f"run folder: {run_dir}", flush=True)
        return metrics
    finally:
        detach(handler)


def prediction_rows(clf) -> list[dict]:
    """Per-image test results of the last evaluation: path, true and predicted class, probabilities."""
    from imgclf.evaluation.thresholds import apply_threshold

    ev = clf.last_eval_
    names = clf.class_names_
    return [
        {"path": p, "true": names[int(t)], "predicted": names[int(k)], **{c: f"{v:.6f}" for c, v in zip(names, pr)}}
        for p, t, pr, k in zip(ev["paths"], ev["y_true"], ev["probs"], apply_threshold(ev["probs"], clf.threshold_))
    ]


def cmd_train(args) -> int:
    run_train(args)
    return 0


def cmd_demo(args) -> int:
    from imgclf.data.demo import make_lesion_dataset

    data_dir = Path(args.data_dir) if args.data_dir else Path(args.project) / "demo-data"
    t = time.perf_counter()
    n_train = args.n_train
    path = make_lesion_dataset(data_dir, n_train=n_train, n_validation=max(2, n_train * 3 // 8), n_test=max(2, n_train // 2), seed=args.seed)
    log.info("demo lesion set ready in %.1f s: %s", time.perf_counter() - t, path)
    args.data = str(path)
    m = run_train(args)
    print(f"demo: test accuracy {m['accuracy']:.4f} (ROC-AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 4)}) on {m['n']} synthetic lesion images; run folder {m['run']}")
    return 0


def _run_test_split(model, data, class_names):
    """Test samples from split.csv when DATA is the run's own flat training set, else None.

    Evaluating a flat set as a whole would score the training images too.
    """
    from imgclf.model.bundle import resolve_bundle_dir
    from imgclf.data.datasets import Sample, read_split_csv

    run = resolve_bundle_dir(model)
    cfg_path, split_path = run / "config.json", run / "split.csv"
    if not (cfg_path.is_file() and split_path.is_file()) or (Path(data) / "test").is_dir():
        return None
    try:
        root = json.loads(cfg_path.read_text())["dataset"]["root"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if Path(root).resolve() != Path(data).resolve():
        return None
    index = {c: i for i, c in enumerate(class_names)}
    return [Sample(Path(p), index[c], "test") for p, c in read_split_csv(split_path)["test"] if c in index]


def cmd_evaluate(args) -> int:
    from imgclf.evaluation.metrics import format_metrics
    from imgclf.fileio import write_json
    from imgclf.model.classifier import Classifier

    clf = Classifier.load(args.model, weights=args.weights, engine=args.engine, precision=args.precision, cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.no_progress, tta=args.tta)
    if args.out and is_within(Path(args.out), Path(args.data)):
        raise ValueError(f"--out {args.out} is inside the dataset; imgclf never writes into the dataset folder")
    samples = _run_test_split(args.model, args.data, clf.class_names_)
    if samples is not None:
        log.info("%s is this run's own (flat) training set: evaluating the run's test split from split.csv", args.data)
        m = clf.evaluate_samples(samples, bootstrap=args.bootstrap)
    else:
        m = clf.evaluate(args.data, bootstrap=args.bootstrap)
    m["model"] = str(args.model)
    m["data"] = str(args.data)
    print(format_metrics(m))
    if m["skipped"]:
        for s in m["skipped"]:
            log.warning("skipped %s", s["error"])
    if args.out:
        write_json(Path(args.out), m)
        print(f"metrics written to {args.out}")
    return 0


def cmd_predict(args) -> int:
    from imgclf.data.datasets import collect_image_paths
    from imgclf.export.onnx import predictor_for
    from imgclf.fileio import atomic_write_bytes
    from imgclf.fileio import csv_text

    paths, problems = collect_image_paths(args.paths)
    if not paths:
        raise ValueError("no image files to predict: " + ("; ".join(problems) or " ".join(args.paths)))
    inside = [p for p in args.paths if args.out and Path(p).is_dir() and is_within(Path(args.out), Path(p))]
    if inside:
        raise ValueError(f"--out {args.out} is inside the image folder {inside[0]}; imgclf never writes into input folders")
    for p in problems:
        log.warning("%s", p)
    clf = predictor_for(args.model, args.engine, weights=args.weights, precision=args.precision, cache_dir=args.cache_dir,
                        use_cache=not args.no_cache, progress=not args.no_progress, parity_images=paths, tta=args.tta)
    rows = clf.predict_table(paths)
    fmt = args.format or ("json" if args.out and args.out.lower().endswith(".json") else "csv")
    if fmt == "json":
        text = json.dumps({"model": str(args.model), "class_names": clf.class_names_, "predictions": rows}, indent=2) + "\n"
    else:
        text = csv_text(rows, ["path", "predicted", *clf.class_names_, "error"])
    if args.out:
        atomic_write_bytes(Path(args.out), text.encode())
        n_err = sum(1 for r in rows if r["error"])
        print(f"{len(rows)} predictions ({n_err} with errors) written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_inspect(args) -> int:
    from imgclf.data.inspection import format_report, inspect_dataset

    report = inspect_dataset(args.data, progress=not args.no_progress, near_duplicates=not args.no_near_duplicates)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "evaluate": cmd_evaluate, "predict": cmd_predict, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from imgclf.runs.folders import setup_logging

    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # user-facing errors: bad paths, bad flags, missing weights, bad bundles
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for users
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: unexpected error: {type(e).__name__}: {_one_line(e)} (set IMGCLF_DEBUG=1 for details)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0]
