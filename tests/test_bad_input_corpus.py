"""A corpus of bad input, generated in ``tmp_path`` and run through the CLI in-process.

Every case checks the same contract (see ``check``): the exit code (0 where imgclf should
cope and report, 2 for the user's error); on an error exactly one ``imgclf: error:`` line
and never a traceback; the input folders (dataset, images, model) byte-identical
afterwards; no temporary file and no partial ``--out`` left behind. Cheap commands
(inspect, predict on the session model, evaluate) carry most cases; the few ``train``
cases either fail before any work or train two epochs on a handful of images.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import pickle
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import bundle_copy, draw_shape
from imgclf.cli.main import main

# the corpus's own odd files make these libraries warn; the warnings are expected here
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Detected pickle protocol:UserWarning")

# --------------------------------------------------------------------------- helpers


def tree_digest(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` (links not followed): files by size, sha256, mode and
    mtime, links by their target, folders by their mode. Stronger than conftest's
    size+mtime snapshot: a rewrite with other bytes of the same size is caught too."""
    snap: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    snap[p] = ("link", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    snap[p] = ("dir", stat.S_IMODE(st.st_mode))
                else:
                    with open(p, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                    snap[p] = ("file", st.st_size, digest, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return snap


@dataclass
class Outcome:
    rc: int
    out: str
    err: str


def run_cli(*argv: str) -> Outcome:
    """``imgclf -q ARGV`` in-process, its streams set up as the interpreter sets them under a
    UTF-8 locale: stdout strict, stderr ``backslashreplace`` (pytest's capture is stricter
    on stderr and laxer on stdout than a terminal)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", newline="")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["-q", *argv])
    finally:
        logger = logging.getLogger("imgclf")
        for handler in list(logger.handlers):
            if getattr(handler, "stream", None) in (out, err):
                logger.removeHandler(handler)
    out.flush()
    err.flush()
    return Outcome(rc, out.buffer.getvalue().decode("utf-8"), err.buffer.getvalue().decode("utf-8"))


def check(result: Outcome, rc: int, *, tmp_path: Path, untouched: dict[str, tuple], roots: list[Path], out: Path | None = None,
          error_has: str | None = None) -> None:
    """The contract every case shares."""
    text = result.out + result.err
    assert "Traceback" not in text, text
    assert "unexpected error" not in text, text
    assert result.rc == rc, text
    error_lines = [line for line in result.err.splitlines() if line.startswith("imgclf: error:")]
    if rc == 0:
        assert not error_lines, text
    else:
        assert len(error_lines) == 1, text
        if error_has is not None:
            assert error_has.lower() in error_lines[0].lower(), error_lines[0]
        if out is not None:
            assert not os.path.lexists(out), f"a failed command left {out} behind"
    assert tree_digest(*roots) == untouched, "an input folder changed"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def save_shape(path: Path, kind: str = "circle", seed: int = 0, size: int = 48, fmt: str | None = None, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape(kind, np.random.default_rng(seed), size).save(path, format=fmt, **save_kw)
    return path


def encoded(kind: str = "circle", fmt: str = "PNG", seed: int = 0, size: int = 48) -> bytes:
    buf = io.BytesIO()
    draw_shape(kind, np.random.default_rng(seed), size).save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def random_bytes(n: int = 4096, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"features.0.weight": _Payload(marker)})


# --------------------------------------------------------------------------- image files: builders


def _write(data: bytes) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return build


def _truncated(fmt: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        data = encoded("square", fmt, seed=3, size=96)
        _write(data[: len(data) // 2])(path)

    return build


def _pil(make: Callable[[], Image.Image], fmt: str, **save_kw) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        make().save(path, format=fmt, **save_kw)

    return build


def _shape(kind: str = "triangle", seed: int = 5, size: int = 48) -> Image.Image:
    return draw_shape(kind, np.random.default_rng(seed), size)


def _sixteen_bit() -> Image.Image:
    ramp = (np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) * 28).astype(np.uint16)
    return Image.fromarray(ramp)


def _with_alpha(mode: str) -> Callable[[], Image.Image]:
    def make() -> Image.Image:
        img = _shape().convert(mode)
        alpha = Image.new("L", img.size, 0)
        alpha.paste(255, (8, 8, 40, 40))
        img.putalpha(alpha)
        return img

    return make


def _palette() -> Image.Image:
    img = _shape().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    return img


def _frames(n: int = 3) -> list[Image.Image]:
    return [_shape(k, seed=i) for i, k in enumerate(("circle", "square", "triangle")[:n])]


def _animated_gif(path: Path) -> None:
    frames = _frames()
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _multipage_tiff(path: Path) -> None:
    frames = _frames()
    frames[0].save(path, format="TIFF", save_all=True, append_images=frames[1:])


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    _shape(size=64).crop((0, 0, 64, 40)).save(path, format="JPEG", exif=exif.tobytes())


def _broken_exif(path: Path) -> None:
    _shape().save(path, format="JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")


def _in_folder(build: Callable[[Path], None], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    build(path)


@dataclass(frozen=True)
class FileCase:
    """One odd file in a folder of images: ``name`` is its path below the folder."""

    name: str
    build: Callable[[Path], None]
    decodes: bool  # True: predicted normally; False: a row with its error (the command still exits 0)
    error_has: str = ""


FILE_CASES = {
    "zero-byte": FileCase("empty.jpg", _write(b""), False, "empty"),
    "truncated-jpeg": FileCase("cut.jpg", _truncated("JPEG"), False, "truncated"),
    "truncated-png": FileCase("cut.png", _truncated("PNG"), False, "truncated"),
    "random-bytes-png": FileCase("noise.png", _write(random_bytes()), False, "not an image"),
    "text-named-jpg": FileCase("notes.jpg", _write(b"these are not pixels\n"), False, "not an image"),
    "png-named-jpg": FileCase("really-png.jpg", _write(encoded("circle", "PNG", seed=7)), True),
    "jpeg-named-png": FileCase("really-jpeg.png", _write(encoded("square", "JPEG", seed=8)), True),
    "decompression-bomb": FileCase("bomb.png", _write(bomb_png()), False, "too large"),
    "png-16bit": FileCase("deep.png", _pil(_sixteen_bit, "PNG"), True),
    "cmyk-jpeg": FileCase("print.jpg", _pil(lambda: _shape().convert("CMYK"), "JPEG"), True),
    "rgba-png": FileCase("alpha.png", _pil(_with_alpha("RGB"), "PNG"), True),
    "la-png": FileCase("grey-alpha.png", _pil(_with_alpha("L"), "PNG"), True),
    "palette-png": FileCase("palette.png", _pil(_palette, "PNG"), True),
    "animated-gif": FileCase("moving.gif", _animated_gif, True),
    "multipage-tiff": FileCase("pages.tiff", _multipage_tiff, True),
    "exif-rotated-jpeg": FileCase("phone.jpg", _exif_rotated, True),
    "broken-exif-jpeg": FileCase("bad-exif.jpg", _broken_exif, True),
    "one-pixel": FileCase("dot.png", _pil(lambda: Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), True),
    "upper-case-extension": FileCase("SHOUT.JPG", _pil(_shape, "JPEG"), True),
    "unicode-file-name": FileCase("naïve_画像_🙂.png", _pil(_shape, "PNG"), True),
    "newline-in-file-name": FileCase("two\nlines,\"quoted\".png", _pil(_shape, "PNG"), True),
    "unicode-newline-folder": FileCase("dossier é\nplié/图/x.png", _pil(_shape, "PNG"), True),
    "dash-file-name": FileCase("-rf.png", _pil(_shape, "PNG"), True),
    "nested-folders": FileCase("a/b/c/d/deep.png", _pil(_shape, "PNG"), True),
    "folder-named-like-image": FileCase("looks.jpg/inside.png", _pil(_shape, "PNG"), True),
}


def _dangling_link(path: Path) -> None:
    os.symlink(path.parent / "deleted-long-ago.jpg", path)


GOOD = "good.png"


def image_folder(root: Path, case: FileCase) -> Path:
    """``root`` with one good image and the case's file."""
    save_shape(root / GOOD, "circle", seed=11)
    _in_folder(case.build, root / case.name)
    return root


# --------------------------------------------------------------------------- predict on odd files


@pytest.fixture(scope="module")
def model_dir(trained_run, tmp_path_factory) -> Path:
    """A private copy of the session model (its folder is snapshotted by every case)."""
    return bundle_copy(trained_run, tmp_path_factory.mktemp("corpus-model") / "model")


def _predict_rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in json.loads(out.read_text())["predictions"]}


@pytest.mark.parametrize("kind", list(FILE_CASES))
def test_predict_copes_with_odd_files(kind, model_dir, tmp_path):
    case = FILE_CASES[kind]
    images = image_folder(tmp_path / "images", case)
    out = tmp_path / "results" / "pred.json"
    before = tree_digest(images, model_dir)
    result = run_cli("predict", str(model_dir), str(images), "--out", str(out), "--no-progress")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[images, model_dir])
    rows = _predict_rows(out)
    assert set(rows) == {str(images / GOOD), str(images / case.name)}
    assert rows[str(images / GOOD)]["predicted"] in {"circle", "square", "triangle"}
    row = rows[str(images / case.name)]
    if case.decodes:
        assert row["error"] is None and row["predicted"] in {"circle", "square", "triangle"}, row
    else:
        assert row["predicted"] is None and case.error_has in row["error"].lower(), row


def test_predict_csv_keeps_awkward_names_one_row_each(model_dir, tmp_path):
    images = tmp_path / "images"
    names = [FILE_CASES[k].name for k in ("newline-in-file-name", "unicode-newline-folder", "dash-file-name", "zero-byte")]
    for k in ("newline-in-file-name", "unicode-newline-folder", "dash-file-name", "zero-byte"):
        _in_folder(FILE_CASES[k].build, images / FILE_CASES[k].name)
    out = tmp_path / "pred.csv"
    before = tree_digest(images, model_dir)
    result = run_cli("predict", str(model_dir), str(images), "--out", str(out), "--no-progress")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[images, model_dir])
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert sorted(r["path"] for r in rows) == sorted(str(images / n) for n in names)
    assert [bool(r["error"]) for r in sorted(rows, key=lambda r: r["path"])] == [n == "empty.jpg" for n in sorted(names)]


