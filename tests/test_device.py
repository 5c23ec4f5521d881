"""--device: the declared values, the choice of device (CUDA faked with monkeypatch, since CI has
no GPU), one-line refusals of devices this machine lacks, and the CPU path recorded in config.json."""

from __future__ import annotations

import json

import pytest
import torch

from imgclf.config.settings import SettingError, make_runtime
from imgclf.engines import runtimes
from imgclf.engines.runtimes import DeviceError, resolve_device, resolve_precision


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as the choice of device can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_values_accepted(value):
    assert make_runtime(device=value).device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "cuda:0:1", "mps"])
def test_device_values_refused_with_the_setting_named(value):
    with pytest.raises(SettingError, match=r"^device must be auto, cpu, cuda or cuda:N"):
        make_runtime(device=value)


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(monkeypatch, no_torchrun):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=rf"^device {asked}: CUDA is not available here .*use --device cpu or auto$") as e:
            resolve_device(asked)
        assert "\n" not in str(e.value)


def test_with_cuda_auto_takes_the_gpu_and_indexes_are_checked(two_gpus, no_torchrun):
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match=r"^device cuda:2 is out of range: 2 CUDA device\(s\), cuda:0..cuda:1$"):
        resolve_device("cuda:2")


def test_under_torchrun_each_rank_takes_its_local_rank_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("auto") == "cuda:1" and resolve_device("cuda") == "cuda:1"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(DeviceError, match=r"cuda:3 \(torchrun's LOCAL_RANK\) is out of range: 2 CUDA device"):
        resolve_device("auto")
    # an explicit GPU would put every rank of the machine on it (NCCL refuses, after the extraction)
    with pytest.raises(DeviceError, match=r"^device cuda:1: under torchrun with 4 processes per machine each rank takes GPU LOCAL_RANK"):
        resolve_device("cuda:1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda:1") == "cuda:1"  # one process per machine may choose its GPU


def test_gpu_precision_is_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda:0") == "bf16" and resolve_precision("bf16", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("fp32", "cuda:0") == "fp32"
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"  # the CPU rule is unchanged


def test_on_a_gpu_engine_auto_is_torch_there_and_onnx_engines_stay_on_the_cpu(two_gpus, no_torchrun, monkeypatch, tmp_path, caplog):
    from imgclf.backbones.specs import get_backbone_spec
    from imgclf.backbones.weights import resolve_weights
    from imgclf.engines import runner as runner_module

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    made = []

    class FakeTorchEngine:  # records where it was asked to run (moving a model to CUDA needs a GPU)
        def __init__(self, module, precision, device="cpu"):
            made.append((precision, device))
            self.name, self.precision = "torch", precision

    monkeypatch.setattr(runner_module, "TorchEngine", FakeTorchEngine)
    spec = get_backbone_spec("efficientnet_lite0")
    weights = resolve_weights(spec, "none")
    gpu = runner_module.BackboneRunner(spec, weights, tmp_path, device="auto")
    assert gpu.device == "cuda:0" and gpu.precision == "fp16"
    gpu.engine_for(lambda: torch.nn.Identity(), tmp_path / "never-exported.onnx", "backbone")
    assert made == [("fp16", "cuda:0")] and not (tmp_path / "never-exported.onnx").exists()
    with caplog.at_level("WARNING", logger="imgclf"):
        ov = runner_module.BackboneRunner(spec, weights, tmp_path, engine="onnxruntime", device="cuda")
    assert ov.precision == "fp32" and "engine onnxruntime runs on the CPU" in caplog.text


def test_tail_model_autocasts_on_the_device_of_its_inputs():
    from torch import nn

    from imgclf.train.finetune import TailModel

    seen = []

    class Probe(nn.Module):
        def forward(self, h):
            seen.append((torch.is_autocast_enabled(h.device.type), h.device.type))
            return h

    model = TailModel([Probe()], nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2), autocast_bf16=False, autocast_dtype=torch.bfloat16)
    model(torch.zeros(2, 4, 3, 3))
    TailModel([Probe()], nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2), autocast_bf16=False)(torch.zeros(2, 4, 3, 3))
    assert seen == [(True, "cpu"), (False, "cpu")]


def test_cli_refuses_cuda_without_cuda_in_one_line_before_any_run_folder(shapes_root, tmp_path, capsys, monkeypatch, no_torchrun):
    from imgclf.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    project = tmp_path / "runs"
    rc = main(["train", str(shapes_root), "--project", str(project), "--recipe", "fast", "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "device cuda: CUDA is not available here" in err
    assert not project.exists()
    rc = main(["train", str(shapes_root), "--project", str(project), "--device", "gpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "device must be auto, cpu, cuda or cuda:N" in err


def test_trained_run_records_the_cpu_device(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["runtime"]["device"] == "auto"
    assert config["backbone_engine"]["device"] == "cpu"
    assert "device: cpu (--device auto)" in (trained_run / "train.log").read_text()  # (stage 2's device: test_recipes)
