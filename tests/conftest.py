"""Shared fixtures: an isolated feature cache, offline hubs, tiny synthetic image sets."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Never touch the user's caches; never wait on a model hub."""
    base = tmp_path_factory.mktemp("env")
    old = {k: os.environ.get(k) for k in ("IMGCLF_CACHE_DIR", "IMGCLF_OFFLINE", "TORCH_HOME", "HF_HUB_OFFLINE", "HF_HOME", "IMGCLF_AUTO_SWITCH_GAIN")}
    os.environ["IMGCLF_CACHE_DIR"] = str(base / "imgclf-cache")
    # engine auto keeps a model's export unless a test asks otherwise: timings would make tests flaky
    os.environ["IMGCLF_AUTO_SWITCH_GAIN"] = "inf"
    os.environ["IMGCLF_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TORCH_HOME"] = str(base / "torch-home")
    os.environ["HF_HOME"] = str(base / "hf-home")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def draw_shape(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A coloured shape on a noisy background; class = shape + its colour family."""
    bg = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.25, 0.38))
    cx, cy = (int(size / 2 + rng.integers(-size // 10, size // 10 + 1)) for _ in range(2))
    jitter = rng.integers(-30, 31, size=3)
    if kind == "circle":
        col = tuple(int(v) for v in np.clip(np.array([220, 40, 40]) + jitter, 0, 255))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif kind == "square":
        col = tuple(int(v) for v in np.clip(np.array([40, 60, 220]) + jitter, 0, 255))
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:
        col = tuple(int(v) for v in np.clip(np.array([40, 200, 60]) + jitter, 0, 255))
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    return img


def make_shapes_dataset(root: Path, counts: dict[str, int], classes=CLASSES, seed: int = 0, size: int = 96, ext: str = "jpg") -> Path:
    """``counts`` maps a split folder name ('' for flat) to images per class."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in classes:
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(c, rng, size).save(d / f"{c}_{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """Recipe layout: train/validation/test, 3 classes (read-only for tests)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), {"train": 12, "validation": 4, "test": 6})


@pytest.fixture(scope="session")
def trained_run(shapes_root, tmp_path_factory):
    """One real `imgclf train` run on the shapes set with the default recipe (Lite0+Lite1, frozen)."""
    from imgclf.cli.main import main

    project = tmp_path_factory.mktemp("runs")
    rc = main(["-q", "train", str(shapes_root), "--project", str(project), "--name", "shapes", "--no-progress", "--epochs", "20"])
    assert rc == 0
    return project / "shapes"


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def bundle_copy(run: Path, dest: Path, export_from: Path | None = None) -> Path:
    """The files a model folder needs (never the shared run folder itself: others read it);
    with ``export_from`` (the session's ``exported`` copy of the same bundle) also its fp32
    ONNX export, valid for the copy since the bundle is the same, so a test that is not about
    exporting saves the export's seconds."""
    dest.mkdir(parents=True)
    names = ("model.json", "model.safetensors", "split.csv", "neighbors.safetensors", "neighbors.json")
    for name in names:
        if name.startswith("neighbors") and not (run / name).exists():  # optional part of the bundle
            continue
        shutil.copy2(run / name, dest / name)
    if export_from is not None:
        assert all((export_from / n).read_bytes() == (run / n).read_bytes() for n in names[:2]), "another bundle's export"
        for name in ("model.onnx", "model.onnx.json"):
            shutil.copy2(export_from / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    """A copy of the trained run exported once per session through the CLI (fp32 + int8)."""
    from imgclf.cli.main import main

    base = tmp_path_factory.mktemp("exported")
    d = bundle_copy(trained_run, base / "model")
    images = base / "parity-images"
    for c in ("circle", "square", "triangle"):
        (images / c).mkdir(parents=True)
    split = [line.split(",") for line in (trained_run / "split.csv").read_text().splitlines()[1:]]
    for s, c, p in split:
        if s == "test" and len(list((images / c).iterdir())) < 2:
            shutil.copy2(p, images / c / Path(p).name)
    rc = main(["-q", "export", str(d), "--images", str(images), "--quantize", "int8", "--calibration-size", "8"])
    assert rc == 0
    return d


CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def chromium_path() -> str | None:
    """Debian's chromium (.ci/run installs it); Playwright downloads no browser here."""
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


def browser_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None and chromium_path() is not None


def launch_chromium(pw):
    """Headless Chromium from a ``sync_playwright()`` context."""
    return pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


@contextlib.contextmanager
def serve_process(model: Path, log_dir: Path, *args: str):
    """`python -m imgclf serve MODEL --port 0 ARGS` in its own process: yields (base url, process)
    once /healthz answers 200, and stops it afterwards (terminate, then kill)."""
    import httpx

    err = open(log_dir / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", str(model), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    base = None
    deadline = time.monotonic() + 120
    try:
        while base is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                m = re.search(r"on (http://127\.0\.0\.1:\d+/)", lines.get(timeout=1))
            except queue.Empty:
                continue
            base = m.group(1) if m else None
        if base is None:
            err.seek(0)
            pytest.fail(f"imgclf serve did not start: {err.read()[-2000:]}")
        for _ in range(100):  # the line is printed just before uvicorn accepts
            try:
                if httpx.get(base + "healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("imgclf serve never answered /healthz with 200")
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        err.close()


def watched_page(browser, width: int, height: int):
    """A new page of ``browser`` and the lists it fills: every request url, console errors and page errors."""
    page = browser.new_page(viewport={"width": width, "height": height})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, requests, errors
