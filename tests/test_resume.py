"""A killed training run resumes from its last complete epoch and ends with the same model.

The end-to-end cases train the tiny ``timm:test_efficientnet`` (random weights, offline) with
both stages on the shapes set: one uninterrupted run, then runs interrupted at a chosen
epoch (a real SIGKILL in a child process during stage 2; an exception during stage 1) and
resumed with ``--resume``; model tensors, per-epoch history and test metrics must be equal.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgclf.config import layout
from imgclf.train.checkpoint import CheckpointMismatch, EpochCheckpoint

COMMON = dict(
    backbone="timm:test_efficientnet", weights="none", recipe="finetune", epochs=3, finetune_epochs=3, finetune_views=2,
    mixup=0.2, finetune_cutmix=1.0, finetune_monitor="val_loss", bootstrap=0, report=False, progress=False,
)


@pytest.fixture(scope="module", autouse=True)
def _every_epoch_written():
    """These tests stop runs at chosen epochs, so every epoch's state must be on disk (the
    product writes one at most every ``SAVE_EVERY_S``; tested below)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLF_CHECKPOINT_EVERY_S", "0")
        yield


def _same_run(a: Path, b: Path) -> None:
    """Same model tensors, same per-epoch history, same test metrics."""
    ta, tb = load_file(a / layout.MODEL_TENSORS), load_file(b / layout.MODEL_TENSORS)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert (a / layout.EPOCH_METRICS).read_text() == (b / layout.EPOCH_METRICS).read_text()
    ma, mb = (json.loads((d / layout.TEST_METRICS).read_text()) for d in (a, b))
    ma.pop("run"), mb.pop("run")
    assert ma == mb
    assert json.loads((a / layout.MODEL_META).read_text())["backbone_tuned"] == json.loads((b / layout.MODEL_META).read_text())["backbone_tuned"]


@pytest.fixture(scope="module")
def resume_env(shapes_root, tmp_path_factory):
    """The uninterrupted reference run; the session's feature cache (and the prefix cache in it) is shared by the others."""
    from imgclf.runs.train_run import train_run

    base = tmp_path_factory.mktemp("resume")
    options = dict(COMMON, project=str(base / "runs"))
    m = train_run(shapes_root, name="full", **options)
    full = Path(m["run"])
    assert json.loads((full / layout.STATUS).read_text())["status"] == "complete"
    assert not any((full / layout.CHECKPOINT.format(stage=s)).exists() for s in ("head", "finetune"))  # removed once complete
    return base, options, full


def _stopped_in_stage_one(data, name: str, options: dict, monkeypatch, after_epoch: int) -> Path:
    """A run on ``data`` interrupted right after stage 1 saved epoch ``after_epoch``; its folder."""
    from imgclf.runs.train_run import train_run
    from imgclf.train import checkpoint as checkpoint_module

    save = checkpoint_module.EpochCheckpoint.save

    def save_then_interrupt(self, state, identity):
        save(self, state, identity)
        if identity["stage"] == "head" and state.epoch == after_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.EpochCheckpoint, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_run(data, name=name, **options)
    monkeypatch.undo()
    return Path(options["project"]) / name


