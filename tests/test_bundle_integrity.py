"""Damaged model weights are detected: sha256 recorded in model.json, non-finite tensors refused."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import bundle_copy

from imgclf.cli.main import main
from imgclf.model.bundle import BundleError, load_bundle


def _ruin_tensor_bytes(path):
    """0xFF over every tensor byte, header intact: the file still parses, every float is NaN."""
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    start = 8 + header_len
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


def test_model_json_records_the_tensors_sha256(trained_run):
    import hashlib

    meta = json.loads((trained_run / "model.json").read_text())
    assert meta["tensors_sha256"] == hashlib.sha256((trained_run / "model.safetensors").read_bytes()).hexdigest()


def test_damaged_weights_are_refused_by_every_command(trained_run, shapes_root, tmp_path, capsys):
    run = bundle_copy(trained_run, tmp_path / "m")
    _ruin_tensor_bytes(run / "model.safetensors")
    with pytest.raises(BundleError, match="sha256 differs"):
        load_bundle(run)
    for argv in (["predict", str(run), str(shapes_root / "test")], ["evaluate", str(run), str(shapes_root)], ["export", str(run)]):
        rc = main([*argv, "--no-progress"] if argv[0] != "export" else argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and err[-1].startswith("imgclf: error:") and "sha256 differs" in err[-1], (argv, err)


def test_non_finite_weights_are_refused_even_without_a_recorded_hash(trained_run, tmp_path):
    run = bundle_copy(trained_run, tmp_path / "old")
    meta = json.loads((run / "model.json").read_text())
    del meta["tensors_sha256"]  # as a bundle written before the hash was recorded
    (run / "model.json").write_text(json.dumps(meta))
    load_bundle(run)  # intact: loads
    _ruin_tensor_bytes(run / "model.safetensors")
    with pytest.raises(BundleError, match="NaN or infinite"):
        load_bundle(run)


def test_the_server_never_serves_a_model_that_fails_its_checks(trained_run, tmp_path):
    from imgclf.serve.app import load_serving_model

    run = bundle_copy(trained_run, tmp_path / "s")
    _ruin_tensor_bytes(run / "model.safetensors")
    for engine in ("auto", "torch"):
        with pytest.raises(ValueError, match="sha256 differs"):
            load_serving_model(run, engine, cache_dir=tmp_path / "cache")
