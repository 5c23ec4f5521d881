"""Dataset layouts, class discovery and reproducible train/validation/test splits.

Two on-disk layouts are understood:

* ``splits``: ``ROOT/train/<class>/<image>``, optionally ``ROOT/validation``
  (or ``val`` / ``valid``) and ``ROOT/test`` with the same class folders.
  Detected whenever ROOT has a ``train`` sub-folder (split folder names are
  matched case-insensitively).
* ``flat``: ``ROOT/<class>/<image>``; validation and test are carved from it.

A third source is a manifest (``load_manifest``): a CSV with a header row and
columns ``path,label[,split]``, paths relative to the CSV's folder (which then
counts as the dataset folder) or absolute; it yields the same ``Dataset``, carved
by the same rule (layout ``"manifest"``).

Class names are train's class folder names, sorted (plain string order), and a
class's label is its index in that list. Images nested deeper inside a class
folder belong to that class. Hidden entries, stray files (``README.txt``,
``Thumbs.db``), non-image files and unknown top-level folders are skipped and
listed in ``Dataset.ignored`` so nothing is dropped silently.

Folder symlinks are followed, but each real folder is walked once and each real
image file counted once (a folder's first path in sorted order wins; for a file,
a path that is not a symlink wins over links to it): a link back up the tree is
not followed and a second path to a counted file is skipped, both listed in
``ignored`` and explained in ``warnings``. A folder that cannot be listed
(no read permission) is named with the OS's reason in ``warnings`` and
``Dataset.unreadable``, never mistaken for an empty folder.

A missing validation/test split is carved from train per class (stratified) by
hand rather than with scikit-learn, so the split only depends on the sorted file
list, the fractions and the seed: ``random.Random(f"{seed}:{class}")`` shuffles
the class's sorted paths, test is carved first (``round(n * test_fraction)``),
then validation from what is left (``round(n_left * val_fraction)``). At least
one image always stays in train and, when the class has >= 3 images and the
fraction is > 0, at least one goes to the carved split.

Exact copies (identical file bytes: the feature cache's content hash, as ``--cv`` groups
them) are carved together: a copy in train and another in test would score a picture the
model trained on. The carve then shuffles groups instead of files and takes groups while
they fit the count (so without copies the split is the one described above), copies filed
under two classes end in one split (train if one of them stays there, else that of the copy
whose path sorts first), and a copy of an image a manifest names as train stays in train. How many copies were kept together is
in ``warnings``.

Nothing here ever writes into the dataset folder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.imaging import IMAGE_EXTENSIONS as _EXTS
from imgclf.data.imaging import is_image_file
from imgclf.fileio import content_hash, is_within

log = logging.getLogger("imgclf")

__all__ = [
    "SPLIT_NAMES",
    "SPLIT_ALIASES",
    "DatasetError",
    "Sample",
    "Dataset",
    "scan_layout",
    "load_dataset",
    "load_manifest",
    "scan_manifest",
    "manifest_image_paths",
    "manifest_eval_samples",
    "write_split_csv",
    "read_split_csv",
    "collect_image_paths",
    "labelled_eval_samples",
    "with_validation_folder",
    "content_groups",
]

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "val", "valid"),
    "test": ("test",),
}
_ALIAS_TO_SPLIT = {alias: split for split, aliases in SPLIT_ALIASES.items() for alias in aliases}
_CSV_COLUMNS = ("split", "class", "path")


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message is one line and names the folder/file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Sample:
    """One labelled image and the split it belongs to."""

    path: Path
    label: int
    split: str


@dataclass
class Dataset:
    """A loaded dataset: classes, samples per split, and how each split was obtained."""

    root: Path
    layout: str  # "splits" or "flat"
    class_names: list[str]
    samples: dict[str, list[Sample]]
    split_source: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    # (folder, reason) for folders whose images were skipped because they could not be listed
    # (e.g. no read permission); a run writes them to skipped.csv beside undecodable files
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of images (every class listed, zeros included)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLIT_NAMES:
            per_class = {name: 0 for name in self.class_names}
            for sample in self.samples.get(split, []):
                per_class[self.class_names[sample.label]] += 1
            out[split] = per_class
        return out

    def all_samples(self) -> list[Sample]:
        """Every sample, train then validation then test."""
        return [s for split in SPLIT_NAMES for s in self.samples.get(split, [])]


# --------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _list_folder(folder: Path) -> list[os.DirEntry]:
    """The folder's entries sorted by name; OSError (e.g. PermissionError) propagates."""
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    try:
        return _list_folder(folder)
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list folder ({_reason(exc)})") from None


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, like a user would expect
    except OSError:
        return False