def test_sigkill_during_stage_two_then_resume_gives_the_same_model(resume_env, shapes_root, monkeypatch):
    import imgclf.model.classifier as model_classifier
    import imgclf.train.finetune as finetune_module
    from imgclf.runs.train_run import train_run

    base, options, full = resume_env
    # a real kill: the child process SIGKILLs itself right after the checkpoint of stage-2 epoch 2 is on disk
    script = textwrap.dedent(f"""
        import os, signal
        from imgclf.train.checkpoint import EpochCheckpoint
        from imgclf.runs.train_run import train_run
        save = EpochCheckpoint.save
        def save_then_die(self, state, identity):
            save(self, state, identity)
            if identity["stage"] == "finetune" and state.epoch == 2 and not state.done:
                os.kill(os.getpid(), signal.SIGKILL)
        EpochCheckpoint.save = save_then_die
        train_run({str(shapes_root)!r}, name="killed", **{options!r})
    """)
    child = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    killed = base / "runs" / "killed"
    assert json.loads((killed / layout.STATUS).read_text())["status"] == "running"
    assert not (killed / layout.MODEL_TENSORS).exists()
    head_ck = EpochCheckpoint(killed / layout.CHECKPOINT.format(stage="head"))
    ft_ck = EpochCheckpoint(killed / layout.CHECKPOINT.format(stage="finetune"))
    assert head_ck.path.exists() and ft_ck.path.exists()

    # resuming reads features and prefix activations from the caches: no backbone work for training
    calls = []
    extract = model_classifier.extract_features

    def counting_extract(paths, runner, **kw):
        res = extract(paths, runner, **kw)
        calls.append((runner.tuned_digest, res.computed))
        return res

    def no_prefix_put(self, h, activation):
        raise AssertionError("stage-2 prefix activations recomputed on resume")

    monkeypatch.setattr(model_classifier, "extract_features", counting_extract)
    monkeypatch.setattr(finetune_module.PrefixCache, "put", no_prefix_put)
    lines = []
    m = train_run(shapes_root, resume=str(killed), echo=lines.append)
    assert Path(m["run"]) == killed
    assert all(computed == 0 for digest, computed in calls if digest is None), calls  # frozen-backbone features: all cached
    printed = [ln.split() for ln in lines if ln.split()[:1] in (["head"], ["finetune"])]
    assert [(r[0], r[1]) for r in printed] == [("finetune", "3")]  # only the epoch after the checkpoint was trained
    _same_run(full, killed)
    status = json.loads((killed / layout.STATUS).read_text())
    assert status["status"] == "complete"
    config = json.loads((killed / layout.CONFIG).read_text())
    assert len(config["resumed"]) == 1 and config["fit_summary"]["epochs_run"] == 3 + 3
    assert not head_ck.path.exists() and not ft_ck.path.exists()