# --------------------------------------------------------------------------- predict: the user's mistakes


@dataclass(frozen=True)
class ArgCase:
    """A predict command line built in ``tmp``: returns (argv after the model, --out or None)."""

    argv: Callable[[Path], tuple[list[str], Path | None]]
    rc: int
    error_has: str = ""


def _one_image(tmp: Path) -> Path:
    return save_shape(tmp / "images" / GOOD, "circle", seed=11).parent


def _out_existing_dir(tmp):
    images = _one_image(tmp)
    (tmp / "taken").mkdir()
    return [str(images), "--out", str(tmp / "taken")], tmp / "taken" / "never"


def _out_inside_input(tmp):
    images = _one_image(tmp)
    return [str(images), "--out", str(images / "pred.csv")], images / "pred.csv"


def _out_under_a_file(tmp):
    images = _one_image(tmp)
    (tmp / "plain").write_text("x")
    return [str(images), "--out", str(tmp / "plain" / "pred.csv")], tmp / "plain" / "pred.csv"


def _missing_path(tmp):
    _one_image(tmp)
    return [str(tmp / "images" / "nope.jpg"), "--out", str(tmp / "pred.csv")], tmp / "pred.csv"


def _folder_without_images(tmp):
    (tmp / "images").mkdir()
    (tmp / "images" / "readme.txt").write_text("no pictures here")
    return [str(tmp / "images"), "--out", str(tmp / "pred.csv")], tmp / "pred.csv"


