"""One declared config: flags, validation, recipes, config.json and the Python run folder come from it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from imgclf.cli.main import build_parser, main
from imgclf.config.recipes import RECIPES, make_settings
from imgclf.config.settings import RUN_FIELDS, RUNTIME_FIELDS, TRAIN_FIELDS, SettingError, TrainSettings
from imgclf.train.loops import TrainConfig


def _train_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_bad_unfreeze_is_refused_before_the_dataset_scan_and_before_a_run_folder(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "no-such-data"), "--project", str(tmp_path / "runs"), "--recipe", "finetune", "--unfreeze", "999", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "unfreeze must be between 1 and" in err and "no-such-data" not in err, err
    assert not (tmp_path / "runs").exists()


def test_every_declared_setting_is_a_train_flag_with_its_help():
    p = _train_parser()
    by_dest = {a.dest: a for a in p._actions}
    for name, f in {**TRAIN_FIELDS, **RUN_FIELDS, **RUNTIME_FIELDS}.items():
        assert name in by_dest, name
        assert f.metadata["help"].split(";")[0][:30] in by_dest[name].help.replace("%%", "%"), name
        assert by_dest[name].default is None  # absent = the recipe's or the declared default
    # the help lists each recipe's default where they differ
    assert "seed 5" in by_dest["epochs"].help and "fast 0" in by_dest["finetune_epochs"].help


def test_recipes_only_override_declared_settings_and_unknown_names_are_refused():
    assert all(set(r) <= set(TRAIN_FIELDS) for r in RECIPES.values())
    assert make_settings("finetune") == TrainSettings(recipe="finetune")  # the declared defaults are the finetune recipe
    with pytest.raises(SettingError, match="unknown setting.*epoch\\b"):
        make_settings(epoch=3)
    from imgclf.train.classifier import ImageClassifier

    with pytest.raises(SettingError, match="unknown setting"):
        ImageClassifier(learning_rate=0.1)


@pytest.mark.parametrize("field,bad,words", [
    ("epochs", 0, "epochs must be >= 1"),
    ("lr", -1.0, "lr must be > 0"),
    ("label_smoothing", 1.0, "label_smoothing must be < 1"),
    ("finetune_bn", "x", "finetune_bn must be one of frozen, train"),
    ("threshold_policy", "sensitivity:2", "threshold_policy 'sensitivity:2': use youden, balanced, sensitivity:S or fixed:T"),
    ("tta", "d8", "tta must be one of"),
    ("epochs", 2.5, "epochs must be int"),
])
def test_each_setting_is_validated_once_by_its_declaration(field, bad, words):
    with pytest.raises(SettingError) as e:
        make_settings(**{field: bad})
    assert words in str(e.value)


def test_bad_flags_are_refused_before_any_work(tmp_path, capsys):
    data = tmp_path / "no-such-data"  # never read: parsing fails first
    for argv, words in ((["--epochs", "0"], "epochs must be >= 1"), (["--bootstrap", "-5"], "bootstrap must be >= 0"),
                        (["--finetune-lr", "abc"], "not a number"), (["--threshold-policy", "fixed:7"], "threshold_policy")):
        rc = main(["train", str(data), "--project", str(tmp_path / "runs"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("imgclf: error:") and words in err[0], err
    assert not (tmp_path / "runs").exists()


def test_stage_two_optimiser_values_are_settings_that_reach_the_loop():
    s = make_settings("finetune", finetune_optimizer="adam", finetune_weight_decay=0.05, finetune_warmup_epochs=0.0, finetune_schedule="constant")
    cfg = TrainConfig.stage2(s)
    assert (cfg.optimizer, cfg.weight_decay, cfg.warmup_epochs, cfg.schedule) == ("adam", 0.05, 0.0, "constant")
    default = TrainConfig.stage2(make_settings())
    assert (default.optimizer, default.weight_decay, default.warmup_epochs, default.schedule) == ("adamw", 0.01, 1.0, "cosine")
    assert TrainConfig.stage1(s).optimizer == "adam" and TrainConfig.stage1(s).weight_decay == 0.0


def _files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_train_run_from_python_writes_the_same_run_folder_as_the_cli(shapes_root, tmp_path):
    from imgclf.runs.train_run import train_run

    flags = ["--recipe", "fast", "--epochs", "4", "--bootstrap", "50", "--cache-dir", str(tmp_path / "cache")]
    assert main(["-q", "train", str(shapes_root), "--project", str(tmp_path / "cli"), "--name", "r", "--no-progress", *flags]) == 0
    m = train_run(shapes_root, recipe="fast", epochs=4, bootstrap=50, cache_dir=tmp_path / "cache", project=tmp_path / "py", name="r")
    cli_run, py_run = tmp_path / "cli" / "r", tmp_path / "py" / "r"
    assert m["run"] == str(py_run)
    assert _files(cli_run) == _files(py_run) and "report.html" in _files(py_run)
    cli_cfg, py_cfg = (json.loads((d / "config.json").read_text()) for d in (cli_run, py_run))
    assert cli_cfg["settings"] == py_cfg["settings"] == dataclasses.asdict(make_settings("fast", epochs=4))
    assert json.loads((cli_run / "test_metrics.json").read_text())["accuracy"] == m["accuracy"]
    # loading a run restores its settings object
    from imgclf.train.classifier import ImageClassifier

    assert ImageClassifier.load(py_run).settings == make_settings("fast", epochs=4)
