"""``imgclf extract``: fill the feature cache for a dataset before training, so that many
training runs, or one run on many machines sharing ``--cache-dir``, do no backbone work.

Under torchrun each rank extracts its share of the images into the (shared or local) cache.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from imgclf import distributed
from imgclf.cli.common import add_runtime_flags, runtime_options
from imgclf.config.cli_args import add_setting_flags, given
from imgclf.config.settings import TRAIN_FIELDS

log = logging.getLogger("imgclf")

EPILOG = """\
The features are the ones `imgclf train` with the same settings uses: backbone, weights,
recipe (preprocessing, augmented feature views) and precision make the cache key, so pass
the settings you will train with. Under torchrun (see README, "Many machines") the images are
split across the ranks; with a --cache-dir every machine can read, one extraction serves all.
"""


def register(subparsers, commands) -> None:
    p = subparsers.add_parser("extract", help="fill the feature cache for a dataset (before training, e.g. on many machines)",
                              description="Extract and cache the backbone features `imgclf train` would compute for DATA (all splits, "
                                          "plus the augmented training views the recipe uses); prints img/s and the cache folder.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None, help="dataset root (or give --manifest instead)")
    p.add_argument("--manifest", default=None, help="a CSV path,label[,split] (header row; paths relative to its folder) instead of DATA")
    add_setting_flags(p, TRAIN_FIELDS, show_recipes=True)
    add_runtime_flags(p)
    commands["extract"] = cmd_extract


def cmd_extract(args) -> int:
    from imgclf.data.augment import AugmentedView
    from imgclf.data.datasets import load_dataset, load_manifest
    from imgclf.fileio import is_within
    from imgclf.runs.train_run import check_not_beside_images
    from imgclf.train.classifier import ImageClassifier

    if (args.data is None) == (args.manifest is None):
        raise ValueError("give exactly one of DATA (a dataset folder) and --manifest FILE.csv")
    root = Path(args.manifest).parent if args.manifest else Path(args.data)
    clf = ImageClassifier(**given(args, TRAIN_FIELDS), **runtime_options(args))
    if not clf.use_cache:
        raise ValueError("--no-cache: extract has nothing to do without the feature cache")
    if is_within(clf.cache_dir, root):
        raise ValueError(f"cache_dir {clf.cache_dir} is inside the dataset {root}; imgclf never writes into the dataset folder")
    st = clf.settings
    runner = clf.prepare_backbone()
    split_options = dict(val_fraction=st.val_fraction, test_fraction=st.test_fraction, seed=st.seed)
    ds = load_manifest(args.manifest, **split_options) if args.manifest else load_dataset(root, **split_options)
    if args.manifest:  # a manifest may list images outside its own folder: the cache goes into none of theirs
        check_not_beside_images(ds, {"cache_dir": Path(clf.cache_dir)})
    for w in ds.warnings:
        log.warning("%s", w)
    paths = [str(s.path) for split in ("train", "validation", "test") for s in ds.samples.get(split, [])]
    train_paths = [str(s.path) for s in ds.samples.get("train", [])]
    if not paths:
        raise ValueError(f"no images in {args.manifest or root}")
    views = st.feature_views if clf.augment_config.active else 1
    jobs = [("features", paths, None)] + [
        (f"train features view {v + 1}/{views}", train_paths, AugmentedView(clf.augment_config, v, clf.seed)) for v in range(1, views)
    ]
    t0 = time.perf_counter()
    computed = cached = 0
    seconds = 0.0
    unreadable: set[int] = set()
    for desc, some_paths, transform in jobs:
        _, _, errors = clf.features(some_paths, desc=desc, transform=transform)
        res = clf.last_extraction_
        computed, cached, seconds = computed + res.computed, cached + res.cached, seconds + res.seconds
        if transform is None:
            unreadable.update(errors)
    wall = time.perf_counter() - t0
    if not distributed.is_main():
        return 0
    ctx = distributed.current()
    rate = f"{computed / seconds:.1f} img/s" if computed and seconds > 0 else "no backbone work"
    ranks = f" on {ctx.world_size} ranks" if ctx else ""
    print(f"{len(paths)} images ({views} view(s) of train): {computed} extracted ({rate}{ranks}), {cached} already cached, "
          f"{len(unreadable)} unreadable, {wall:.1f} s", flush=True)
    print(f"feature cache: {Path(runner.cache_root) / 'features' / runner.cache_key()}", flush=True)
    return 0