def _non_image_name(tmp):
    (tmp / "images").mkdir()
    (tmp / "images" / "table.csv").write_bytes(encoded())
    return [str(tmp / "images" / "table.csv"), "--out", str(tmp / "pred.csv")], tmp / "pred.csv"


def _dangling_link_argument(tmp):
    (tmp / "images").mkdir()
    _dangling_link(tmp / "images" / "gone.jpg")
    return [str(tmp / "images" / "gone.jpg"), "--out", str(tmp / "pred.csv")], tmp / "pred.csv"


def _dangling_link_in_folder(tmp):
    images = _one_image(tmp)
    _dangling_link(images / "gone.jpg")
    return [str(images), "--out", str(tmp / "pred.json")], tmp / "pred.json"


def _dash_name_unescaped(tmp):
    images = _one_image(tmp)
    save_shape(images / "-x.png")
    os.chdir(images)
    return ["-x.png", "--out", str(tmp / "pred.csv")], tmp / "pred.csv"


def _dash_name_after_double_dash(tmp):
    images = _one_image(tmp)
    save_shape(images / "-x.png")
    os.chdir(images)
    return ["--out", str(tmp / "pred.csv"), "--", "-x.png"], tmp / "pred.csv"


def _zero_byte_named_directly(tmp):
    (tmp / "images").mkdir()
    (tmp / "images" / "empty.png").write_bytes(b"")
    return [str(tmp / "images" / "empty.png"), "--out", str(tmp / "pred.csv")], tmp / "pred.csv"