class _Walk:
    """One scan's memory of what it has seen, shared by all of that scan's folder walks.

    Folder symlinks are followed (a class folder may link to images kept
    elsewhere), so one real folder can be reached by several paths, or endlessly
    when a link points back up the tree. Each folder and each image file is known
    by the ``(st_dev, st_ino)`` it resolves to and is walked or counted once: the
    first path reaching a folder wins (walks are sorted, so the winner is
    deterministic); for a file, a path that is not itself a symlink wins over
    links to it (so a link cannot move a picture into the linking class), then the
    first. Every other path is skipped, added to ``ignored`` and explained in
    ``warnings``, so a loop can neither recurse forever nor put one picture in two
    splits or two classes. Folders that cannot be listed go to ``unreadable`` with
    the OS's reason (and to ``warnings``) instead of silently adding nothing.
    """

    def __init__(self, ignored: list[Path], warnings: list[str]):
        self.ignored = ignored
        self.warnings = warnings
        self.unreadable: list[tuple[Path, str]] = []
        self._folders: dict[tuple[int, int], Path] = {}
        self._files: dict[tuple[int, int], list[tuple[bool, Path]]] = {}

    def _skip(self, path: Path, message: str) -> None:
        self.ignored.append(path)
        self.warnings.append(f"{path}: {message}")

    def claim_folder(self, path: Path) -> bool:
        """Register ``path`` to be walked; False (reported) when its real folder was reached before."""
        try:
            st = os.stat(path)
        except OSError as exc:
            self.unreadable.append((path, f"cannot read folder ({_reason(exc)})"))
            self.warnings.append(f"{path}: cannot read folder ({_reason(exc)}); its images are skipped")
            return False
        key = (st.st_dev, st.st_ino)
        first = self._folders.get(key)
        if first is None:
            self._folders[key] = path
            return True
        if first in path.parents:
            self._skip(path, f"symlink loop back to {first}; not followed")
        else:
            self._skip(path, f"same folder as {first}; not scanned twice")
        return False

    def walked(self, folder: Path) -> bool:
        """Was ``folder``'s real folder claimed already (by this path or another)?"""
        try:
            st = os.stat(folder)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self._folders

    def claim_image(self, entry: os.DirEntry, path: Path) -> bool:
        """Should this image-named entry be listed? Not when it is not a regular file (a FIFO
        would block the decoder; reported). An entry that cannot be stat'ed (broken link) is
        kept, so its error shows where undecodable files do. Real files are remembered for
        ``duplicates``."""
        try:
            st = entry.stat()  # follows symlinks: the file that would be decoded
        except OSError:
            return True
        if not stat.S_ISREG(st.st_mode):
            self._skip(path, "not a regular file; skipped")
            return False
        try:
            is_link = entry.is_symlink()
        except OSError:
            is_link = True
        self._files.setdefault((st.st_dev, st.st_ino), []).append((is_link, path))
        return True

    def duplicates(self) -> set[Path]:
        """Paths listed so far that are a second path to a listed file (reported); drop them."""
        losers: set[Path] = set()
        for claims in self._files.values():
            if len(claims) < 2:
                continue
            winner = min(claims, key=lambda claim: claim[0])[1]  # not a link first, then walk order
            for _, path in claims:
                if path != winner and path not in losers:
                    losers.add(path)
                    self._skip(path, f"same file as {winner}; counted once")
        return losers

    def list_folder(self, folder: Path) -> list[os.DirEntry] | None:
        """The folder's sorted entries, or None (reported in ``unreadable``) when it cannot be listed."""
        try:
            return _list_folder(folder)
        except OSError as exc:
            self.unreadable.append((folder, f"cannot read folder ({_reason(exc)})"))
            self.warnings.append(f"{folder}: cannot read folder ({_reason(exc)}); its images are skipped")
            return None

    def unreadable_under(self, folder: Path) -> list[tuple[Path, str]]:
        """Unreadable folders at or below ``folder``."""
        return [(p, why) for p, why in self.unreadable if p == folder or folder in p.parents]

    def images(self, top: Path, recursive: bool = True) -> list[Path]:
        """Image files in the already claimed folder ``top`` (and below it, each real folder
        once), sorted by path; hidden entries and non-image files go to ``ignored``. Second
        paths to one file are still listed: ``duplicates`` says which to drop once every walk
        of the scan is done."""
        images: list[Path] = []
        pending = [top]
        while pending:  # depth first, in name order
            folder = pending.pop()
            subfolders: list[Path] = []
            for entry in self.list_folder(folder) or []:
                path = folder / entry.name
                if _is_hidden(entry.name):
                    self.ignored.append(path)
                elif _entry_is_dir(entry):
                    if recursive and self.claim_folder(path):
                        subfolders.append(path)
                elif not is_image_file(path):
                    self.ignored.append(path)
                elif self.claim_image(entry, path):
                    images.append(path)
            pending.extend(reversed(subfolders))
        return sorted(images, key=lambda p: p.as_posix())


def _class_folders(folder: Path, walk: _Walk) -> dict[str, Path]:
    """Class sub-folders of ``folder`` (claimed in ``walk``); stray files beside them are ignored."""
    classes: dict[str, Path] = {}
    loose_images = 0
    for entry in _sorted_entries(folder):
        path = folder / entry.name
        if _is_hidden(entry.name):
            walk.ignored.append(path)
        elif _entry_is_dir(entry):
            if walk.claim_folder(path):
                classes[entry.name] = path
        else:
            walk.ignored.append(path)
            if is_image_file(path):
                loose_images += 1
    if loose_images:
        walk.warnings.append(
            f"{folder}: {loose_images} image(s) lie directly in this folder, outside any class "
            f"folder, and were ignored (expected {folder}/<class>/<image>)"
        )
    return classes