def test_failed_stage_one_resumes_and_refusals_are_one_line(resume_env, shapes_root, monkeypatch, capsys):
    from imgclf.cli.main import main
    from imgclf.runs.train_run import train_run

    base, options, full = resume_env
    stopped = _stopped_in_stage_one(shapes_root, "stopped", options, monkeypatch, after_epoch=2)
    assert json.loads((stopped / layout.STATUS).read_text())["status"] == "failed"

    # refused, each with one line and before any work: other settings, other data
    capsys.readouterr()  # only what the command prints below
    rc = main(["-q", "train", str(shapes_root), "--resume", str(stopped), "--epochs", "9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "epochs=9 (recorded: 3)" in err[0], err
    with pytest.raises(ValueError, match="not .*resume it on the same data"):
        train_run(base, resume=str(stopped))
    assert json.loads((stopped / layout.STATUS).read_text())["status"] == "failed"  # untouched by a refusal

    m = train_run(shapes_root, resume=str(stopped), epochs=3, backbone="timm:test_efficientnet")  # flags equal to the recorded ones are fine
    _same_run(full, Path(m["run"]))

    # a complete run is not resumed; a folder that is not a run is refused
    with pytest.raises(ValueError, match="complete; nothing to resume"):
        train_run(shapes_root, resume=str(stopped))
    with pytest.raises(ValueError, match="not a training run folder"):
        train_run(shapes_root, resume=str(base))


def test_resume_refuses_a_changed_split(resume_env, shapes_root, tmp_path):
    """Same dataset root, other images: the recorded split.csv no longer matches."""
    import shutil

    from imgclf.runs.resume import check_same_split
    from imgclf.data.datasets import load_dataset

    base, options, full = resume_env
    copy = tmp_path / "shapes"
    shutil.copytree(shapes_root, copy)
    ds = load_dataset(copy, seed=0)
    with pytest.raises(ValueError, match="dataset changed"):
        check_same_split(ds, full)
    check_same_split(load_dataset(shapes_root, seed=0), full)  # the run's own data passes
    own = load_dataset(shapes_root, seed=0)
    a, b = own.samples["train"][0], next(s for s in own.samples["test"] if s.label == own.samples["train"][0].label)
    swapped = {**own.samples, "train": [b if s is a else s for s in own.samples["train"]], "test": [a if s is b else s for s in own.samples["test"]]}
    with pytest.raises(ValueError, match="same images are split differently"):  # e.g. carved by an earlier version's rule
        check_same_split(dataclasses.replace(own, samples=swapped), full)


def test_resume_refuses_pictures_changed_under_the_same_names(resume_env, shapes_root, tmp_path, monkeypatch):
    """Same names, labels and split, one training picture re-saved with other pixels: the
    stage's checkpoint is refused (its identity holds the images' bytes), not continued."""
    import shutil

    from PIL import Image

    from imgclf.data.datasets import read_split_csv
    from imgclf.runs.train_run import train_run

    _, options, _ = resume_env
    copy = tmp_path / "shapes"
    shutil.copytree(shapes_root, copy)
    stopped = _stopped_in_stage_one(copy, "changed", options, monkeypatch, after_epoch=1)
    picture = Path(read_split_csv(stopped / layout.SPLIT)["train"][0][0])
    assert picture.is_relative_to(copy)
    with Image.open(picture) as im:
        im.transpose(Image.Transpose.ROTATE_90).save(picture)
    with pytest.raises(CheckpointMismatch, match="other images"):
        train_run(copy, resume=str(stopped))


def _features(seed=0, n=60, d=16, k=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y


def test_fit_head_resumes_exactly_and_survives_a_corrupt_checkpoint(tmp_path, caplog):
    """Stage 1 alone: interrupt after epoch 2, resume, compare; a corrupt file restarts the stage."""
    from imgclf.train.heads import fit_head
    from imgclf.train.loops import TrainConfig

    xt, yt = _features(0)
    xv, yv = _features(1, n=30)
    cfg = TrainConfig(epochs=5, patience=0, mixup=0.3, schedule="cosine", warmup_epochs=1.0, optimizer="adamw", weight_decay=0.01, batch_size=32)
    ref, ref_hist, ref_sum = fit_head(xt, yt, xv, yv, 3, cfg)

    ck = EpochCheckpoint(tmp_path / "checkpoint-head.safetensors")

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=stop_after_2, checkpoint=ck)
    torch.manual_seed(123)  # the resumed process starts with other global RNG states
    seen = []
    head, hist, summary = fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=lambda r: seen.append(r["epoch"]), checkpoint=ck)
    assert seen == [3, 4, 5]
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), head.state_dict().values()))
    assert hist == ref_hist and summary == ref_sum

    # a finished stage is restored, not trained again
    seen.clear()
    again, _, _ = fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=lambda r: seen.append(r["epoch"]), checkpoint=ck)
    assert seen == [] and all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))

    # other settings: refused
    with pytest.raises(CheckpointMismatch, match="config"):
        fit_head(xt, yt, xv, yv, 3, TrainConfig(epochs=8, patience=0), checkpoint=ck)

    # a flipped byte: reported, ignored, the stage runs from epoch 1 to the same result
    raw = bytearray(ck.path.read_bytes())
    raw[-5] ^= 0xFF
    ck.path.write_bytes(bytes(raw))
    seen.clear()
    head, _, _ = fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=lambda r: seen.append(r["epoch"]), checkpoint=ck)
    assert seen == list(range(1, 6)) and any("unreadable" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), head.state_dict().values()))


def test_epoch_states_are_written_at_most_every_save_every_s_and_the_end_always(tmp_path, monkeypatch, caplog):
    from imgclf.train import checkpoint as checkpoint_module
    from imgclf.train.heads import fit_head
    from imgclf.train.loops import TrainConfig

    xt, yt = _features(0)
    xv, yv = _features(1, n=30)
    cfg = TrainConfig(epochs=4, patience=0)
    written = []
    save = checkpoint_module.EpochCheckpoint.save
    monkeypatch.setattr(checkpoint_module.EpochCheckpoint, "save", lambda self, state, identity: (written.append((state.epoch, state.done)), save(self, state, identity)))
    for every, expected in (("3600", [(4, True)]), ("0", [(1, False), (2, False), (3, False), (4, False), (4, True)])):
        monkeypatch.setenv("IMGCLF_CHECKPOINT_EVERY_S", every)
        written.clear()
        fit_head(xt, yt, xv, yv, 3, cfg, checkpoint=EpochCheckpoint(tmp_path / f"ck-{every}.safetensors"))
        assert written == expected, every
    monkeypatch.delenv("IMGCLF_CHECKPOINT_EVERY_S")
    assert EpochCheckpoint(tmp_path / "x").every_s == checkpoint_module.SAVE_EVERY_S > 0
    monkeypatch.setenv("IMGCLF_CHECKPOINT_EVERY_S", "soon")  # not a number: the default, with a warning
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert EpochCheckpoint(tmp_path / "x").every_s == checkpoint_module.SAVE_EVERY_S
    assert "IMGCLF_CHECKPOINT_EVERY_S='soon' is not a number" in caplog.text