ARG_CASES = {
    "out-is-existing-folder": ArgCase(_out_existing_dir, 2, "folder"),
    "out-inside-input-folder": ArgCase(_out_inside_input, 2, "inside"),
    "out-under-a-file": ArgCase(_out_under_a_file, 2, "not a folder"),
    "missing-input": ArgCase(_missing_path, 2, "no such file"),
    "folder-without-images": ArgCase(_folder_without_images, 2, "no image"),
    "non-image-file-name": ArgCase(_non_image_name, 2, "not an image file name"),
    "dangling-link-argument": ArgCase(_dangling_link_argument, 2, "broken link"),
    "dangling-link-in-folder": ArgCase(_dangling_link_in_folder, 0),
    "dash-name-as-option": ArgCase(_dash_name_unescaped, 2, "unrecognized arguments: -x.png"),
    "dash-name-after-double-dash": ArgCase(_dash_name_after_double_dash, 0),
    "zero-byte-named-directly": ArgCase(_zero_byte_named_directly, 0),
}


@pytest.mark.parametrize("kind", list(ARG_CASES))
def test_predict_arguments(kind, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cases may chdir; undone afterwards
    case = ARG_CASES[kind]
    args, out = case.argv(tmp_path)
    inputs = tmp_path / "images"
    before = tree_digest(inputs, model_dir)
    result = run_cli("predict", str(model_dir), *args, "--no-progress")
    check(result, case.rc, tmp_path=tmp_path, untouched=before, roots=[inputs, model_dir], out=out, error_has=case.error_has)
    if case.rc == 0:
        assert out.is_file()
        if kind == "dangling-link-in-folder":
            rows = _predict_rows(out)
            assert rows[str(inputs / GOOD)]["error"] is None
            link = rows.get(str(inputs / "gone.jpg"))
            assert link is None or (link["predicted"] is None and link["error"]), link


# --------------------------------------------------------------------------- tampered bundles and weights


def _edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        meta = json.loads((model / "model.json").read_text())
        change(meta)
        (model / "model.json").write_text(json.dumps(meta))

    return tamper


def _drop_class(meta: dict) -> None:
    meta["class_names"] = meta["class_names"][:-1]


def _unknown_backbone(meta: dict) -> None:
    meta["backbone"]["name"] = "efficientnet_lite9000"


def _missing_keys(meta: dict) -> None:
    del meta["head"]
    del meta["preprocessing"]


def _bad_preprocessing(meta: dict) -> None:
    meta["preprocessing"]["input_size"] = -3


def _unknown_tta(meta: dict) -> None:
    meta["tta"] = "spin"


def _string_threshold(meta: dict) -> None:
    meta["threshold"] = "high"


def _truncate_tensors(model: Path) -> None:
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])


def _wrong_shapes(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors = {k: (v[:-1].clone() if v.ndim else v) for k, v in tensors.items()}  # one row fewer everywhere
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "imgclf-bundle/1"})