def _scan_class_folders(folder: Path, walk: _Walk) -> dict[str, list[Path]]:
    walk.claim_folder(folder)
    found = {name: walk.images(path) for name, path in _class_folders(folder, walk).items()}
    duplicates = walk.duplicates()
    return {name: [p for p in paths if p not in duplicates] for name, paths in found.items()}


def scan_class_folders(folder: Path, ignored: list[Path], warnings: list[str]) -> dict[str, list[Path]]:
    """Class sub-folders of ``folder`` -> sorted image paths; stray files beside them are ignored.

    Unreadable folders are reported in ``warnings``; links back into folders already
    scanned are not followed (see ``_Walk``).
    """
    return _scan_class_folders(Path(folder), _Walk(ignored, warnings))


def scan_layout(
    root: str | os.PathLike,
) -> tuple[str, dict[str, dict[str, list[Path]]], list[Path], list[str]]:
    """Find the layout and every image per split folder and class, without any splitting.

    Returns ``(layout, found, ignored, warnings)`` where ``found`` maps the
    canonical split name to ``{class: sorted image paths}``. A flat layout is
    reported under ``"train"`` (the pool validation/test are carved from).
    Raises ``DatasetError`` for structural problems (see module docstring).
    Shared by ``load_dataset`` and ``imgclf inspect`` so both see the same files.
    """
    layout, found, ignored, warnings, _, _ = _scan(Path(root))
    return layout, found, ignored, warnings


def _scan(root: Path):
    """``scan_layout`` plus the split folder actually used for each split and the unreadable folders.

    Every split and class folder is claimed before any class is walked, so a link
    from one class into another class (or up to a split or the root) is skipped
    rather than relabelling the other class's images.
    """
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset path is not a folder")

    ignored: list[Path] = []
    warnings: list[str] = []
    walk = _Walk(ignored, warnings)
    entries = _sorted_entries(root)
    walk.claim_folder(root)
    split_dirs: dict[str, Path] = {}
    for entry in entries:
        if _is_hidden(entry.name) or not _entry_is_dir(entry):
            continue
        split = _ALIAS_TO_SPLIT.get(entry.name.lower())
        if split is None:
            continue
        if split in split_dirs:
            raise DatasetError(
                f"{root}: both '{split_dirs[split].name}' and '{entry.name}' are {split} folders; "
                f"keep only one"
            )
        split_dirs[split] = root / entry.name

    class_dirs: dict[str, dict[str, Path]] = {}
    if "train" in split_dirs:
        layout = "splits"
        for entry in entries:
            path = root / entry.name
            if _is_hidden(entry.name):
                ignored.append(path)
            elif not _entry_is_dir(entry):
                ignored.append(path)
            elif _ALIAS_TO_SPLIT.get(entry.name.lower()) is None:
                ignored.append(path)
                warnings.append(
                    f"{path}: unknown top-level folder ignored (expected train, "
                    f"validation/val/valid, test)"
                )
        for split in SPLIT_NAMES:
            if split not in split_dirs:
                continue
            if not walk.claim_folder(split_dirs[split]):
                if split == "train":
                    raise DatasetError(warnings[-1])
                del split_dirs[split]
        for split in SPLIT_NAMES:
            if split in split_dirs:
                class_dirs[split] = _class_folders(split_dirs[split], walk)
    else:
        layout = "flat"
        if split_dirs:
            names = ", ".join(sorted(p.name for p in split_dirs.values()))
            warnings.append(
                f"{root}: has {names} folder(s) but no 'train' folder, so it is read as a flat "
                f"layout and {names} are treated as CLASSES; add a 'train' folder for a splits layout"
            )
        class_dirs["train"] = _class_folders(root, walk)
    found: dict[str, dict[str, list[Path]]] = {
        split: {name: walk.images(path) for name, path in classes.items()} for split, classes in class_dirs.items()
    }
    duplicates = walk.duplicates()
    found = {
        split: {name: [p for p in paths if p not in duplicates] for name, paths in classes.items()}
        for split, classes in found.items()
    }

    train_dir = split_dirs.get("train", root)
    train = found["train"]
    if not train:
        raise DatasetError(
            f"{train_dir}: no class folders found (expected {train_dir}/<class>/<image>)"
        )
    for name, paths in train.items():
        if paths:
            continue
        unreadable = walk.unreadable_under(train_dir / name)
        if unreadable and unreadable[0][0] == train_dir / name:
            raise DatasetError(f"{train_dir / name}: {unreadable[0][1]}, so this class has no images")
        if unreadable:
            raise DatasetError(
                f"{train_dir / name}: class folder contains no readable images; "
                f"{len(unreadable)} sub-folder(s) could not be read, e.g. {unreadable[0][0]}: {unreadable[0][1]}"
            )
        raise DatasetError(f"{train_dir / name}: class folder contains no images")
    if len(train) < 2:
        raise DatasetError(
            f"{train_dir}: only one class folder ('{next(iter(train))}'); a classifier needs at least two"
        )
    for split in ("validation", "test"):
        if split not in found:
            continue
        for name, paths in found[split].items():
            if name not in train:
                raise DatasetError(
                    f"{split_dirs[split] / name}: class '{name}' is not a class folder in "
                    f"{train_dir} (classes come from train)"
                )
        for name in sorted(train):
            if not found[split].get(name):
                warnings.append(
                    f"{split_dirs[split]}: class '{name}' has no images in {split}"
                )
    ignored.sort(key=lambda p: p.as_posix())
    return layout, found, ignored, warnings, split_dirs, walk.unreadable


