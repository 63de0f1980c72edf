"""KD losses against closed forms and explicit loops; hooks against direct submodule calls."""
import math

import pytest
import torch
import torch.nn as nn

from models.distill import (DistillationLoss, ForwardHookManager, create_loss, forward_with_taps,
                            list_losses)


def softmax_loop(z, t):
    e = [math.exp(v / t) for v in z]
    s = sum(e)
    return [v / s for v in e]


def test_kd_loss_matches_loop_over_samples_and_classes():
    torch.manual_seed(0)
    zs, zt, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    expected = 0.0
    for i in range(5):
        ps, pt = softmax_loop(zs[i].tolist(), T), softmax_loop(zt[i].tolist(), T)
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected = expected / 5 * T * T
    got = create_loss("kd", temperature=T)({"logits": zs}, {"logits": zt}, torch.zeros(5, dtype=torch.long))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_kd_gradient_is_closed_form():
    # d/dz_s of T²·KL(p_t ‖ p_s) averaged over B rows is T·(p_s − p_t)/B (Hinton et al. 2015, eq. 2)
    torch.manual_seed(1)
    zs, zt, T = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6), 2.5
    create_loss("kd", temperature=T)({"logits": zs}, {"logits": zt}, None).backward()
    expected = T * (torch.softmax(zs.detach() / T, -1) - torch.softmax(zt / T, -1)) / 4
    torch.testing.assert_close(zs.grad, expected, rtol=1e-5, atol=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_rejects_bad_temperature():
    z = torch.randn(3, 4)
    assert float(create_loss("kd")({"logits": z}, {"logits": z.clone()}, None)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        create_loss("kd", temperature=0)


def test_hint_loss_is_mse_of_the_learned_adapter():
    torch.manual_seed(2)
    s, t = torch.randn(6, 3), torch.randn(6, 5)
    loss = create_loss("hint", student_key="f", teacher_key="f")
    value = loss({"f": s}, {"f": t}, None)
    w, b = loss.adapter.weight.detach(), loss.adapter.bias.detach()
    expected = sum(float(((w @ s[i] + b - t[i]) ** 2).sum()) for i in range(6)) / (6 * 5)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_hint_loss_uses_a_1x1_conv_for_feature_maps_and_rejects_mismatched_maps():
    loss = create_loss("hint", student_key="f", teacher_key="f")
    loss({"f": torch.randn(2, 3, 4, 4)}, {"f": torch.randn(2, 8, 4, 4)}, None)
    assert isinstance(loss.adapter, nn.Conv2d) and loss.adapter.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="cannot adapt"):
        create_loss("hint", student_key="f", teacher_key="f")(
            {"f": torch.randn(2, 3, 4, 4)}, {"f": torch.randn(2, 8, 2, 2)}, None)


def test_relation_loss_matches_loop_over_pairs():
    torch.manual_seed(3)
    s, t = torch.randn(5, 4), torch.randn(5, 9)

    def normalized_distances(x):
        pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if i != j]
        d = {p: math.dist(x[p[0]].tolist(), x[p[1]].tolist()) for p in pairs}
        mean = sum(d.values()) / len(d)
        return {p: v / mean for p, v in d.items()}

    ds, dt = normalized_distances(s), normalized_distances(t)
    huber = lambda a: 0.5 * a * a if abs(a) < 1 else abs(a) - 0.5
    expected = sum(huber(ds[p] - dt[p]) for p in ds) / len(ds)
    got = create_loss("relation", student_key="f", teacher_key="f")({"f": s}, {"f": t}, None)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_relation_loss_is_invariant_to_scaling_the_teacher_space():
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    loss = create_loss("relation", student_key="f", teacher_key="f")
    assert float(loss({"f": s}, {"f": t}, None)) == pytest.approx(float(loss({"f": s}, {"f": 7 * t}, None)), rel=1e-5)