def _rename_tensors(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    save_file({f"x{k}": v for k, v in tensors.items()}, str(model / "model.safetensors"))


BUNDLE_CASES = {
    "json-wrong-class-count": (_edit_json(_drop_class), "classes"),
    "json-unknown-backbone": (_edit_json(_unknown_backbone), "efficientnet_lite9000"),
    "json-missing-keys": (_edit_json(_missing_keys), "missing keys"),
    "json-bad-preprocessing": (_edit_json(_bad_preprocessing), "preprocessing"),
    "json-unknown-tta": (_edit_json(_unknown_tta), "spin"),
    "json-string-threshold": (_edit_json(_string_threshold), "threshold"),
    "json-not-json": (lambda m: (m / "model.json").write_bytes(random_bytes(300)), "not valid json"),
    "json-empty": (lambda m: (m / "model.json").write_bytes(b""), "not valid json"),
    "json-missing": (lambda m: (m / "model.json").unlink(), "model.json"),
    "tensors-truncated": (_truncate_tensors, "model.safetensors"),
    "tensors-wrong-shapes": (_wrong_shapes, "sha256 differs"),  # model.json records the tensors' hash
    "tensors-renamed": (_rename_tensors, "sha256 differs"),
    "tensors-random-bytes": (lambda m: (m / "model.safetensors").write_bytes(random_bytes()), "model.safetensors"),
    "tensors-missing": (lambda m: (m / "model.safetensors").unlink(), "model.safetensors"),
}


@pytest.mark.parametrize("kind", list(BUNDLE_CASES))
def test_predict_refuses_a_tampered_bundle(kind, trained_run, tmp_path):
    tamper, error_has = BUNDLE_CASES[kind]
    model = bundle_copy(trained_run, tmp_path / "model")
    tamper(model)
    images = _one_image(tmp_path)
    out = tmp_path / "pred.csv"
    before = tree_digest(images, model)
    result = run_cli("predict", str(model), str(images), "--out", str(out), "--no-progress")
    check(result, 2, tmp_path=tmp_path, untouched=before, roots=[images, model], out=out, error_has=error_has)


def _pickle_weights(tmp: Path) -> tuple[Path, Path]:
    marker = tmp / "pwned"
    path = tmp / "weights" / "evil.pth"
    path.parent.mkdir()
    path.write_bytes(malicious_pickle(marker))
    return path, marker


def _torch_zip_weights(tmp: Path) -> tuple[Path, Path]:
    import torch

    marker = tmp / "pwned"
    path = tmp / "weights" / "evil.pt"
    path.parent.mkdir()
    torch.save({"features.0.weight": _Payload(marker)}, path)
    return path, marker


def _random_weights(suffix: str) -> Callable[[Path], tuple[Path, Path]]:
    def build(tmp: Path) -> tuple[Path, Path]:
        path = tmp / "weights" / f"noise{suffix}"
        path.parent.mkdir()
        path.write_bytes(random_bytes(2048))
        return path, tmp / "pwned"

    return build


def _text_weights(tmp: Path) -> tuple[Path, Path]:
    path = tmp / "weights" / "weights.txt"
    path.parent.mkdir()
    path.write_text("imagenet")
    return path, tmp / "pwned"


def _dangling_weights(tmp: Path) -> tuple[Path, Path]:
    (tmp / "weights").mkdir()
    _dangling_link(tmp / "weights" / "moved.pth")
    return tmp / "weights" / "moved.pth", tmp / "pwned"


WEIGHTS_CASES = {
    "malicious-pickle": _pickle_weights,
    "malicious-torch-zip": _torch_zip_weights,
    "random-bytes-pth": _random_weights(".pth"),
    "random-bytes-safetensors": _random_weights(".safetensors"),
    "text-file": _text_weights,
    "dangling-link": _dangling_weights,
}


def test_the_malicious_pickle_is_live(tmp_path):
    """The payload does run when unpickled unsafely, so its marker staying absent below means something."""
    path, marker = _pickle_weights(tmp_path)
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", list(WEIGHTS_CASES))
def test_predict_refuses_bad_weights(kind, model_dir, tmp_path):
    weights, marker = WEIGHTS_CASES[kind](tmp_path)
    images = _one_image(tmp_path)
    out = tmp_path / "pred.csv"
    before = tree_digest(images, model_dir, weights.parent)
    result = run_cli("predict", str(model_dir), str(images), "--weights", str(weights), "--out", str(out), "--no-progress")
    check(result, 2, tmp_path=tmp_path, untouched=before, roots=[images, model_dir, weights.parent], out=out, error_has="weights")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["malicious-pickle", "malicious-torch-zip", "random-bytes-pth"])
def test_train_refuses_bad_weights_before_any_work(kind, tmp_path):
    """Train reads a weights file into the backbone: the pickle must be refused, never run."""
    weights, marker = WEIGHTS_CASES[kind](tmp_path)
    data = tiny_dataset(tmp_path / "data")
    project = tmp_path / "runs"
    before = tree_digest(data, weights.parent)
    result = run_cli("train", str(data), "--weights", str(weights), "--project", str(project), "--recipe", "fast", "--epochs", "2",
                     "--no-report", "--no-progress")
    check(result, 2, tmp_path=tmp_path, untouched=before, roots=[data, weights.parent], error_has="pickled")
    assert not marker.exists()
    assert not project.exists() or not any(project.iterdir()), "the weights were checked after a run folder was made"


# --------------------------------------------------------------------------- datasets: inspect, train, evaluate


def tiny_dataset(root: Path, classes=("circle", "square"), n: int = 4) -> Path:
    for c in classes:
        for i in range(n):
            save_shape(root / c / f"{c}_{i}.png", c if c in ("circle", "square", "triangle") else "circle", seed=100 + i)
    return root


@pytest.mark.parametrize("kind", list(FILE_CASES))
def test_inspect_reports_odd_files(kind, tmp_path):
    case = FILE_CASES[kind]
    data = tiny_dataset(tmp_path / "data", n=2)
    _in_folder(case.build, data / "circle" / case.name)
    before = tree_digest(data)
    result = run_cli("inspect", str(data), "--json", "--no-progress", "--no-near-duplicates")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[data])
    report = json.loads(result.out)
    bad = {p["path"] for p in report["problems"]}
    assert (str(data / "circle" / case.name) in bad) != case.decodes, report["problems"]


def _empty(root: Path) -> None:
    root.mkdir()


def _one_class(root: Path) -> None:
    tiny_dataset(root, classes=("circle",))