# --------------------------------------------------------------------------- splitting


def _check_fraction(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= value < 1.0):
        raise DatasetError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _carve(units: list[tuple[Path, ...]], fraction: float, rng: random.Random) -> tuple[list[tuple[Path, ...]], list[tuple[Path, ...]]]:
    """Split ``units`` (groups of identical files, sorted by their first path) into (kept, carved).

    The count rule counts images (module docstring); groups are taken in shuffled order while
    they fit it, and when none fits, the smallest goes, so a class of copies still gives one.
    """
    n = sum(len(u) for u in units)
    if fraction <= 0 or n == 0:
        return list(units), []
    k = int(round(n * fraction))
    if n >= 3:
        k = max(k, 1)
    k = min(k, n - 1)  # at least one image stays behind
    shuffled = list(units)
    rng.shuffle(shuffled)
    taken: set[int] = set()  # positions in shuffled
    size = 0
    for i, unit in enumerate(shuffled):
        if size + len(unit) <= k:
            taken.add(i)
            size += len(unit)
    if not taken and k > 0 and len(units) > 1:
        taken.add(min(range(len(shuffled)), key=lambda i: len(shuffled[i])))

    def by_first(group: list[tuple[Path, ...]]) -> list[tuple[Path, ...]]:
        return sorted(group, key=lambda u: u[0].as_posix())

    return by_first([u for i, u in enumerate(shuffled) if i not in taken]), by_first([shuffled[i] for i in sorted(taken)])


def content_groups(paths: Sequence[Path]) -> dict[Path, str]:
    """Which exact copies go together, when carving and in ``--cv``'s folds: each path's content
    hash (the feature cache's, so a copy under another name joins its original); an unreadable
    file is a group of its own (feature extraction skips it later, naming the file)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p: Path) -> str:
        try:
            return content_hash(p)
        except OSError:
            return f"unreadable:{p}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def _units(paths: list[Path], group_of: dict[Path, str], pinned: set[str]) -> tuple[list[tuple[Path, ...]], list[Path]]:
    """(carvable groups of identical files sorted by first path, files that must stay in train)."""
    groups: dict[str, list[Path]] = {}
    stay: list[Path] = []
    for p in paths:
        if group_of[p] in pinned:
            stay.append(p)
        else:
            groups.setdefault(group_of[p], []).append(p)
    units = [tuple(sorted(g, key=lambda p: p.as_posix())) for g in groups.values()]
    return sorted(units, key=lambda u: u[0].as_posix()), stay


def load_dataset(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Scan ``root`` and return a Dataset with train/validation/test always present.

    Splits that exist on disk are used as they are; missing ones are carved from
    train (stratified, seeded, deterministic). Same files + fractions + seed give
    identical splits on any machine.
    """
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    root = Path(root)
    layout, found, ignored, warnings, split_dirs, unreadable = _scan(root)
    source: dict[str, str] = {}
    if layout == "splits":
        for split in SPLIT_NAMES:
            if split in found:
                source[split] = f"folder {split_dirs[split].name}"
    else:
        source["train"] = "flat class folders (what is left after carving)"
    return _split_dataset(
        root, layout, found, source, "all images" if layout == "flat" else "train", "folder",
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        ignored=ignored, warnings=warnings, unreadable=unreadable,
    )


def _carve_pool(
    per_split: dict[str, dict[str, list[Path]]],
    class_names: list[str],
    carve_plan: list[tuple[str, float]],
    source: dict[str, str],
    seed: int,
    warnings: list[str],
    kept_in_train: dict[str, list[Path]],
    group_of: dict[Path, str] | None,
) -> None:
    """Carve the stratified splits out of ``per_split["train"]`` in place, exact copies together
    (``group_of``: :func:`content_groups` of these images when the caller has it already)."""
    pool = [p for name in class_names for p in per_split["train"][name]]
    pinned_paths = [p for paths in kept_in_train.values() for p in paths]
    if group_of is None or any(p not in group_of for p in pool + pinned_paths):
        group_of = content_groups(pool + pinned_paths)
    pinned = {group_of[p] for p in pinned_paths}
    placed: dict[Path, str] = {}
    for name in class_names:
        rng = random.Random(f"{seed}:{name}")
        units, stay = _units(per_split["train"][name], group_of, pinned)
        for split, fraction in carve_plan:
            if not source[split].startswith("stratified"):
                continue
            units, carved = _carve(units, fraction, rng)
            placed.update((p, split) for unit in carved for p in unit)
            if not carved:
                kept = sum(len(u) for u in units) + len(stay)
                warnings.append(f"class '{name}': only {kept} train image(s), none carved into {split}")
        placed.update((p, "train") for unit in units for p in unit)
        placed.update((p, "train") for p in stay)
    # a picture filed under two classes: to train if a copy is there (a class never loses its
    # training images to this), else where the copy whose path sorts first went
    members: dict[str, list[Path]] = {}
    for p in placed:
        members.setdefault(group_of[p], []).append(p)
    moved = 0
    for paths in members.values():
        splits = {placed[p] for p in paths}
        target = "train" if "train" in splits else placed[min(paths, key=lambda p: p.as_posix())]
        for p in paths:
            if placed[p] != target:
                placed[p] = target
                moved += 1
    copies = sum(len(paths) - 1 for paths in members.values()) + sum(1 for p in pool if group_of[p] in pinned)
    if copies:
        warnings.append(
            f"{copies} exact cop{'y' if copies == 1 else 'ies'} (identical bytes) of other images among those carved into splits: "
            f"each kept in one split with its original" + (f" ({moved} filed under another class moved to share a split with it)" if moved else "")
        )
    index = {p: name for name in class_names for p in per_split["train"][name]}
    for name in class_names:
        per_split["train"][name] = []  # the carved splits start empty: no folder or row names them
    for p, split in placed.items():
        per_split[split][index[p]].append(p)
    for split in {"train", *placed.values()}:
        for name in class_names:
            per_split[split][name].sort(key=lambda p: p.as_posix())