def test_weighted_sum_reports_each_weighted_term():
    torch.manual_seed(4)
    zs, zt, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    crit = DistillationLoss({"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1}})
    total, parts = crit({"logits": zs}, {"logits": zt}, y)
    kd = create_loss("kd", temperature=4.0)({"logits": zs}, {"logits": zt}, y)
    ce = torch.nn.functional.cross_entropy(zs, y)
    assert float(total) == pytest.approx(0.9 * float(kd) + 0.1 * float(ce), rel=1e-6)
    assert parts == pytest.approx({"kd": 0.9 * float(kd), "ce": 0.1 * float(ce)}, rel=1e-6)
    assert crit.needs_teacher and not DistillationLoss({"ce": {}}).needs_teacher
    assert {"kd", "ce", "hint", "relation"} <= set(list_losses())


def test_hook_manager_captures_named_submodule_outputs_and_clears():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))
    hooks = ForwardHookManager()
    hooks.add_hook(model, "1")
    hooks.add_hook(model, "2.0", requires_input=True)
    x = torch.randn(5, 4)
    out = model(x)
    io = hooks.pop_io_dict()
    torch.testing.assert_close(io["1"]["output"], torch.relu(model[0](x)))
    torch.testing.assert_close(io["2.0"]["input"], torch.relu(model[0](x)))
    torch.testing.assert_close(io["2.0"]["output"], out)
    assert hooks.pop_io_dict() == {}
    hooks.clear()
    model(x)
    assert hooks.pop_io_dict() == {}
    with pytest.raises(AttributeError):
        hooks.add_hook(model, "missing.layer")


def test_forward_with_taps_returns_logits_and_features():
    import models
    m = models.create_model("digits_mlp_tiny").eval()
    hooks = ForwardHookManager()
    hooks.add_hook(m, "features")
    x = torch.rand(3, 64)
    out = forward_with_taps(m, x, hooks)
    torch.testing.assert_close(out["features"], m.forward_features(x))
    torch.testing.assert_close(out["logits"], m(x))


def test_forecast_losses_are_mean_abs_errors_over_both_fields():
    torch.manual_seed(5)
    s = {"upper": torch.randn(2, 3, 2, 4, 5), "surface": torch.randn(2, 2, 4, 5)}
    t = {"upper": torch.randn(2, 3, 2, 4, 5), "surface": torch.randn(2, 2, 4, 5)}
    mae = lambda a, b: float((a - b).abs().sum()) / a.numel()
    expected = (mae(s["upper"], t["upper"]) + mae(s["surface"], t["surface"])) / 2
    assert float(create_loss("forecast_l1")(s, None, t)) == pytest.approx(expected, rel=1e-6)
    assert float(create_loss("forecast_kd")(s, t, None)) == pytest.approx(expected, rel=1e-6)


def test_hint_adapts_channels_last_token_cubes():
    loss = create_loss("hint", student_key="f", teacher_key="f")
    loss({"f": torch.randn(2, 3, 4, 5, 16)}, {"f": torch.randn(2, 3, 4, 5, 32)}, None)
    assert isinstance(loss.adapter, nn.Linear) and loss.adapter.weight.shape == (32, 16)


@pytest.mark.parametrize("empty", ["upper", "surface"])
def test_forecast_losses_skip_an_empty_field(empty):
    """Surface-only (UK t2m) and upper-air-only (EDA z/t) data: the loss is the other field's MAE,
    not NaN (the mean of an empty tensor)."""
    torch.manual_seed(6)
    shapes = {"upper": (2, 3, 2, 4, 5), "surface": (2, 2, 4, 5)}
    shapes[empty] = (2, 0, 4, 5) if empty == "surface" else (2, 0, 0, 4, 5)
    s = {k: torch.randn(shape, requires_grad=True) for k, shape in shapes.items()}
    t = {k: torch.randn(shape) for k, shape in shapes.items()}
    full = "surface" if empty == "upper" else "upper"
    expected = float((s[full] - t[full]).abs().mean())
    loss = create_loss("forecast_l1")(s, None, t)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(s[full].grad).all()
    assert float(create_loss("forecast_kd")(s, t, None)) == pytest.approx(expected, rel=1e-6)
