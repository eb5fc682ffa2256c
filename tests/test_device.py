"""--device / --amp: parsed by every command that trains, refused clearly when wrong, and
every trained model back on the CPU, in eval mode, before it is measured or saved.

The CPU tests run everywhere; the tests marked ``gpu`` need CUDA and are skipped without it
(examples/gpu_check.sh runs the commands end to end on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress.device import TrainDevice, cpu_state, resolve_device
from torchslim.compress.distill import DistillConfig, distill
from torchslim.compress.errors import TorchslimError, UsageError
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.measure import measure
from torchslim.compress.train import TrainConfig, evaluate, fit

runner = CliRunner()
TRAINING = ["train", "prune", "swap", "distill", "compress", "quantize", "demo"]
# the smallest arguments that get each command past typer's own checks
ARGS = {
    "train": ["pd_light", "-o", "x.pt"],
    "prune": ["missing.pt", "-o", "x.pt"],
    "swap": ["missing.pt", "-o", "x.pt"],
    "distill": ["--teacher", "missing.pt", "--student", "pd_light", "-o", "x.pt"],
    "compress": ["missing.pt", "-o", "x.onnx"],
    "quantize": ["missing.pt", "-o", "x.onnx", "--mode", "qat"],
    "demo": [],
}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


class Linear64(nn.Module):
    """A user's model, defined outside torchslim: 8x8 digits -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _trained(digits, **kw):
    torch.manual_seed(0)
    model = Linear64()
    result = fit(model, digits, TrainConfig(epochs=3, lr=0.02, augment=False, **kw))
    return model, result