def _class_folder_is_a_file(root: Path) -> None:
    tiny_dataset(root)
    (root / "triangle").write_bytes(encoded("triangle"))


def _root_is_a_file(root: Path) -> None:
    root.write_bytes(encoded())


def _only_bad_images_in_a_class(root: Path) -> None:
    tiny_dataset(root, classes=("circle",))
    (root / "square").mkdir()
    (root / "square" / "a.png").write_bytes(b"")
    (root / "square" / "b.jpg").write_bytes(random_bytes())


def _empty_class_folder(root: Path) -> None:
    tiny_dataset(root)
    (root / "triangle").mkdir()


def _loose_images_beside_classes(root: Path) -> None:
    tiny_dataset(root)
    save_shape(root / "stray.png")


DATASET_CASES = {
    "empty-dataset": (_empty, "no class folders"),
    "one-class": (_one_class, "one class"),
    "root-is-a-file": (_root_is_a_file, "not a folder"),
    "class-without-readable-images": (_only_bad_images_in_a_class, "no readable"),
    "empty-class-folder": (_empty_class_folder, "no images"),
    "missing-root": (lambda root: None, "does not exist"),
}


def assert_no_usable_run(project: Path) -> None:
    """A failed train leaves no run folder, or one that run.json marks failed (so no reader takes it for a model)."""
    for run in project.iterdir() if project.exists() else ():
        status = json.loads((run / "run.json").read_text())
        assert status["status"] == "failed", status


@pytest.mark.parametrize("kind", list(DATASET_CASES))
def test_train_refuses_an_unusable_dataset(kind, tmp_path):
    build, error_has = DATASET_CASES[kind]
    data = tmp_path / "data"
    build(data)
    project = tmp_path / "runs"
    roots = [data] if data.is_dir() else []
    before = tree_digest(*roots)
    result = run_cli("train", str(data), "--project", str(project), "--recipe", "fast", "--epochs", "2", "--no-report", "--no-progress")
    check(result, 2, tmp_path=tmp_path, untouched=before, roots=roots, error_has=error_has)
    assert_no_usable_run(project)


def _dangling_class_link(root: Path) -> None:
    tiny_dataset(root)
    _dangling_link(root / "triangle")


def _split_is_a_file(root: Path) -> None:
    tiny_dataset(root / "test")
    (root / "train").write_bytes(b"")


INSPECT_DATASET_CASES = {
    "empty-dataset": (_empty, 2, "no class folders"),
    "one-class": (_one_class, 2, "one class"),
    "root-is-a-file": (_root_is_a_file, 2, "not a folder"),
    "missing-root": (lambda root: None, 2, "does not exist"),
    "split-folder-is-a-file": (_split_is_a_file, 2, ""),
    "class-folder-is-a-file": (_class_folder_is_a_file, 0, ""),
    "dangling-class-link": (_dangling_class_link, 0, ""),
    "loose-images-beside-classes": (_loose_images_beside_classes, 0, ""),
}


@pytest.mark.parametrize("kind", list(INSPECT_DATASET_CASES))
def test_inspect_dataset_layouts(kind, tmp_path):
    build, rc, error_has = INSPECT_DATASET_CASES[kind]
    data = tmp_path / "data"
    build(data)
    roots = [data] if data.is_dir() else []
    before = tree_digest(*roots)
    result = run_cli("inspect", str(data), "--json", "--no-progress")
    check(result, rc, tmp_path=tmp_path, untouched=before, roots=roots, error_has=error_has)
    if rc == 0:
        report = json.loads(result.out)
        assert report["class_names"] == ["circle", "square"]
        assert report["totals"]["total"] == 8


# --------------------------------------------------------------------------- names that are not UTF-8

# Linux file names are bytes; a Latin-1 name (an old zip, a Windows share) reaches Python as a
# str with surrogates (os.fsdecode), which strict UTF-8 encoding refuses.
LATIN1_GOOD = b"caf\xe9.png"
LATIN1_EMPTY = b"vide\xff.jpg"


