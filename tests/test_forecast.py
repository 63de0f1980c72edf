"""Forecast task pieces against numpy loops: normalisation, baselines, scores, training."""
import numpy as np
import pytest
import torch

import models
import models.weather  # noqa: F401  (registers the Pangu models)
from models.distill import DistillationLoss
from tasks.kinds import get_kind
from tasks.kinds.forecast.data import Fields, ForecastPairs, Normalizer
from tasks.kinds.forecast.kind import climatology_predictor, persistence_predictor
from tasks.kinds.forecast.metrics import score, weighted_rmse
from tasks.platform.params import TrainParams as TrainConfig
from tasks.train.loop import fit

KIND = get_kind("forecast")
TARGETS_ONLY = KIND.labels_loss


def fit_forecaster(model, train, val, lead, cfg, *, seed, criterion, teacher=None, taps=None):
    """One lead-time model through the generic loop, with the forecast kind's pieces."""
    from types import SimpleNamespace
    data = SimpleNamespace(val=val)
    return fit(model, criterion, ForecastPairs(train, lead), cfg, seed=seed, forward=KIND.forward,
               validate=lambda m: KIND.validate(m, data, lead, torch.device("cpu")), teacher=teacher, taps=taps,
               cache_batch=KIND.cache_batch)

LAT = np.linspace(80, -80, 8)
STATS = {"z": {"mean": [1.5e4, 5.5e4], "std": [800.0, 1200.0]}, "t": {"mean": [280.0, 255.0], "std": [10.0, 8.0]},
         "t2m": {"mean": 285.0, "std": 12.0}}


def normalizer():
    return Normalizer(STATS, ["z", "t"], ["t2m"])


def test_normalizer_is_a_per_channel_z_score_and_round_trips():
    rng = np.random.default_rng(0)
    upper = torch.tensor(rng.normal(0, 1, (3, 2, 2, 8, 16)) * 100 + 5e4, dtype=torch.float32)
    surface = torch.tensor(rng.normal(285, 5, (3, 1, 8, 16)), dtype=torch.float32)
    nu, ns = normalizer().norm(upper, surface)
    for v, var in enumerate(["z", "t"]):
        for lvl in range(2):
            expected = (upper[:, v, lvl].numpy() - STATS[var]["mean"][lvl]) / STATS[var]["std"][lvl]
            np.testing.assert_allclose(nu[:, v, lvl].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ns[:, 0].numpy(), (surface[:, 0].numpy() - 285.0) / 12.0, rtol=1e-5, atol=1e-6)
    bu, bs = normalizer().denorm(nu, ns)
    torch.testing.assert_close(bu, upper, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(bs, surface)


def fields(T=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Fields(upper=torch.randn(T, 2, 2, 8, 16, generator=g), surface=torch.randn(T, 1, 8, 16, generator=g),
                  hours=np.arange(T) % 24, step_hours=1)


def test_baselines_pick_the_initial_state_and_the_valid_hour_climatology():
    f = fields()
    clim = (torch.randn(24, 2, 2, 8, 16), torch.randn(24, 1, 8, 16))
    idx = torch.tensor([0, 5, 23])
    u, s = persistence_predictor(f)(idx, 6)
    torch.testing.assert_close(u, f.upper[idx])
    u, s = climatology_predictor(f, clim)(idx, 6)
    for row, i in enumerate(idx.tolist()):
        torch.testing.assert_close(s[row], clim[1][(f.hours[i] + 6) % 24])


def test_score_matches_a_loop_in_physical_units():
    f = fields(T=12)
    norm = normalizer()
    clim = norm.denorm(torch.zeros(24, 2, 2, 8, 16), torch.zeros(24, 1, 8, 16))
    headline = [("z500", "upper", 0, 1), ("t2m", "surface", 0, None)]
    got = score(persistence_predictor(f), f, norm, clim, LAT, [3], headline)
    fu, _ = norm.denorm(f.upper, f.surface)
    init = list(range(12 - 3))
    expected = weighted_rmse(torch.stack([fu[i, 0, 1] for i in init]), torch.stack([fu[i + 3, 0, 1] for i in init]), LAT)
    assert got["rmse_z500_3h"] == pytest.approx(expected, rel=1e-9)
    assert set(got) == {"rmse_z500_3h", "acc_z500_3h", "rmse_t2m_3h", "acc_t2m_3h"}


def tiny(**kw):
    return models.create_model("pangu_tiny", n_upper=2, n_levels=2, n_surface=1, n_lat=8, n_lon=16, **kw)


def test_fit_forecaster_learns_a_shift_and_distils_with_one_teacher_pass():
    # truth: the field moves one grid point east per step; a learnable, non-trivial map
    base = torch.randn(1, 2, 2, 8, 16)
    upper = torch.cat([torch.roll(base, t, dims=-1) for t in range(40)])
    surface = upper[:, :1, 0]
    train = Fields(upper, surface, np.arange(40) % 24, 1)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.003)
    torch.manual_seed(0)
    hist = fit_forecaster(tiny(), train, train, 2, cfg, seed=0, criterion=DistillationLoss(TARGETS_ONLY))
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]

    teacher, calls = tiny(embed_dim=32), []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    crit = DistillationLoss({"forecast_l1": {"weight": 0.5}, "forecast_kd": {"weight": 0.5},
                             "hint": {"weight": 0.1, "student_key": "encoder1", "teacher_key": "encoder1"}})
    fit_forecaster(tiny(), train, train, 2, TrainConfig(epochs=1, batch_size=8, lr=0.003, cache_teacher=True),
                   seed=0, criterion=crit, teacher=teacher, taps={"student": ("encoder1",), "teacher": ("encoder1",)})
    assert len(calls) == 1  # cached: 38 training inputs < one chunk of 64, so the teacher ran once
    assert crit.terms["hint"].adapter.weight.shape == (32, 16)