def test_early_stop_is_not_undone_by_a_resume(tmp_path):
    """A stage that stopped early at its checkpointed epoch stays stopped when resumed there."""
    from imgclf.train.heads import fit_head
    from imgclf.train.loops import TrainConfig

    xt, yt = _features(0)
    xv, yv = _features(1, n=30)
    cfg = TrainConfig(epochs=40, patience=2, lr=0.05)
    _, ref_hist, _ = fit_head(xt, yt, xv, yv, 3, cfg)
    assert len(ref_hist) < 40
    last = len(ref_hist)
    ck = EpochCheckpoint(tmp_path / "ck.safetensors")

    def stop_at_last(row):
        if row["epoch"] == last:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=stop_at_last, checkpoint=ck)
    seen = []
    _, hist, _ = fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=lambda r: seen.append(r), checkpoint=ck)
    assert seen == [] and hist == ref_hist


def test_checkpoint_identity_holds_the_images_digest(tmp_path, caplog):
    """Other pictures: refused. A checkpoint from before the digest: resumed, with a warning."""
    from imgclf.train.heads import fit_head
    from imgclf.train.loops import TrainConfig

    xt, yt = _features(0)
    xv, yv = _features(1, n=30)
    cfg = TrainConfig(epochs=6, patience=0, lr=0.05)

    def stop_at_3(row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    for saved_with in ("digest-a", None):
        path = tmp_path / f"{saved_with}.safetensors"
        with pytest.raises(KeyboardInterrupt):
            fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=stop_at_3, checkpoint=EpochCheckpoint(path, data=saved_with))
        if saved_with is not None:
            with pytest.raises(CheckpointMismatch, match="other images"):
                fit_head(xt, yt, xv, yv, 3, cfg, checkpoint=EpochCheckpoint(path, data="digest-b"))
        else:
            seen = []
            fit_head(xt, yt, xv, yv, 3, cfg, on_epoch=lambda r: seen.append(r["epoch"]), checkpoint=EpochCheckpoint(path, data="digest-b"))
            assert seen == [4, 5, 6] and any("predates the images' digest" in r.getMessage() for r in caplog.records)


def test_prefix_cache_detects_corruption(tmp_path, caplog):
    from imgclf.train.finetune import PrefixCache

    cache = PrefixCache(tmp_path, "k", (4, 3, 3))
    a = torch.randn(4, 3, 3).to(torch.bfloat16)
    cache.put("ab" * 10, a)
    assert torch.equal(cache.get("ab" * 10), a)
    assert PrefixCache(tmp_path, "k", (4, 9)).get("ab" * 10) is None  # another shape is foreign, not reshaped
    cache.put("cd" * 10, a)
    p = cache._path("cd" * 10)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    assert cache.get("cd" * 10) is None and not p.exists()
    assert any("corrupt entry" in r.getMessage() for r in caplog.records)


def _saved_epoch(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])["epoch"]