def _split_dataset(
    root: Path,
    layout: str,
    found: dict[str, dict[str, list[Path]]],
    source: dict[str, str],
    pool_name: str,
    missing_what: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    ignored: list[Path],
    warnings: list[str],
    unreadable: list[tuple[Path, str]],
    kept_in_train: dict[str, list[Path]] | None = None,
    group_of: dict[Path, str] | None = None,
) -> Dataset:
    """Carve the splits missing from ``source`` out of ``found["train"]`` (the pool) and build the Dataset.

    Shared by folder datasets and manifests so both carve identically. ``kept_in_train``:
    images assigned to train that are not part of the pool (a manifest's explicit train
    rows when other rows leave their split empty); they join train after carving.
    ``group_of``: the images' :func:`content_groups`, if known (else computed when carving).
    """
    class_names = sorted(set(found["train"]) | set(kept_in_train or {}))
    per_split: dict[str, dict[str, list[Path]]] = {
        split: {name: list(found.get(split, {}).get(name, [])) for name in class_names}
        for split in SPLIT_NAMES
    }
    carve_plan = [("test", test_fraction), ("validation", val_fraction)]
    carved_any = False
    for split, fraction in carve_plan:
        if split in source:
            continue
        of = pool_name if not carved_any else f"{pool_name} after carving test"
        if fraction <= 0:
            source[split] = f"none ({'test' if split == 'test' else 'val'}_fraction=0)"
            warnings.append(f"{root}: no {split} {missing_what} and its fraction is 0, so {split} is empty")
            continue
        source[split] = f"stratified {fraction:g} of {of}, seed {seed}"
        carved_any = carved_any or split == "test"

    if any(source[split].startswith("stratified") for split, _ in carve_plan):
        _carve_pool(per_split, class_names, carve_plan, source, seed, warnings, kept_in_train or {}, group_of)
    for name, paths in (kept_in_train or {}).items():
        per_split["train"][name] = sorted([*per_split["train"][name], *paths], key=lambda p: p.as_posix())

    samples: dict[str, list[Sample]] = {}
    for split in SPLIT_NAMES:
        samples[split] = [
            Sample(path=p, label=label, split=split)
            for label, name in enumerate(class_names)
            for p in per_split[split][name]
        ]
    return Dataset(
        root=root,
        layout=layout,
        class_names=class_names,
        samples=samples,
        split_source=source,
        warnings=warnings,
        ignored=ignored,
        unreadable=unreadable,
    )


# --------------------------------------------------------------------------- manifest CSV

MANIFEST_COLUMNS = ("path", "label", "split")


@dataclass
class _Manifest:
    """A manifest's rows sorted into splits, before any carving."""

    path: Path
    root: Path  # the CSV's folder: relative paths start here and nothing is written under it
    explicit: dict[str, dict[str, list[Path]]]  # split -> label -> images whose split cell names it
    unassigned: dict[str, list[Path]]  # label -> images whose split is empty or has no column
    ignored: list[Path]
    warnings: list[str]
    unreadable: list[tuple[Path, str]]


def _open_manifest(path: Path):
    if not path.exists():
        raise DatasetError(f"{path}: manifest file does not exist")
    if not path.is_file():
        raise DatasetError(f"{path}: manifest is not a file")
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None


