"""``imgclf train`` and ``imgclf demo``: flags generated from the declared settings, a run folder by ``train_run``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from imgclf import distributed
from imgclf.cli.common import add_runtime_flags, runtime_options
from imgclf.config.cli_args import add_setting_flags, given
from imgclf.config.settings import RUN_FIELDS, TRAIN_FIELDS

log = logging.getLogger("imgclf")

EPILOG_TRAIN = """\
dataset layouts: ROOT/{train,validation|val|valid,test}/<class>/<image> or ROOT/<class>/<image>;
missing validation/test splits are carved from train (stratified, seeded, recorded in split.csv).
or, instead of DATA, --manifest FILE.csv: header row path,label[,split]; paths relative to the CSV's
folder or absolute; split train/validation|val|valid/test, empty or no column = carve (nothing is
written under the CSV's folder).
outputs: PROJECT/NAME[-k]/ with config.json, split.csv, metrics.csv, model.safetensors,
model.json, test_metrics.json, skipped.csv and train.log.
"""


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Every declared training setting, run option and runtime option, as flags."""
    add_setting_flags(p, TRAIN_FIELDS, show_recipes=True)
    add_setting_flags(p, RUN_FIELDS)
    add_runtime_flags(p)


def register(subparsers, commands) -> None:
    p = subparsers.add_parser("train", help="train a classifier on a dataset folder", description="Extract (cached) backbone features, train the head, evaluate on test, save a run folder.", epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None, help="dataset root (or give --manifest instead)")
    add_train_flags(p)
    commands["train"] = cmd_train

    p = subparsers.add_parser("demo", help="make a synthetic lesion set, train on it, evaluate", description="Write a small synthetic benign/malignant lesion set, train the default backbone on it offline, evaluate, print the run folder.")
    p.add_argument("--data-dir", default=None, help="where to write the demo set (default: PROJECT/demo-data)")
    p.add_argument("--n-train", type=int, default=40, help="training images per class (default: 40)")
    add_train_flags(p)
    p.set_defaults(name="demo")  # the demo's run folder name unless --name is given
    commands["demo"] = cmd_demo


def run_train(args) -> dict:
    """The ``train`` command (and the second half of ``demo``): a run folder; returns the test metrics."""
    from imgclf.runs.train_run import train_run

    return train_run(
        args.data, **given(args, TRAIN_FIELDS), **given(args, RUN_FIELDS), **runtime_options(args),
        command_line={k: v for k, v in vars(args).items() if k not in ("func",)}, echo=lambda s: print(s, flush=True),
    )


def cmd_train(args) -> int:
    run_train(args)
    return 0


def cmd_demo(args) -> int:
    from imgclf.data.demo import make_lesion_dataset

    data_dir = Path(args.data_dir) if args.data_dir else Path(args.project or RUN_FIELDS["project"].default) / "demo-data"
    t = time.perf_counter()
    n_train = args.n_train
    make = lambda: make_lesion_dataset(data_dir, n_train=n_train, n_validation=max(2, n_train * 3 // 8), n_test=max(2, n_train // 2), seed=args.seed or 0)  # noqa: E731
    ctx = distributed.current()
    if ctx is None:
        path = make()
    else:  # under torchrun one process per machine writes the set, machine after machine (a shared folder is written once)
        for machine in range(ctx.world_size // ctx.local_world_size):
            if ctx.local_rank == 0 and ctx.rank // ctx.local_world_size == machine:
                make()
            distributed.barrier()
        path = data_dir
    log.info("demo lesion set ready in %.1f s: %s", time.perf_counter() - t, path)
    args.data = str(path)
    m = run_train(args)
    if not distributed.is_main():
        return 0
    print(f"demo: test accuracy {m['accuracy']:.4f} (ROC-AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 4)}) on {m['n']} synthetic lesion images; run folder {m['run']}")
    return 0