@pytest.mark.parametrize("cmd", TRAINING)
def test_every_training_command_takes_device_and_amp(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0
    assert "--device" in res.output and "--amp" in res.output


@pytest.mark.parametrize("cmd", ["report", "sensitivity", "models"])
def test_measuring_commands_take_no_device(cmd):
    assert "--device" not in runner.invoke(app, [cmd, "--help"]).output


@pytest.mark.parametrize("cmd", TRAINING)
def test_wrong_device_string_is_a_usage_error(cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [cmd, *ARGS[cmd], "--device", "gpu"])
    assert res.exit_code == 2, res.output
    assert "--device must be cpu | cuda | cuda:N | auto, got 'gpu'" in res.stderr
    bad_amp = runner.invoke(app, [cmd, *ARGS[cmd], "--amp", "fp8"])
    assert bad_amp.exit_code == 2 and "--amp must be off | bf16" in bad_amp.stderr
    assert not (tmp_path / "x.pt").exists()


@no_gpu
@pytest.mark.parametrize("cmd", TRAINING)
def test_cuda_without_a_gpu_is_a_usage_error_naming_what_is_there(cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [cmd, *ARGS[cmd], "--device", "cuda"])
    assert res.exit_code == 2, res.output
    assert f"torch {torch.__version__}" in res.stderr or \
        f"this torch ({torch.__version__})" in res.stderr
    assert "use --device cpu" in res.stderr


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(UsageError):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UsageError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    for bad in ("CUDA", "cuda:", "cuda:-1", "mps", "cpu:0", ""):
        with pytest.raises(UsageError) as err:
            TrainConfig(device=bad)
        assert err.value.exit_code == 2


def test_fit_returns_student_and_teacher_on_cpu_in_eval_mode(digits):
    teacher, t_result = _trained(digits, device="cpu")
    assert t_result.device == "cpu" and t_result.best_top1 > 85.0
    assert all(e.seconds > 0 for e in t_result.epochs)
    assert t_result.timing_note().startswith("trained on cpu: ")
    student = Linear64()
    cfg = DistillConfig(epochs=2, lr=0.02, augment=False, device="cpu")
    student, result = distill(teacher, student, digits, cfg)
    for m in (teacher, student):
        assert not m.training
        assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert result.best_top1 > 80.0
    assert evaluate(student, digits.val)[0] == pytest.approx(result.best_top1)


def test_bf16_autocast_trains_within_two_points_of_fp32(digits):
    """bf16 autocast (on the CPU here) keeps fp32 weights and lands within 2 points of the
    fp32 run of the same seed on digits' 360 validation images."""
    fp32, r32 = _trained(digits)
    bf16, r16 = _trained(digits, amp="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}
    assert abs(r16.best_top1 - r32.best_top1) <= 2.0, (r16.best_top1, r32.best_top1)


def test_out_of_memory_says_which_batch_size_to_try(digits):
    class Hungry(Linear64):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = Hungry()
    with pytest.raises(TorchslimError, match="at batch size 48: try --batch-size 24"):
        fit(model, digits, TrainConfig(epochs=1, batch_size=48))
    assert not model.training


def test_measure_refuses_weights_off_the_cpu_without_blaming_the_shape():
    model = Linear64().to("meta")
    with pytest.raises(TorchslimError) as err:
        measure(model, name="m", input_shape=(1, 8, 8))
    assert "weights on meta" in str(err.value) and "measures on the CPU" in str(err.value)
    assert "input shape" not in str(err.value)


def test_file_saved_from_a_gpu_loads_and_reports_on_the_cpu(tmp_path, monkeypatch, digits):
    """torch.save tags each storage with its device; a file written on a GPU says "cuda:0"
    and plain torch.load fails without CUDA. torchslim loads it onto the CPU."""
    model, _ = _trained(digits)
    meta = ModelMeta(input_shape=(1, 8, 8), class_names=digits.class_names)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        path = save_model(model, tmp_path / "gpu.pt", meta)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=False)
    loaded = load_model(path, trust=True)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    expected = evaluate(model, digits.val)[0]
    res = runner.invoke(app, ["report", str(path), "--trust", "--data", "digits", "-f", "json",
                              "--threads", "1", "--min-time", "0.05"])
    assert res.exit_code == 0, res.output
    assert _json_rows(res.stdout)[0]["accuracy"] == pytest.approx(expected)


def _json_rows(text: str) -> list[dict]:
    import json

    rows = json.loads(text)
    return rows if isinstance(rows, list) else rows["rows"]


def test_checkpoint_state_is_copied_to_the_cpu():
    state = {"model": {"w": torch.ones(2)}, "history": [{"a": 1.0}], "epoch": 3,
             "optim": {"state": {0: {"exp_avg": torch.zeros(2)}}}}
    out = cpu_state(state)
    assert out["epoch"] == 3 and out["history"] == [{"a": 1.0}]
    assert torch.equal(out["model"]["w"], torch.ones(2))
    assert out["model"]["w"] is not state["model"]["w"]  # a copy: the original trains on


def test_pipeline_device_overrides_the_recipe(tmp_path, digits):
    """A recipe written on a GPU machine (distill device "cuda") runs where --device says,
    and the history records where it trained."""
    from torchslim.compress.pipeline import run_pipeline

    teacher, _ = _trained(digits)
    meta = ModelMeta(input_shape=(1, 8, 8), class_names=digits.class_names)
    path = save_model(teacher, tmp_path / "t.pt", meta)
    recipe = [DistillConfig(epochs=1, lr=0.02, augment=False, device="cuda")]
    res = run_pipeline(load_model(path, trust=True), recipe, tmp_path / "out.pt", data=digits,
                       threads=1, min_run_time=0.05, device=TrainDevice("cpu"))
    entry = load_model(tmp_path / "out.pt", trust=True).meta.history[-1]
    assert entry["config"]["device"] == "cpu" and entry["config"]["amp"] == "off"
    assert any(n.startswith("trained on cpu: ") for n in entry["notes"])
    assert res.steps[-1].record["accuracy"] > 80.0


# --- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gpu_fit_matches_cpu_and_comes_back(digits, amp):
    _, cpu = _trained(digits)
    gpu_model, on_gpu = _trained(digits, device="cuda", amp=amp)
    assert on_gpu.device == "cuda"
    assert {p.device.type for p in gpu_model.parameters()} == {"cpu"}
    assert not gpu_model.training
    assert abs(on_gpu.best_top1 - cpu.best_top1) <= 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_distill_command_finishes_and_measures_on_cpu(tmp_path):
    """The reported bug: distill trained on CUDA, then its table measured a teacher left on
    the GPU and exited 1 blaming the input shape."""
    t = tmp_path / "t.pt"
    assert runner.invoke(app, ["train", "resnet_tiny", "--data", "digits", "--epochs", "2",
                               "--device", "cuda", "-o", str(t)]).exit_code == 0
    res = runner.invoke(app, ["distill", "--teacher", str(t), "--student", "resnet_tiny",
                              "--epochs", "2", "--device", "cuda", "-o", str(tmp_path / "s.pt"),
                              "--threads", "1", "-f", "json"])
    assert res.exit_code == 0, res.output
    teacher_row, student_row = _json_rows(res.stdout)
    assert teacher_row["accuracy"] > 50.0 and student_row["accuracy"] > 50.0


def test_torchrun_with_one_process_still_joins_a_process_group(monkeypatch):
    """`torchrun --nproc-per-node 1` (the one-GPU machine) runs the DDP path, over NCCL on
    CUDA; a plain run does not."""
    from torchslim.compress.distill import dist_from_env

    for key in ("WORLD_SIZE", "MASTER_ADDR", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not dist_from_env().launched
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    d = dist_from_env()
    assert d.launched and d.world == 1 and d.main
