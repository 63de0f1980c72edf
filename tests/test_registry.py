import pytest
import torch

import models
from models.registry import Claim, MethodSpec


def test_create_model_builds_registered_entrypoints_and_drops_none_kwargs():
    m = models.create_model("digits_mlp_tiny", hidden=None)  # None = the entrypoint's default
    assert m.config.hidden == 16
    assert models.create_model("digits_mlp_tiny", hidden=8).config.hidden == 8
    assert models.create_model("digits_cnn")(torch.rand(3, 64)).shape == (3, 10)


def test_unknown_model_names_the_registered_ones():
    with pytest.raises(RuntimeError, match="digits_cnn"):
        models.create_model("nope")


def test_student_is_much_smaller_than_teacher():
    spec = models.get_method("hinton_kd")
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(models.create_model(spec.teacher)) > 50 * n(models.create_model(spec.student))


@pytest.mark.parametrize("statement,left,right,expected", [
    ("a.acc > b.acc", 0.9, 0.8, True), ("a.acc > b.acc", 0.8, 0.8, False),
    ("a.acc >= b.acc", 0.8, 0.8, True), ("a.rmse < b.rmse", 1.0, 2.0, True),
    ("a.rmse <= b.rmse", 2.0, 1.0, False),
])
def test_claim_parse_and_verdict(statement, left, right, expected):
    c = Claim.parse(statement)
    assert c.statement == statement
    assert c.holds(left, right) is expected


@pytest.mark.parametrize("bad", ["a.acc >> b.acc", "acc > b.acc", "a.acc > 0.5", ""])
def test_claim_rejects_malformed_statements(bad):
    with pytest.raises(ValueError, match="cannot parse claim"):
        Claim.parse(bad)


def test_method_spec_rejects_claim_on_unknown_role():
    with pytest.raises(ValueError, match="unknown roles"):
        MethodSpec(name="x", data_stage="digits", teacher="digits_cnn", student="digits_mlp_tiny",
                   loss={"kd": {}}, primary_metric="accuracy", higher_is_better=True,
                   baselines=("student_labels",), claim="student_kd.accuracy > ghost.accuracy")


def test_register_method_rejects_unregistered_models():
    spec = MethodSpec(name="x", data_stage="digits", teacher="no_such_model", student="digits_mlp_tiny",
                      loss={"kd": {}}, primary_metric="accuracy", higher_is_better=True,
                      baselines=("student_labels",), claim="student_kd.accuracy > student_labels.accuracy")
    with pytest.raises(RuntimeError, match="no_such_model"):
        models.register_method(spec)


def test_every_method_in_params_is_registered_and_vice_versa():
    import yaml
    from conftest import REPO
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(params["methods"]) == models.list_methods()
    for name, p in params["methods"].items():
        spec = models.get_method(name)
        stage = stages[spec.data_stage]
        if "foreach" in stage:  # one stage per profile: data/era5/${item}/prepared
            outs = [o.replace("${item}", prof) for o in stage["do"]["outs"] for prof in params["era5_profiles"]]
        else:
            outs = stage["outs"]
        assert p["data"] in outs, f"{name}: params data {p['data']} is not an output of stage {spec.data_stage}"
        assert set(p.get("loss", {})) <= set(spec.loss)
        if spec.student:
            assert len(p["seeds"]) >= 3, "a distillation claim is a mean over at least 3 seeds"
        if spec.kind == "forecast":
            assert set(p["eval_leads"]) >= {int(c.left_metric.rsplit("_", 1)[1][:-1]) for c in spec.claims}
