"""The model registry and the method declarations: what a declaration must get right to be registered,
and how a method's params block must agree with it."""
import pytest
import torch

import models
import models.vision  # noqa: F401
from tasks.methods import Claim, MethodSpec, get_method, list_methods, register_method


def test_create_model_builds_registered_entrypoints_and_drops_none_kwargs():
    m = models.create_model("digits_mlp_tiny", hidden=None)  # None = the entrypoint's default
    assert m.config.hidden == 16
    assert models.create_model("digits_mlp_tiny", hidden=8).config.hidden == 8
    assert models.create_model("digits_cnn")(torch.rand(3, 64)).shape == (3, 10)
    assert models.model_family("digits_cnn") == "vision"


def test_unknown_model_names_the_registered_ones():
    with pytest.raises(RuntimeError, match="digits_cnn"):
        models.create_model("nope")


def test_families_register_on_import_and_all_can_be_listed():
    assert {"vision", "weather", "localization"} <= set(models.import_families())
    assert {"digits_cnn", "pangu_lite", "pangu_tiny"} <= set(models.list_models())
    assert models.model_family("pangu_lite") == "weather"


def test_student_is_much_smaller_than_teacher():
    spec = get_method("hinton_kd")
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(models.create_model(spec.teacher)) > 50 * n(models.create_model(spec.student))


@pytest.mark.parametrize("bad", ["a.acc >> b.acc", "acc > b.acc", "a.acc > 0.5", ""])
def test_claim_rejects_malformed_statements(bad):
    with pytest.raises(ValueError, match="cannot parse claim"):
        Claim.parse(bad)


def spec(**overrides):
    fields = dict(name="x", kind="classification", data_stage="digits", teacher="digits_cnn",
                  student="digits_mlp_tiny", loss={"kd": {}}, primary_metric="accuracy", higher_is_better=True,
                  baselines=("student_labels",), claim="student_kd.accuracy > student_labels.accuracy")
    return MethodSpec(**{**fields, **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"claim": "student_kd.accuracy > ghost.accuracy"}, "claim names unknown roles \\['ghost'\\]"),
    ({"recipe": "mutual"}, "recipe must be one of"),
    ({"recipe": "teacher_only"}, "recipe teacher_only takes no student"),
    ({"student": None, "claim": "teacher.accuracy > student_labels.accuracy"}, "recipe distill needs a student"),
    ({"recipe": "compare", "baselines": ()}, "baselines must include .student_labels."),
])
def test_a_declaration_is_checked_when_it_is_made(overrides, message):
    with pytest.raises(ValueError, match=message):
        spec(**overrides)


@pytest.mark.parametrize("overrides,error,message", [
    ({"teacher": "no_such_model"}, RuntimeError, "no_such_model"),
    ({"loss": {"kdd": {}}}, ValueError, "unknown loss term 'kdd'"),
    ({"loss": {"kd": {"temprature": 2}}}, ValueError, "loss term 'kd'.*temprature"),
    ({"loss": {"hint": {"student_key": "features", "teacher_key": "features"}},
      "feature_taps": {"student": ("features",), "teacher": ("featurez",)}}, ValueError,
     "feature tap teacher:'featurez' is not a module of digits_cnn"),
    ({"baselines": ("student_labels", "persistence"), "claim": "student_kd.accuracy > persistence.accuracy"},
     ValueError, "no step produces baseline\\(s\\) \\['persistence'\\]"),
])
def test_registration_checks_models_losses_taps_and_baselines(overrides, error, message):
    with pytest.raises(error, match=message):
        register_method(spec(**overrides))
    with pytest.raises(KeyError):
        get_method("x")


def test_every_declared_method_has_a_params_block_and_an_output_of_its_stage_as_data():
    import yaml
    from conftest import REPO
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(params["methods"]) == list_methods()
    for name, p in params["methods"].items():
        s = get_method(name)
        stage = stages[s.data_stage]
        paths = lambda outs: [next(iter(o)) if isinstance(o, dict) else o for o in outs]  # `- path: {persist: true}`
        if "foreach" in stage:  # one stage per profile: data/era5/${item}/prepared
            profiles = params[stage["foreach"].strip("${}")]
            outs = [o.replace("${item}", prof) for o in paths(stage["do"]["outs"]) for prof in profiles]
        else:
            outs = paths(stage["outs"])
        assert p["data"] in outs, f"{name}: params data {p['data']} is not an output of stage {s.data_stage}"
        if s.student:
            assert len(p["seeds"]) >= 3, "a distillation claim is checked over at least 3 seeds"