def latin1_images(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = Path(os.fsdecode(os.fsencode(folder) + b"/" + LATIN1_GOOD))
    empty = Path(os.fsdecode(os.fsencode(folder) + b"/" + LATIN1_EMPTY))
    save_shape(good, "circle", seed=11, fmt="PNG")
    empty.write_bytes(b"")
    return good, empty


@pytest.mark.parametrize("fmt", ["json", "csv", "stdout"])
def test_predict_non_utf8_file_names(fmt, model_dir, tmp_path):
    images = tmp_path / "images"
    good, empty = latin1_images(images)
    out = tmp_path / f"pred.{fmt}"
    before = tree_digest(images, model_dir)
    result = run_cli("predict", str(model_dir), str(images), *(["--out", str(out)] if fmt != "stdout" else []), "--no-progress")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[images, model_dir])
    if fmt == "json":
        rows = _predict_rows(out)
    else:
        text = result.out if fmt == "stdout" else out.read_bytes().decode("utf-8", "surrogateescape")
        rows = {r["path"]: r for r in csv.DictReader(io.StringIO(text, newline=""))}
    assert len(rows) == 2
    good_row, empty_row = (rows[str(good)], rows[str(empty)]) if fmt != "stdout" else sorted(rows.values(), key=lambda r: bool(r["error"]))
    assert good_row["predicted"] == "circle" and not good_row["error"]
    assert "empty" in empty_row["error"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_inspect_non_utf8_file_names(fmt, tmp_path):
    data = tiny_dataset(tmp_path / "data", n=2)
    good, empty = latin1_images(data / "circle")
    before = tree_digest(data)
    result = run_cli("inspect", str(data), *(["--json"] if fmt == "json" else []), "--no-progress")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[data])
    if fmt == "json":
        report = json.loads(result.out)
        assert [p["path"] for p in report["problems"]] == [str(empty)]
        assert report["totals"]["per_class"]["circle"] == 4
    else:
        assert "Problems: 1" in result.out and "vide\\xff.jpg" in result.out  # the name's byte, shown as an escape


def test_train_non_utf8_file_names(tmp_path):
    data = tiny_dataset(tmp_path / "data", n=5)
    good, empty = latin1_images(data / "circle")
    project = tmp_path / "runs"
    before = tree_digest(data)
    result = run_cli("train", str(data), "--project", str(project), "--name", "latin1", "--recipe", "fast", "--epochs", "2",
                     "--no-report", "--no-progress", "--bootstrap", "0")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[data])
    skipped = (project / "latin1" / "skipped.csv").read_bytes().decode("utf-8", "surrogateescape")
    assert str(empty) in skipped


# --------------------------------------------------------------------------- --out naming an input


def _out_is_the_input_image(tmp, model):
    image = save_shape(tmp / "images" / GOOD, "circle", seed=11)
    return ["predict", str(model), str(image), "--out", str(image)]


def _predict_out_is_model_json(tmp, model):
    images = _one_image(tmp)
    return ["predict", str(model), str(images), "--out", str(model / "model.json")]


def _evaluate_out_is_model_json(tmp, model):
    data = eval_folder(tmp / "images")
    return ["evaluate", str(model), str(data), "--out", str(model / "model.json"), "--bootstrap", "0"]


@pytest.mark.parametrize("build", [_out_is_the_input_image, _predict_out_is_model_json, _evaluate_out_is_model_json],
                         ids=["predict-out-is-the-input-image", "predict-out-is-model-json", "evaluate-out-is-model-json"])
def test_out_never_overwrites_an_input(build, trained_run, tmp_path):
    model = bundle_copy(trained_run, tmp_path / "model")
    argv = build(tmp_path, model)
    before = tree_digest(tmp_path / "images", model)
    result = run_cli(*argv, "--no-progress")
    check(result, 2, tmp_path=tmp_path, untouched=before, roots=[tmp_path / "images", model])


def test_a_failed_predict_keeps_the_previous_out_file(tmp_path, trained_run):
    model = bundle_copy(trained_run, tmp_path / "model")
    _truncate_tensors(model)
    images = _one_image(tmp_path)
    out = tmp_path / "pred.csv"
    out.write_text("yesterday's results\n")
    before = tree_digest(images, model)
    result = run_cli("predict", str(model), str(images), "--out", str(out), "--no-progress")
    check(result, 2, tmp_path=tmp_path, untouched=before, roots=[images, model], error_has="model.safetensors")
    assert out.read_text() == "yesterday's results\n"


def messy_dataset(root: Path) -> dict[str, Path]:
    """Two classes under awkward names, nested folders, odd formats, a stray file and
    undecodable files among them; returns the files training must skip."""
    classes = {"café ☕": "circle", "-dash\nclass": "square"}
    bad: dict[str, Path] = {}
    for name, shape in classes.items():
        for i in range(5):
            save_shape(root / name / ("deep/er" if i % 2 else "") / f"{shape}_{i}.png", shape, seed=200 + i)
    odd = ("cmyk-jpeg", "png-16bit", "rgba-png", "animated-gif", "multipage-tiff", "exif-rotated-jpeg", "unicode-file-name", "png-named-jpg")
    for k in odd:
        _in_folder(FILE_CASES[k].build, root / "café ☕" / FILE_CASES[k].name)
    for k in ("zero-byte", "truncated-jpeg", "decompression-bomb", "random-bytes-png"):
        path = root / "-dash\nclass" / FILE_CASES[k].name
        _in_folder(FILE_CASES[k].build, path)
        bad[k] = path
    (root / "stray.txt").write_text("not a class")
    (root / "notes").write_bytes(b"a file where a class folder could be")
    return bad


