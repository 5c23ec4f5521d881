"""Failed and unfinished runs do not pass for usable models (run.json: running → complete | failed)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import bundle_copy, make_shapes_dataset

from imgclf.cli.main import main
from imgclf.model.run_status import check_usable, mark_running


def test_a_complete_run_says_so(trained_run):
    status = json.loads((trained_run / "run.json").read_text())
    assert status["status"] == "complete" and status["error"] is None and status["finished"] >= status["started"]


def test_a_failed_run_records_its_error_and_is_refused(tmp_path, capsys):
    root = make_shapes_dataset(tmp_path / "data", {"train": 4, "validation": 2, "test": 2})
    for p in (root / "train").rglob("*.jpg"):
        p.write_bytes(b"not an image")  # the scan accepts them; every decode then fails inside fit
    rc = main(["train", str(root), "--recipe", "fast", "--project", str(tmp_path / "runs"), "--name", "bad", "--no-progress", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("imgclf: error:") and "no readable training images" in err[-1]
    run = tmp_path / "runs" / "bad"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and "no readable training images" in status["error"]
    assert "run failed: ValueError: no readable training images" in (run / "train.log").read_text()
    # a failed run's folder is not a model, whatever files it holds
    (run / "model.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    rc = main(["predict", str(run), str(root / "test")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "training run failed" in err[0], err


def test_an_unfinished_run_is_used_with_a_warning(trained_run, tmp_path, shapes_root):
    run = bundle_copy(trained_run, tmp_path / "killed")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = mark_running(run)
    (run / "run.json").write_text(json.dumps({**status, "pid": dead.pid}))  # the training process is gone
    out = subprocess.run([sys.executable, "-m", "imgclf", "predict", str(run), str(shapes_root / "test" / "circle"), "--engine", "torch", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "never finished (killed or interrupted)" in out.stderr and out.stdout.count("circle_") == 6
    check_usable(run)  # warns once per process, never raises
