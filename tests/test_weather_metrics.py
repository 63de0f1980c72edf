"""WB2 metrics against xskillscore and explicit loops on random fields."""
import math

import numpy as np
import pytest
import torch
import xarray as xr
import xskillscore as xs

from tasks.weather_metrics import lat_weights, weighted_acc, weighted_rmse

LAT = np.linspace(90, -90, 19)   # 10° grid with poles, ERA5 order
LON = np.arange(0, 360, 10.0)


def fields(seed, shape=(7, 19, 36)):
    rng = np.random.default_rng(seed)
    return rng.normal(280, 5, shape), rng.normal(280, 5, shape), rng.normal(280, 2, shape[1:])


def test_lat_weights_are_cell_areas_with_mean_one():
    w = lat_weights(LAT).numpy()
    assert w.mean() == pytest.approx(1.0)
    # a loop over cells: area of the band between the cell's edges, clipped at the poles
    areas = [math.sin(math.radians(min(p + 5, 90))) - math.sin(math.radians(max(p - 5, -90))) for p in LAT]
    np.testing.assert_allclose(w, np.array(areas) / np.mean(areas), rtol=1e-12)
    assert w[0] < w[9] and w[0] == pytest.approx(w[-1])  # poles small, symmetric


def test_rmse_matches_xskillscore_per_time_then_time_mean():
    f, o, _ = fields(0)
    got = weighted_rmse(torch.tensor(f), torch.tensor(o), LAT)
    da = lambda a: xr.DataArray(a, dims=["time", "lat", "lon"], coords={"lat": LAT, "lon": LON})
    w = xr.DataArray(lat_weights(LAT).numpy(), dims=["lat"], coords={"lat": LAT}).broadcast_like(da(f).isel(time=0))
    # xskillscore gives the weighted RMSE per time; WB2 averages the squares over time before the root
    per_time = xs.rmse(da(f), da(o), dim=["lat", "lon"], weights=w)
    assert got == pytest.approx(float(np.sqrt((per_time ** 2).mean())), rel=1e-10)


def test_rmse_matches_a_loop():
    f, o, _ = fields(1, (3, 19, 36))
    w = lat_weights(LAT).numpy()
    total = 0.0
    for t in range(3):
        s = 0.0
        for i in range(19):
            for j in range(36):
                s += w[i] * (f[t, i, j] - o[t, i, j]) ** 2
        total += s / (19 * 36)
    assert weighted_rmse(torch.tensor(f), torch.tensor(o), LAT) == pytest.approx(math.sqrt(total / 3), rel=1e-10)


def test_acc_matches_a_loop_and_its_closed_forms():
    f, o, c = fields(2, (4, 19, 36))
    w = lat_weights(LAT).numpy()
    accs = []
    for t in range(4):
        fa, oa = f[t] - c, o[t] - c
        accs.append((w[:, None] * fa * oa).sum() / math.sqrt((w[:, None] * fa ** 2).sum() * (w[:, None] * oa ** 2).sum()))
    T = lambda a: torch.tensor(a)
    assert weighted_acc(T(f), T(o), T(c), LAT) == pytest.approx(float(np.mean(accs)), rel=1e-10)
    assert weighted_acc(T(o), T(o), T(c), LAT) == pytest.approx(1.0)          # perfect forecast
    assert weighted_acc(T(2 * o - c), T(o), T(c), LAT) == pytest.approx(1.0)  # scaled anomalies
    assert weighted_acc(T(2 * c - o), T(o), T(c), LAT) == pytest.approx(-1.0) # opposite anomalies