def _manifest_rows(path: Path, *, need_label: bool):
    """``(line, path as written, image path, label, split or None)`` per row, header and rows checked.

    ``need_label=False`` (prediction) reads the path column only.
    """
    with _open_manifest(path) as fh:
        reader = csv.reader(fh)
        try:
            header_row = next(reader, None)
            if header_row is None:
                raise DatasetError(f"{path}: manifest is empty (expected a header row path,label[,split])")
            header = [h.strip().lower() for h in header_row]
            missing = [c for c in (("path", "label") if need_label else ("path",)) if c not in header]
            if missing:
                raise DatasetError(
                    f"{path}:1: manifest header lacks column(s) {', '.join(missing)} "
                    f"(expected path,label[,split]; got {','.join(header_row)})"
                )
            dup = sorted({c for c in header if c in MANIFEST_COLUMNS and header.count(c) > 1})
            if dup:
                raise DatasetError(f"{path}:1: manifest header repeats column(s) {', '.join(dup)}")
            col = {c: header.index(c) for c in MANIFEST_COLUMNS if c in header}
            n_rows = 0
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                n_rows += 1
                if len(row) != len(header):
                    raise DatasetError(f"{path}:{line}: {len(row)} field(s), the header has {len(header)}")
                file_raw = row[col["path"]].strip()
                label = row[col["label"]].strip() if "label" in col else ""
                if not file_raw or (need_label and not label):
                    raise DatasetError(f"{path}:{line}: empty {'path' if not file_raw else 'label'}")
                split = None
                split_raw = row[col["split"]].strip() if "split" in col else ""
                if split_raw and need_label:
                    split = _ALIAS_TO_SPLIT.get(split_raw.lower())
                    if split is None:
                        raise DatasetError(
                            f"{path}:{line}: unknown split {split_raw!r} (expected train, "
                            f"validation/val/valid, test, or empty to carve)"
                        )
                image = Path(file_raw)
                if not image.is_absolute():
                    image = path.parent / image
                yield line, file_raw, image, label, split
        except csv.Error as exc:
            raise DatasetError(f"{path}:{reader.line_num}: unreadable CSV row ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: manifest is not text ({exc.reason})") from None
    if n_rows == 0:
        raise DatasetError(f"{path}: manifest has a header but no rows")


def manifest_image_paths(manifest: str | os.PathLike) -> list[Path]:
    """The path column of a manifest (labels and splits ignored), in file order, for prediction."""
    return [image for _, _, image, _, _ in _manifest_rows(Path(manifest), need_label=False)]


def _read_manifest(manifest: str | os.PathLike) -> _Manifest:
    """Parse and check a ``path,label[,split]`` CSV; every problem names the CSV line.

    Rows whose file does not exist, or is a folder, are skipped into ``unreadable`` (as
    a folder dataset skips what it cannot read); a listed file without an image
    extension is skipped into ``ignored`` with a warning, as a stray file in a folder is.
    """
    path = Path(manifest)
    root = path.parent
    explicit: dict[str, dict[str, list[Path]]] = {}
    unassigned: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    warnings: list[str] = []
    unreadable: list[tuple[Path, str]] = []
    seen: dict[object, int] = {}
    for line, file_raw, image, label, split in _manifest_rows(path, need_label=True):
        key: object = os.path.normcase(os.path.abspath(image))
        first = seen.get(key)
        if first is None:
            try:
                st = os.stat(image)
                key = (st.st_dev, st.st_ino)
                first = seen.get(key)
            except OSError:
                pass
        if first is not None:
            raise DatasetError(f"{path}:{line}: {file_raw} is listed again (first on line {first}); list each image once")
        seen[key] = line
        if image.is_dir():
            unreadable.append((image, f"manifest line {line}: a folder, not an image file"))
            continue
        if not image.is_file():
            reason = "no such file" if not (image.exists() or image.is_symlink()) else "not a regular file (or a broken link)"
            unreadable.append((image, f"manifest line {line}: {reason}"))
            continue
        if not is_image_file(image):
            ignored.append(image)
            warnings.append(f"{path}:{line}: {image} has no image extension ({', '.join(sorted(_EXTS))}); skipped")
            continue
        if split is None:
            unassigned.setdefault(label, []).append(image)
        else:
            explicit.setdefault(split, {}).setdefault(label, []).append(image)
    if unreadable:
        warnings.append(f"{path}: {len(unreadable)} listed file(s) missing or not files, skipped (e.g. {unreadable[0][0]})")
    return _Manifest(path, root, explicit, unassigned, ignored, warnings, unreadable)


def _check_manifest_classes(m: _Manifest) -> list[str]:
    """The class names (labels of train and the carving pool); DatasetError for a class
    that exists only in validation/test, a train class left without images, or one class."""
    train = m.explicit.get("train", {})
    classes = sorted(set(train) | set(m.unassigned))
    if not classes:
        if m.unreadable:
            raise DatasetError(f"{m.path}: no listed train image exists, e.g. {m.unreadable[0][0]} ({m.unreadable[0][1]})")
        raise DatasetError(f"{m.path}: no train images (rows with split train or an empty split)")
    for split in ("validation", "test"):
        for label in sorted(m.explicit.get(split, {})):
            if label not in classes:
                raise DatasetError(
                    f"{m.path}: label '{label}' appears in {split} but not in train (classes come from train)"
                )
    if len(classes) < 2:
        raise DatasetError(f"{m.path}: only one label ('{classes[0]}') in train; a classifier needs at least two")
    return classes


def scan_manifest(
    manifest: str | os.PathLike,
) -> tuple[Path, str, dict[str, dict[str, list[Path]]], list[Path], list[str], list[tuple[Path, str]]]:
    """``scan_layout`` for a manifest: ``(root, "manifest", found, ignored, warnings, unreadable)``.

    ``found["train"]`` holds train rows and rows with no split (the pool carving draws
    from), as a flat folder's images are reported; ``root`` is the CSV's folder.
    """
    m = _read_manifest(manifest)
    classes = _check_manifest_classes(m)
    found: dict[str, dict[str, list[Path]]] = {
        "train": {c: sorted([*m.explicit.get("train", {}).get(c, []), *m.unassigned.get(c, [])], key=lambda p: p.as_posix()) for c in classes}
    }
    for split in ("validation", "test"):
        if split in m.explicit:
            found[split] = {c: sorted(m.explicit[split].get(c, []), key=lambda p: p.as_posix()) for c in classes}
    return m.root, "manifest", found, m.ignored, m.warnings, m.unreadable