def test_too_short_split_is_an_error():
    f = fields(T=5)
    with pytest.raises(ValueError, match="too few"):
        fit_forecaster(tiny(), f, f, 6, TrainConfig(epochs=1, batch_size=4, lr=0.01), seed=0, criterion=DistillationLoss(TARGETS_ONLY))


def member_dataset(members=3, times=4, seed=0):
    """An EDA-like upper-air-only dataset: (member, time, level, lat, lon), 12-hourly."""
    import pandas as pd
    import xarray as xr
    rng = np.random.default_rng(seed)
    dims = ("member", "time", "level", "latitude", "longitude")
    shape = (members, times, 2, 8, 16)
    return xr.Dataset({"z": (dims, rng.normal(5e4, 1e3, shape).astype(np.float32)),
                       "t": (dims, rng.normal(260, 10, shape).astype(np.float32))},
                      {"member": np.arange(members), "level": [500, 850], "latitude": LAT,
                       "longitude": np.arange(16) * 22.5,
                       "time": pd.date_range("2017-01-01", periods=times, freq="12h")})


def test_members_are_trajectories_and_pairs_never_cross_them():
    from tasks.kinds.forecast.data import to_fields
    ds = member_dataset()
    norm = Normalizer({"z": STATS["z"], "t": STATS["t"]}, ["z", "t"], [])
    f = to_fields(ds, norm, step_hours=12)
    assert f.upper.shape == (12, 2, 2, 8, 16) and f.surface.shape == (12, 0, 8, 16)
    # member-major rows: row m * 4 + t is member m at time t
    expected = (ds.z.values[2, 1] - np.array(STATS["z"]["mean"])[:, None, None]) / np.array(STATS["z"]["std"])[:, None, None]
    np.testing.assert_allclose(f.upper[2 * 4 + 1, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert f.hours.tolist() == [0, 12, 0, 12] * 3
    # brute force: (i, i + k) is a pair when both rows are the same member
    for k in (1, 2, 3, 4):
        brute = [i for i in range(12 - k) if i // 4 == (i + k) // 4]
        assert f.inits(k).tolist() == brute
    assert fields(T=10).inits(3).tolist() == list(range(7))  # one trajectory: every row with a target


def test_score_over_members_matches_a_loop():
    from tasks.kinds.forecast.data import to_fields
    ds = member_dataset(members=4, times=3, seed=1)
    norm = Normalizer({"z": STATS["z"], "t": STATS["t"]}, ["z", "t"], [])
    f = to_fields(ds, norm, step_hours=12)
    clim = (torch.zeros(24, 2, 2, 8, 16), torch.zeros(24, 0, 8, 16))
    got = score(persistence_predictor(f), f, norm, clim, LAT, [12, 24], [("t850", "upper", 1, 1)])
    for lead, k in ((12, 1), (24, 2)):
        pairs = [(m, t) for m in range(4) for t in range(3 - k)]
        fc = torch.tensor(np.stack([ds.t.values[m, t, 1] for m, t in pairs]), dtype=torch.float64)
        truth = torch.tensor(np.stack([ds.t.values[m, t + k, 1] for m, t in pairs]), dtype=torch.float64)
        assert got[f"rmse_t850_{lead}h"] == pytest.approx(weighted_rmse(fc, truth, LAT), rel=1e-5)


def test_an_upper_air_only_model_trains_on_members():
    from tasks.kinds.forecast.data import to_fields
    f = to_fields(member_dataset(members=4, times=4), Normalizer({"z": STATS["z"], "t": STATS["t"]}, ["z", "t"], []),
                  step_hours=12)
    model = models.create_model("pangu_tiny", n_upper=2, n_levels=2, n_surface=0, n_lat=8, n_lon=16)
    hist = fit_forecaster(model, f, f, 12, TrainConfig(epochs=2, batch_size=4, lr=0.003), seed=0,
                          criterion=DistillationLoss(TARGETS_ONLY))
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in hist)


def test_longitude_layout_finds_global_grids_and_rolls_boxes_across_greenwich():
    from tasks.kinds.forecast.data import longitude_layout
    assert longitude_layout(np.arange(5.625, 360, 11.25)) == (True, 0)
    uk = np.sort(np.concatenate([np.arange(0.125, 2, 0.5), np.arange(350.125, 360, 0.5)]))
    is_global, shift = longitude_layout(uk)
    assert not is_global and shift == 4
    rolled = np.roll(uk, -shift)
    assert np.all(np.diff((rolled - 180) % 360) > 0)  # contiguous once rolled: 350.125 ... 359.625, 0.125 ... 1.625
    assert longitude_layout(np.arange(10, 20, 0.5)) == (False, 0)


def test_pangu_trains_in_bf16_autocast():
    f = fields(T=20)
    hist = fit_forecaster(tiny(), f, f, 1, TrainConfig(epochs=2, batch_size=8, lr=0.003, precision="bf16"), seed=0,
                          criterion=DistillationLoss(TARGETS_ONLY))
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in hist)
