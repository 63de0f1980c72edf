from types import SimpleNamespace

import pytest
import torch

import models
from models.distill import DistillationLoss
from tasks.train import TrainConfig, fit


def toy_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 64, generator=g)
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(99))
    return SimpleNamespace(x=x, y=(x @ w).argmax(-1))


CFG = TrainConfig(epochs=6, batch_size=32, lr=0.01)


def test_fit_learns_and_reports_one_row_per_epoch():
    model = models.create_model("digits_mlp_tiny", hidden=32)
    seen = []
    hist = fit(model, toy_split(512, 0), toy_split(256, 1), CFG, seed=0,
               criterion=DistillationLoss({"ce": {}}), on_epoch=seen.append)
    assert [h["epoch"] for h in hist] == list(range(1, 7)) and seen == hist
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_accuracy"] > 0.3  # chance is 0.1
    assert {"train_loss_ce", "val_loss", "epoch_seconds"} <= set(hist[0])


def test_fit_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = models.create_model("digits_mlp_tiny")
        runs.append(fit(model, toy_split(128, 0), toy_split(64, 1), CFG, seed=5,
                        criterion=DistillationLoss({"ce": {}}))[-1]["train_loss"])
    assert runs[0] == runs[1]


def test_teacher_runs_once_and_hint_adapter_trains():
    teacher = models.create_model("digits_cnn")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    student = models.create_model("digits_mlp_tiny")
    crit = DistillationLoss({"kd": {"weight": 1.0}, "hint": {"student_key": "features", "teacher_key": "features"}})
    fit(student, toy_split(200, 0), toy_split(50, 1), CFG, seed=0, criterion=crit, teacher=teacher,
        taps={"student": ("features",), "teacher": ("features",)})
    adapter = crit.terms["hint"].adapter
    assert adapter.weight.shape == (128, 16)
    assert len(calls) == 1  # teacher outputs are computed once for the whole training set
    before = adapter.weight.detach().clone()
    fit(student, toy_split(200, 0), toy_split(50, 1), CFG, seed=1, criterion=crit, teacher=teacher,
        taps={"student": ("features",), "teacher": ("features",)})
    assert not torch.equal(before, adapter.weight.detach())  # the adapter is in the optimizer


def test_kd_without_teacher_is_an_error():
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(models.create_model("digits_mlp_tiny"), toy_split(64, 0), toy_split(32, 1), CFG, seed=0,
            criterion=DistillationLoss({"kd": {}}))


def test_bf16_trains_forward_passes_in_bfloat16_and_keeps_fp32_weights():
    model = models.create_model("digits_mlp_tiny", hidden=32)
    dtypes = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda mod, inp, out: dtypes.append((out.dtype, torch.is_grad_enabled())))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.01, precision="bf16")
    hist = fit(model, toy_split(256, 0), toy_split(64, 1), cfg, seed=0, criterion=DistillationLoss({"ce": {}}))
    assert {d for d, training in dtypes if training} == {torch.bfloat16}  # every training forward
    assert {d for d, training in dtypes if not training} == {torch.float32}  # validation stays fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp32'\], got 'fp8'"):
        TrainConfig.from_params({"epochs": 1, "batch_size": 2, "lr": 0.1, "precision": "fp8"})
