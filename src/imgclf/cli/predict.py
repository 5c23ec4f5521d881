"""``imgclf evaluate`` and ``imgclf predict``: a saved model on labelled folders or on any images."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from imgclf import distributed
from imgclf.cli.common import add_runtime_flags, bounded, printable, runtime_options
from imgclf.config import layout
from imgclf.config.cli_args import add_setting_flags
from imgclf.config.settings import RUN_FIELDS
from imgclf.fileio import check_output_path, is_within

log = logging.getLogger("imgclf")

PREDICT_ENGINE_HELP = ("auto: the faster of the model's ONNX export (imgclf export; when a valid one exists) and the feature path, timed once "
                       "per model and machine on the model's test images (the feature path only when it matches the export's predictions), "
                       "else the feature path; onnx: ONNX Runtime on "
                       "the exported model, exporting now if needed; torch/openvino/onnxruntime: feature path with that backbone engine")


def register(subparsers, commands) -> None:
    p = subparsers.add_parser("evaluate", help="metrics of a saved model on a labelled folder", description="Evaluate MODEL on DATA's test/ split, or on all of DATA when it is a folder of class sub-folders.")
    p.add_argument("model", help="run folder or model.json")
    p.add_argument("data", nargs="?", default=None, help="dataset root with test/, or a folder of class sub-folders (or give --manifest instead)")
    p.add_argument("--manifest", default=None, help="a CSV path,label[,split] (header row; paths relative to its folder): its test rows, or all rows when none is test")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--tta", default=None, choices=["none", "flips", "d4"], help="test-time augmentation (default: the model's)")
    add_setting_flags(p, {"bootstrap": RUN_FIELDS["bootstrap"]})
    add_runtime_flags(p)
    commands["evaluate"] = cmd_evaluate

    p = subparsers.add_parser("predict", help="predict classes of image files or folders", description="Predict each image (folders are searched recursively). A bad file becomes a row with its error.")
    p.add_argument("model", help="run folder or model.json")
    p.add_argument("paths", nargs="*", help="image files and/or folders")
    # argparse gives an optional `paths` nothing once MODEL is matched, so paths after an option
    # or after `--` come back unrecognised; cli.main._parse appends them here
    p.set_defaults(extra_positionals="paths")
    p.add_argument("--manifest", default=None, help="also predict the images in this CSV's path column (header row; paths relative to its folder; other columns ignored)")
    p.add_argument("--out", default=None, help="write results here (default: stdout)")
    p.add_argument("--format", default=None, choices=["csv", "json"], help="output format (default: from --out's extension, else csv)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--tta", default=None, choices=["none", "flips", "d4"], help="test-time augmentation (default: the model's)")
    p.add_argument("--neighbors", type=bounded(int, "an integer", lambda v: 1 <= v <= 100, "1..100"), default=None, metavar="K",
                   help="also give the K most similar training images of each image (columns neighbor1_path, neighbor1_label, neighbor1_similarity, ...: "
                        "cosine similarity of backbone features), from the similar-cases index stored with the model; uses the feature path, not an ONNX export")
    add_runtime_flags(p, engines=("auto", "onnx", "torch", "openvino", "onnxruntime"), engine_help=PREDICT_ENGINE_HELP)
    commands["predict"] = cmd_predict


def _run_test_split(model, data, class_names, manifest=None):
    """Test samples from split.csv when DATA (or ``manifest``, a CSV without test rows) is the
    run's own flat training set, else None.

    Evaluating a flat set as a whole would score the training images too.
    """
    from imgclf.model.bundle import resolve_bundle_dir
    from imgclf.data.datasets import Sample, read_split_csv

    run = resolve_bundle_dir(model)
    cfg_path, split_path = run / layout.CONFIG, run / layout.SPLIT
    if not (cfg_path.is_file() and split_path.is_file()) or (manifest is None and (Path(data) / "test").is_dir()):
        return None
    try:
        dataset = json.loads(cfg_path.read_text())["dataset"]
        root = dataset.get("manifest") if manifest is not None else dataset["root"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(root, str) or Path(root).resolve() != Path(manifest if manifest is not None else data).resolve():
        return None
    index = {c: i for i, c in enumerate(class_names)}
    return [Sample(Path(p), index[c], "test") for p, c in read_split_csv(split_path)["test"] if c in index]


def _check_out(out: str, inputs=(), model: str | None = None) -> None:
    """Refuse an unusable --out before the model is loaded, not after the work: a folder, a
    device, a FIFO...; an input file or a path inside an input folder; the model's own files."""
    try:
        check_output_path(out)
    except ValueError as e:
        raise ValueError(f"--out {e}") from None
    target = Path(out).resolve()
    for given in inputs:
        p = Path(given)
        if p.exists() and target == p.resolve():
            raise ValueError(f"--out {out} is the input {given}; imgclf never writes over its inputs")
        if p.is_dir() and is_within(target, p):
            raise ValueError(f"--out {out} is inside the input folder {given}; imgclf never writes into input folders")
    if model is not None:
        folder = Path(model) if Path(model).is_dir() else Path(model).parent
        if target.parent == folder.resolve() and target.name in layout.RUN_FILES:
            raise ValueError(f"--out {out} would replace the model's own {target.name}; choose another file")


