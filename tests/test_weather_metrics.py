"""WB2 metrics against xskillscore and explicit loops on random fields."""
import math

import numpy as np
import pytest
import torch
import xarray as xr
import xskillscore as xs

from tasks.kinds.forecast.metrics import lat_weights, weighted_acc, weighted_rmse

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


def test_lat_weights_accept_a_descending_numpy_view():
    ascending = np.linspace(-90, 90, 19)
    view = ascending[::-1]  # negative strides, as xarray hands out after a reversal
    np.testing.assert_allclose(lat_weights(view).numpy(), lat_weights(LAT).numpy(), rtol=0, atol=0)
    assert weighted_rmse(torch.ones(2, 19, 3), torch.zeros(2, 19, 3), view) == pytest.approx(1.0)


def test_irregular_latitudes_get_the_area_of_the_band_halfway_to_each_neighbour():
    lat = np.array([80.0, 60.0, 50.0, 10.0, -30.0])  # descending, uneven gaps
    edges = [90.0, 70.0, 55.0, 30.0, -10.0, -50.0]   # halfway between rows; beyond the ends by half a gap
    areas = [math.sin(math.radians(edges[i])) - math.sin(math.radians(edges[i + 1])) for i in range(5)]
    np.testing.assert_allclose(lat_weights(lat).numpy(), np.array(areas) / np.mean(areas), rtol=1e-12)
    # the order of the rows does not matter
    np.testing.assert_allclose(lat_weights(lat[::-1].copy()).numpy(), (np.array(areas) / np.mean(areas))[::-1], rtol=1e-12)


def test_a_regional_grid_weighted_mean_is_the_area_weighted_mean_over_the_region():
    lat = np.arange(61.0, 49.0, -0.5)  # a UK-like box, 0.5°
    field = torch.tensor(np.random.default_rng(3).normal(size=(1, len(lat), 4)))
    areas = np.array([math.sin(math.radians(p + 0.25)) - math.sin(math.radians(p - 0.25)) for p in lat])
    expected = (field[0].numpy() ** 2 * areas[:, None]).sum() / (areas.sum() * 4)
    assert weighted_rmse(field, torch.zeros_like(field), lat) ** 2 == pytest.approx(expected, rel=1e-12)