def test_run_stopped_in_the_heads_resumes_with_every_head_the_same(resume_env, shapes_root, monkeypatch):
    """--heads 3 trains the three heads side by side, each with its own checkpoint file: a run
    stopped after the heads' epoch 2 resumes each head from its file (none starts again), is
    stopped again in the refit, and the next resume ends with the uninterrupted run's heads,
    history and metrics."""
    from imgclf.runs.train_run import train_run
    from imgclf.train import checkpoint as checkpoint_module

    base, options, _ = resume_env
    options = {**options, "recipe": "fast", "heads": 3, "finetune_epochs": 0, "project": str(base / "runs-heads")}  # frozen: the heads refit
    full = Path(train_run(shapes_root, name="full", **options)["run"])
    save = checkpoint_module.EpochCheckpoint.save

    def interrupt_in(stage: str):
        def save_then_interrupt(self, state, identity):
            save(self, state, identity)
            if self.path.name == layout.CHECKPOINT.format(stage=stage) and state.epoch == 2 and not state.done:
                raise KeyboardInterrupt
        monkeypatch.setattr(checkpoint_module.EpochCheckpoint, "save", save_then_interrupt)

    interrupt_in("head3")  # the last of the three files written after epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_run(shapes_root, name="stopped", **options)
    stopped = Path(options["project"]) / "stopped"
    assert [_saved_epoch(stopped / layout.CHECKPOINT.format(stage=s)) for s in ("head", "head2", "head3")] == [2, 2, 2]
    lines = []
    interrupt_in(layout.refit_checkpoint_stage(2))
    with pytest.raises(KeyboardInterrupt):
        train_run(shapes_root, resume=str(stopped), echo=lines.append)
    monkeypatch.undo()
    assert [ln.split()[1] for ln in lines if ln.split()[:1] == ["head"]] == ["3"]  # the first head: only its last epoch was left
    assert (stopped / layout.CHECKPOINT.format(stage="refit")).exists()
    train_run(shapes_root, resume=str(stopped))
    assert json.loads((full / layout.CONFIG).read_text())["fit_summary"]["refit"]["member_epochs"] == \
        json.loads((stopped / layout.CONFIG).read_text())["fit_summary"]["refit"]["member_epochs"]
    _same_run(full, stopped)
    assert not list(stopped.glob("checkpoint-*.safetensors"))


def test_heads_stopped_between_their_files_resume_from_each_file(tmp_path, monkeypatch):
    """A kill between two heads' files leaves them at different epochs: each head continues from
    its own file (the laggards in a stack of their own) to the weights of an uninterrupted run
    (to float rounding: a stack of another size may round a product differently on another CPU)."""
    import dataclasses

    from imgclf.train import checkpoint as checkpoint_module
    from imgclf.train.loops import TrainConfig
    from imgclf.train.stacked import fit_stacked

    xt, yt = _features(0)
    xv, yv = _features(1, n=30)
    cfgs = [dataclasses.replace(TrainConfig(epochs=4, patience=0, mixup=0.3), seed=k) for k in range(3)]
    ref = fit_stacked(xt, yt, xv, yv, 3, cfgs, [None] * 3)
    files = [tmp_path / f"head{k}.safetensors" for k in range(3)]
    save = checkpoint_module.EpochCheckpoint.save

    def save_then_interrupt(self, state, identity):
        save(self, state, identity)
        if self.path == files[1] and state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.EpochCheckpoint, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_stacked(xt, yt, xv, yv, 3, cfgs, [None] * 3, checkpoints=[EpochCheckpoint(f) for f in files])
    monkeypatch.undo()
    assert [_saved_epoch(f) for f in files] == [2, 2, 1]
    resumed = fit_stacked(xt, yt, xv, yv, 3, cfgs, [None] * 3, checkpoints=[EpochCheckpoint(f) for f in files])
    for (head, hist, summary), (ref_head, ref_hist, ref_summary) in zip(resumed, ref):
        for a, b in zip(head.state_dict().values(), ref_head.state_dict().values()):
            torch.testing.assert_close(a, b)
        assert [r["epoch"] for r in hist] == [1, 2, 3, 4] and summary["best_epoch"] == ref_summary["best_epoch"]


def test_a_run_recorded_before_heads_existed_resumes_with_one_head(resume_env, shapes_root, monkeypatch):
    """config.json written before --heads had no ``heads`` (nor ``refit``) setting: such a run
    trained one head, not refit, and resumes so, not with today's five heads and refit."""
    from imgclf.runs.train_run import train_run

    base, options, _ = resume_env
    options = {**options, "recipe": "fast", "project": str(base / "runs-old")}
    stopped = _stopped_in_stage_one(shapes_root, "old", options, monkeypatch, after_epoch=1)
    config = json.loads((stopped / layout.CONFIG).read_text())
    assert config["settings"].pop("heads") == 5 and config["settings"].pop("refit") is True
    (stopped / layout.CONFIG).write_text(json.dumps(config))
    train_run(shapes_root, resume=str(stopped))
    meta = json.loads((stopped / layout.MODEL_META).read_text())
    assert "members" not in meta["head"] and meta["settings"]["heads"] == 1 and meta["settings"]["refit"] is False
    assert json.loads((stopped / layout.CONFIG).read_text())["fit_summary"]["refit"] is None
