"""The Kind seam: a kind defined here — 1-D regression, with its own data file, models, loss terms,
metric and a non-learned baseline — runs through the one generic flow and train loop, untouched.

A new kind in the project is the same pieces in files of their own: tasks/kinds/<kind>/ (this
class), a stage module writing its data, a model file, loss terms in models/distill.py.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from models import create_model, register_model
from models.distill import register_loss
from tasks.kinds import register_kind
from tasks.kinds.base import BatchedDataset
from tasks.methods import MethodSpec, register_method
from tasks.platform.common import StageError


# ---------------------------------------------------------------------------------------------------
# models and loss terms of the new kind

@register_model
def seam_mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))


@register_model
def seam_tiny(hidden: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))


@register_loss("seam_mse")
class TargetMSE(nn.Module):
    needs_teacher = False

    def forward(self, student, teacher, targets):
        return F.mse_loss(student["pred"], targets)


@register_loss("seam_kd")
class PredictionKD(nn.Module):
    needs_teacher = True

    def forward(self, student, teacher, targets):
        return F.mse_loss(student["pred"], teacher["pred"].detach())


# ---------------------------------------------------------------------------------------------------
# the kind

class Points(BatchedDataset):
    def __init__(self, split):
        self.x, self.y = split

    def __len__(self):
        return len(self.x)

    def __getitems__(self, index):
        index = torch.as_tensor(index)
        return self.x[index], self.y[index], index


def mse(predict, split):
    with torch.no_grad():
        return float(F.mse_loss(predict(split[0]), split[1]))


class Regression1D:
    name = "seam_regression"
    cadence = "nightly"
    labels_loss = {"seam_mse": {"weight": 1.0}}
    cache_batch = None
    val_key = "val_mse"
    val_higher_is_better = False
    composes = False

    def load(self, data_dir, validate=False):
        path = Path(data_dir) / "points.npz"
        if not path.is_file():
            raise StageError(path, "not found")
        z = np.load(path)
        data = {s: (torch.tensor(z[f"{s}_x"]), torch.tensor(z[f"{s}_y"])) for s in ("train", "val", "test")}
        if validate and not all(torch.isfinite(t).all() for pair in data.values() for t in pair):
            raise StageError(path, "non-finite values")
        return data

    def units(self, spec, role):
        return [None]

    def compositions(self, spec):
        return []

    def train_set(self, data, unit):
        return Points(data["train"])

    def build(self, spec, side, data, tp):
        return create_model(spec.teacher if side == "teacher" else spec.student, **tp.model)

    def forward(self, model, inputs):
        return {"pred": model(inputs)}

    def validate(self, model, data, unit, device):
        model.eval()
        return {"val_mse": mse(model, data["val"])}

    def predictor(self, model, data):
        return model.eval()

    def baselines(self, spec, data):
        mean = data["train"][1].mean()
        return {"mean": lambda x: torch.full_like(x, float(mean))} if "mean" in spec.baselines else {}

    def test_metrics(self, predict, data, mp):
        return {"mse": mse(predict, data["test"])}

    def input_example(self, data):
        return data["train"][0][:2]

    def unit_name(self, unit):
        return ""

    def known_roles(self):
        return {"mean"}


register_kind(Regression1D())
register_method(MethodSpec(
    name="seam_sine", kind="seam_regression", data_stage="seam_points", teacher="seam_mlp", student="seam_tiny",
    loss={"seam_kd": {"weight": 0.7}, "seam_mse": {"weight": 0.3}}, primary_metric="mse", higher_is_better=False,
    baselines=("student_labels", "mean"),
    claim=("student_kd.mse < student_labels.mse", "teacher.mse < mean.mse"),
    description="y = sin(3x) + noise; a 2-unit net distilled from a 32-unit one"))


# ---------------------------------------------------------------------------------------------------

def write_points(path, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 256), ("val", 64), ("test", 64)):
        x = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
        out[f"{split}_x"], out[f"{split}_y"] = x, (np.sin(3 * x) + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    path.mkdir(parents=True)
    np.savez(path / "points.npz", **out)


def test_a_kind_of_its_own_runs_through_the_generic_flow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.method import method_flow
    from flows.runtime import local_run_settings
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_points(tmp_path / "points")
    train = {"epochs": 40, "batch_size": 32, "lr": 0.03}
    params = {"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "art")},
              "methods": {"seam_sine": {"kind": "seam_regression", "models": "test_kind_seam",
                                        "data": str(tmp_path / "points"), "seeds": [0, 1, 2],
                                        "teacher": train, "student": {**train, "cache_teacher": True},
                                        "loss": {"seam_kd": {"weight": 0.7}}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    with local_run_settings():
        report = method_flow("seam_sine", str(tmp_path / "params.yaml"), str(tmp_path / "report.json"))

    assert set(report["roles"]) == {"teacher", "student_kd", "student_labels", "mean"}
    assert report["roles"]["student_kd"]["n"] == 3 and report["roles"]["mean"]["n"] == 1
    parts = report["claim"]["parts"]
    assert [p["statement"] for p in parts] == ["student_kd.mse < student_labels.mse", "teacher.mse < mean.mse"]
    # the teacher fits sin(3x) far better than the training mean (variance ~0.5): a one-seed teacher
    # against a one-value baseline has one pair, hence no interval
    assert report["scores"]["teacher"]["mse"] < 0.5 * report["scores"]["mean"]["mse"]
    assert parts[1]["verdict"] == "inconclusive" and parts[1]["ci95"] is None
    assert parts[0]["seeds"] == [0, 1, 2] and parts[0]["ci95"] is not None
    assert math.isfinite(report["scores"]["student_kd"]["mse"])

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("seam_sine").experiment_id])
    roles = sorted(r.data.tags["distillery.role"] for r in runs)
    assert roles == ["flow", "mean", "student_kd", "student_kd", "student_kd", "student_labels", "student_labels",
                     "student_labels", "teacher"]
    assert client.get_model_version_by_alias("seam_sine", "champion")
    assert client.get_model_version_by_alias("seam_sine_teacher", "champion")
    kd = [r for r in runs if r.data.tags["distillery.role"] == "student_kd"]
    assert all(r.data.params["loss.seam_kd.weight"] == "0.7" for r in kd)


def test_bad_data_of_the_new_kind_fails_before_training(tmp_path):
    write_points(tmp_path / "points")
    z = dict(np.load(tmp_path / "points" / "points.npz"))
    z["val_y"][3] = np.nan
    np.savez(tmp_path / "points" / "points.npz", **z)
    from tasks.kinds import get_kind
    with pytest.raises(StageError, match="points.npz: non-finite values"):
        get_kind("seam_regression").load(str(tmp_path / "points"), validate=True)


def test_inputs_that_passed_their_contract_are_validated_again_only_when_their_bytes_change(tmp_path, monkeypatch):
    """flows.steps.validate_inputs remembers a pass by content hash: methods sharing a data set
    validate it once; changed bytes are validated again, and fail."""
    from flows import steps
    from tasks.kinds import get_kind
    from tasks.platform import validation
    monkeypatch.setattr(validation, "PASSES", tmp_path / "passes")
    kind, loads = get_kind("seam_regression"), []
    load = type(kind).load

    def counted_load(self, data_dir, validate=False):
        loads.append(data_dir)
        return load(self, data_dir, validate)
    monkeypatch.setattr(type(kind), "load", counted_load)
    write_points(tmp_path / "points")
    first = steps.validate_inputs.fn("seam_regression", str(tmp_path / "points"))
    again = steps.validate_inputs.fn("seam_regression", str(tmp_path / "points"))
    assert first == again and len(loads) == 1 and len(list((tmp_path / "passes").iterdir())) == 1

    z = dict(np.load(tmp_path / "points" / "points.npz"))
    z["val_y"][3] = np.nan
    np.savez(tmp_path / "points" / "points.npz", **z)
    with pytest.raises(StageError, match="non-finite values"):
        steps.validate_inputs.fn("seam_regression", str(tmp_path / "points"))
    assert len(loads) == 2 and len(list((tmp_path / "passes").iterdir())) == 1