def load_manifest(
    manifest: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A Dataset from a ``path,label[,split]`` CSV (header row), split as ``load_dataset`` splits folders.

    Paths are relative to the CSV's folder (``Dataset.root``) or absolute. Split values
    take the folder aliases (``val``, ``valid``); a split no row names is carved with
    the same stratified seeded rule. Rows with an empty split cell (or no split column)
    are the pool carving draws from and what is left joins train; when no row leaves
    its split empty, the pool is train, as for folders. Class names are the sorted
    labels of train and the pool.
    """
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    m = _read_manifest(manifest)
    classes = _check_manifest_classes(m)
    train = m.explicit.get("train", {})
    named = [s for s in SPLIT_NAMES if s in m.explicit]
    source = {split: f"manifest split column ({split})" for split in named}
    kept_in_train: dict[str, list[Path]] | None = None
    if m.unassigned:
        pool = {c: sorted(m.unassigned.get(c, []), key=lambda p: p.as_posix()) for c in classes}
        pool_name = "rows with no split" if named else "all rows"
        if "train" in named:
            kept_in_train = {c: list(train.get(c, [])) for c in classes}
            source["train"] = "manifest split column (train) and rows with no split left after carving"
        else:
            source["train"] = f"{pool_name} (what is left after carving)"
        if all(s in named for s in ("validation", "test")):
            m.warnings.append(f"{m.path}: every split is named in the manifest, so rows with no split join train")
    else:
        pool = {c: list(train.get(c, [])) for c in classes}
        pool_name = "train"
    for c in classes:
        if not pool[c] and not (kept_in_train or {}).get(c):
            raise DatasetError(f"{m.path}: label '{c}' has no train image that exists")
    def by_path(paths: list[Path]) -> list[Path]:
        return sorted(paths, key=lambda p: p.as_posix())

    found = {"train": {c: by_path(v) for c, v in pool.items()},
             **{s: {c: by_path(v) for c, v in m.explicit[s].items()} for s in ("validation", "test") if s in m.explicit}}
    if kept_in_train is not None:
        kept_in_train = {c: by_path(v) for c, v in kept_in_train.items()}
    return _split_dataset(
        m.root, "manifest", found, source, pool_name, "rows in the manifest",
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        ignored=m.ignored, warnings=m.warnings, unreadable=m.unreadable, kept_in_train=kept_in_train,
    )


def manifest_eval_samples(
    manifest: str | os.PathLike, class_names: list[str]
) -> tuple[list[Sample], list[tuple[Path, str]], bool]:
    """Labelled samples of a manifest to evaluate a model on: ``(samples, skipped, test_only)``.

    The rows whose split is test when any row has one (as ``evaluate`` takes DATA/test),
    else every row; ``skipped`` are listed files that do not exist. Unlike training, one
    label is enough; a label unknown to the model is a DatasetError.
    """
    m = _read_manifest(manifest)
    for w in m.warnings:
        log.warning("%s", w)
    test_only = "test" in m.explicit
    if test_only:
        by_label = m.explicit["test"]
    else:
        by_label = {}
        for rows in [m.unassigned, *m.explicit.values()]:
            for label, paths in rows.items():
                by_label.setdefault(label, []).extend(paths)
    if not any(by_label.values()):
        raise DatasetError(f"{m.path}: no listed image exists to evaluate" + (f", e.g. {m.unreadable[0][0]} ({m.unreadable[0][1]})" if m.unreadable else ""))
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(c for c in by_label if c not in index)
    if unknown:
        raise DatasetError(f"{m.path}: label(s) {', '.join(unknown)} unknown to the model (classes: {', '.join(class_names)})")
    samples = [Sample(p, index[c], "test") for c in sorted(by_label) for p in sorted(by_label[c], key=lambda p: p.as_posix())]
    return samples, m.unreadable, test_only


# --------------------------------------------------------------------------- split CSV


def write_split_csv(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write ``split,class,path`` rows (absolute paths) atomically, to reproduce the split later.

    Written to a temp file in the same folder then ``os.replace``d, so a crash
    never leaves a half-written CSV. Refuses to write inside the dataset folder.
    """
    path = Path(path)
    if is_within(path, dataset.root):
        raise DatasetError(f"{path}: refusing to write inside the dataset folder {dataset.root}")
    from imgclf.fileio import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(_CSV_COLUMNS)
    for split in SPLIT_NAMES:
        for s in dataset.samples.get(split, []):
            writer.writerow([split, dataset.class_names[s.label], str(Path(os.path.abspath(s.path)))])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"))  # a non-UTF-8 file name keeps its bytes


def read_split_csv(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> dict[str, list[tuple[Path, str]]]:
    """Read a CSV written by ``write_split_csv``: split -> [(path, class_name)], file order kept.

    Relative paths are resolved against ``root`` (default: the CSV's folder).
    Split aliases (``val``) are accepted. Always returns all three split keys.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    out: dict[str, list[tuple[Path, str]]] = {split: [] for split in SPLIT_NAMES}
    try:
        fh = open(path, newline="", encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read split CSV ({exc.strerror or exc})") from None
    with fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in _CSV_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: split CSV lacks column(s) {', '.join(missing)} (expected split,class,path)"
            )
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            split_raw = (row.get("split") or "").strip()
            split = _ALIAS_TO_SPLIT.get(split_raw.lower())
            if split is None:
                raise DatasetError(f"{path}:{line}: unknown split {split_raw!r}")
            cls = (row.get("class") or "").strip()
            file_raw = row.get("path") or ""
            if not cls or not file_raw:
                raise DatasetError(f"{path}:{line}: empty class or path")
            p = Path(file_raw)
            if not p.is_absolute():
                p = base / p
            out[split].append((p, cls))
    return out


# --------------------------------------------------------------------------- predict inputs


def collect_image_paths(
    inputs: list[str | os.PathLike],
    recursive: bool = True,
    *,
    unreadable: list[tuple[Path, str]] | None = None,
) -> tuple[list[Path], list[str]]:
    """Expand files and folders into image paths for prediction; problems are returned, not raised.

    Folders contribute their image-extension files (sorted; recursively unless
    ``recursive=False``; hidden entries skipped; each real folder walked once, so a
    symlink loop is reported, not followed). Named files must have an image
    extension. Each real file is kept once, first occurrence wins, input order
    kept, so one bad argument never hides the results for the others. Folders that
    cannot be listed are named in ``problems`` with the reason and, when
    ``unreadable`` is given, appended to it as ``(folder, reason)`` so a caller can
    report them beside the images that failed to decode.
    """
    paths: list[Path] = []
    problems: list[str] = []
    seen: dict[object, Path] = {}

    def add(p: Path) -> None:
        try:
            st = os.stat(p)
            key: object = (st.st_dev, st.st_ino)
        except OSError:  # kept: its read error becomes its prediction row's error
            key = os.path.normcase(os.path.abspath(p))
        first = seen.get(key)
        if first is None:
            seen[key] = p
            paths.append(p)
        elif os.path.abspath(first) != os.path.abspath(p):
            problems.append(f"{p}: same file as {first}; predicted once")

    walk = _Walk([], problems)  # shared, so a folder reached from two inputs (or a loop) is walked once
    candidates: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            if walk.walked(p):  # inside an input already walked: its images are listed
                continue
            found = walk.images(p, recursive=recursive) if walk.claim_folder(p) else []
            if not found and not walk.unreadable_under(p):
                problems.append(f"{p}: folder contains no images ({', '.join(sorted(_EXTS))})")
            candidates.extend(found)
        elif p.is_file():
            if is_image_file(p):
                candidates.append(p)
            else:
                problems.append(f"{p}: not an image file name (expected one of {', '.join(sorted(_EXTS))})")
        elif p.exists() or p.is_symlink():
            problems.append(f"{p}: not a regular file or folder (or a broken link)")
        else:
            problems.append(f"{p}: no such file or folder")
    duplicates = walk.duplicates()
    for p in candidates:
        if p not in duplicates:
            add(p)
    if unreadable is not None:
        unreadable.extend(walk.unreadable)
    return paths, problems


def _labelled_eval_scan(data: str | os.PathLike, class_names: list[str]) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """``labelled_eval_samples`` plus the folders that could not be read."""
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    folder = root / "test" if (root / "test").is_dir() else root
    ignored: list[Path] = []
    warnings: list[str] = []
    walk = _Walk(ignored, warnings)
    folders = _scan_class_folders(folder, walk)
    for w in warnings:
        log.warning("%s", w)
    if not any(folders.values()):
        if walk.unreadable:
            raise DatasetError(f"{folder}: no readable images in class sub-folders; {walk.unreadable[0][0]}: {walk.unreadable[0][1]}")
        raise DatasetError(f"{folder}: no images in class sub-folders (expected {folder}/<class>/<image>)")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in folders if c not in index]
    if unknown:
        raise DatasetError(f"{folder}: class folder(s) {', '.join(unknown)} unknown to the model (classes: {', '.join(class_names)})")
    return [Sample(Path(p), index[c], "test") for c in sorted(folders) for p in folders[c]], walk.unreadable


def labelled_eval_samples(data: str | os.PathLike, class_names: list[str]):
    """Samples to evaluate: ``DATA/test/<class>/*`` if DATA has a test folder, else ``DATA/<class>/*``.

    Unlike training, one class folder is enough (e.g. a folder of malignant cases only).
    Unreadable folders and skipped links are logged as warnings.
    """
    return _labelled_eval_scan(data, class_names)[0]


def with_validation_folder(ds: Dataset, folder: str | os.PathLike) -> Dataset:
    """``ds`` with its validation split replaced by the labelled folder ``folder``;
    that folder's unreadable sub-folders join ``ds.unreadable``."""
    samples, unreadable = _labelled_eval_scan(folder, ds.class_names)
    samples = [dataclasses.replace(s, split="validation") for s in samples]
    new = dataclasses.replace(ds, samples={**ds.samples, "validation": samples}, split_source={**ds.split_source, "validation": f"folder {folder}"},
                              unreadable=[*ds.unreadable, *unreadable])
    return new