def cmd_evaluate(args) -> int:
    from imgclf.evaluation.metrics import format_metrics
    from imgclf.fileio import write_json
    from imgclf.model.classifier import Classifier

    if (args.data is None) == (args.manifest is None):
        raise ValueError("give exactly one of DATA (a folder) and --manifest FILE.csv")
    data_root = Path(args.manifest).parent if args.manifest else Path(args.data)
    if args.out:
        _check_out(args.out, inputs=[args.manifest] if args.manifest else (), model=args.model)
        if is_within(Path(args.out), data_root):
            raise ValueError(f"--out {args.out} is inside the dataset{' (the manifest folder)' if args.manifest else ''}; imgclf never writes into the dataset folder")
    clf = Classifier.load(args.model, weights=args.weights, tta=args.tta, **runtime_options(args))
    bootstrap = RUN_FIELDS["bootstrap"].default if args.bootstrap is None else args.bootstrap
    if args.manifest:
        from imgclf.data.datasets import manifest_eval_samples

        samples, missing, test_only = manifest_eval_samples(args.manifest, clf.class_names_)
        own = None if test_only else _run_test_split(args.model, None, clf.class_names_, manifest=args.manifest)
        if own is not None:
            log.info("%s is this run's own manifest without test rows: evaluating the run's test split from split.csv", args.manifest)
            samples, missing = own, []
        m = clf.evaluate_samples(samples, bootstrap=bootstrap)
        m["skipped"] = [*m["skipped"], *({"path": str(p), "error": e} for p, e in missing)]
    else:
        samples = _run_test_split(args.model, args.data, clf.class_names_)
        if samples is not None:
            log.info("%s is this run's own (flat) training set: evaluating the run's test split from split.csv", args.data)
            m = clf.evaluate_samples(samples, bootstrap=bootstrap)
        else:
            m = clf.evaluate(args.data, bootstrap=bootstrap)
    if not distributed.is_main():  # under torchrun every rank computed the metrics; rank 0 reports them
        return 0
    m["model"] = str(args.model)
    m["data"] = str(args.manifest or args.data)
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
    from imgclf.fileio import atomic_write_bytes, csv_text
    from imgclf.predict.choose import predictor_for


    if not args.paths and not args.manifest:
        raise ValueError("nothing to predict: give image files/folders and/or --manifest FILE.csv")
    inputs: list = list(args.paths)
    if args.manifest:
        from imgclf.data.datasets import manifest_image_paths

        inputs += manifest_image_paths(args.manifest)
    if args.out:
        _check_out(args.out, inputs=[*args.paths, *([args.manifest] if args.manifest else [])], model=args.model)
        if args.manifest and is_within(Path(args.out), Path(args.manifest).parent):
            raise ValueError(f"--out {args.out} is inside the manifest's folder; imgclf never writes into the dataset folder")
    unreadable: list[tuple[Path, str]] = []  # folders that could not be listed: a row each, with the reason
    paths, problems = collect_image_paths(inputs, unreadable=unreadable)
    if not paths:
        raise ValueError("no image files to predict: " + ("; ".join(problems) or " ".join(map(str, inputs))))
    for p in problems:
        log.warning("%s", p)
    runtime = runtime_options(args)
    engine = runtime.pop("engine", "auto")
    loaded = []

    def predict_rows(some_paths):  # under torchrun each rank predicts its share of the paths
        if args.neighbors:  # the index is searched with backbone features, which an ONNX export does not give
            from imgclf.model.classifier import Classifier

            if engine == "onnx":
                raise ValueError("--neighbors needs the model's backbone features: use --engine auto, torch, openvino or onnxruntime, not onnx")
            clf = Classifier.load(args.model, engine=engine, weights=args.weights, tta=args.tta, **runtime)
            clf.neighbor_index()  # no index, or a tampered one: a one-line error before any work
            loaded.append(clf)
            return clf.predict_table(some_paths, neighbors=args.neighbors) if some_paths else []
        clf = predictor_for(args.model, engine, weights=args.weights, parity_images=paths, tta=args.tta, **runtime)
        loaded.append(clf)
        return clf.predict_table(some_paths) if some_paths else []

    rows = distributed.map_sharded(paths, predict_rows)
    if not distributed.is_main():  # rank 0 writes the whole table
        return 0
    clf = loaded[0]
    rows += [{"path": str(folder), "predicted": None, **{c: None for c in clf.class_names_}, "error": reason} for folder, reason in unreadable]
    fmt = args.format or ("json" if args.out and args.out.lower().endswith(".json") else "csv")
    if fmt == "json":
        text = json.dumps({"model": str(args.model), "class_names": clf.class_names_, "predictions": rows}, indent=2) + "\n"
    else:
        text = csv_text(rows, ["path", "predicted", *clf.class_names_, "error", *(clf.neighbor_columns(args.neighbors) if args.neighbors else [])])
    if args.out:
        atomic_write_bytes(Path(args.out), text.encode("utf-8", "surrogateescape"))  # file names keep their bytes
        n_err = sum(1 for r in rows if r["error"])
        print(f"{len(rows)} predictions ({n_err} with errors) written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(printable(text))
    return 0