def test_train_copes_with_a_messy_dataset(tmp_path):
    data = tmp_path / "data"
    bad = messy_dataset(data)
    project = tmp_path / "runs"
    before = tree_digest(data)
    result = run_cli("train", str(data), "--project", str(project), "--name", "messy", "--recipe", "fast", "--epochs", "2",
                     "--no-report", "--no-progress", "--bootstrap", "0")
    check(result, 0, tmp_path=tmp_path, untouched=before, roots=[data])
    run = project / "messy"
    meta = json.loads((run / "model.json").read_text())
    assert sorted(meta["class_names"]) == sorted(["café ☕", "-dash\nclass"])
    skipped = {r["path"] for r in csv.DictReader(io.StringIO((run / "skipped.csv").read_text(encoding="utf-8"), newline=""))}
    assert skipped == {str(p) for p in bad.values()}
    # the model trained on awkward class names predicts and evaluates on the same folder
    images = tmp_path / "images"
    save_shape(images / "x.png")
    out = tmp_path / "pred.csv"
    result = run_cli("predict", str(run), str(images), "--out", str(out), "--no-progress")
    check(result, 0, tmp_path=tmp_path, untouched=tree_digest(images), roots=[images])
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert len(rows) == 1 and rows[0]["predicted"] in meta["class_names"]


# --------------------------------------------------------------------------- evaluate


def eval_folder(root: Path, extra: Callable[[Path], None] | None = None) -> Path:
    for c in ("circle", "square", "triangle"):
        save_shape(root / c / f"{c}.png", c, seed=300)
    if extra:
        extra(root)
    return root


def _eval_bad_files(root):
    for k in ("zero-byte", "truncated-png", "decompression-bomb"):
        _in_folder(FILE_CASES[k].build, root / "square" / FILE_CASES[k].name)


def _eval_nested(root):
    save_shape(root / "circle" / "x" / "y" / "nested.png", "circle", seed=301)


def _eval_unknown_class(root):
    save_shape(root / "hexagon" / "h.png", "circle", seed=302)


def _eval_class_is_a_file(root):
    (root / "triangle.png").write_bytes(encoded("triangle"))


@dataclass(frozen=True)
class EvalCase:
    build: Callable[[Path], Path]
    rc: int
    error_has: str = ""
    out: Callable[[Path, Path], Path] = field(default=lambda tmp, data: tmp / "metrics.json")


EVAL_CASES = {
    "bad-files-among-good": EvalCase(lambda d: eval_folder(d, _eval_bad_files), 0),
    "nested-folders": EvalCase(lambda d: eval_folder(d, _eval_nested), 0),
    "one-class-only": EvalCase(lambda d: save_shape(d / "circle" / "c.png", "circle", seed=300).parent.parent, 0),
    "stray-file-at-root": EvalCase(lambda d: eval_folder(d, _eval_class_is_a_file), 0),
    "unknown-class-folder": EvalCase(lambda d: eval_folder(d, _eval_unknown_class), 2, "hexagon"),
    "empty-folder": EvalCase(lambda d: (d.mkdir(), d)[1], 2, "no images"),
    "out-is-existing-folder": EvalCase(eval_folder, 2, "folder", lambda tmp, data: (tmp / "taken").mkdir() or tmp / "taken"),
    "out-inside-data": EvalCase(eval_folder, 2, "inside", lambda tmp, data: data / "metrics.json"),
}


@pytest.mark.parametrize("kind", list(EVAL_CASES))
def test_evaluate(kind, model_dir, tmp_path):
    case = EVAL_CASES[kind]
    data = case.build(tmp_path / "data")
    out = case.out(tmp_path, data)
    before = tree_digest(data, model_dir)
    result = run_cli("evaluate", str(model_dir), str(data), "--out", str(out), "--bootstrap", "0", "--no-progress")
    check(result, case.rc, tmp_path=tmp_path, untouched=before, roots=[data, model_dir], out=None if out.is_dir() else out,
          error_has=case.error_has)
    if case.rc == 0:
        metrics = json.loads(out.read_text())
        if kind == "bad-files-among-good":
            assert len(metrics["skipped"]) == 3
