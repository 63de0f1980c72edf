"""The ERA5 prepare stage: names/units, regridding, leak-free splits, train-only statistics and
climatology, Great Expectations validation, the consumer API, and bad input → clear error, no output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import REPO, shared_file
from tasks.kinds.forecast import schema
from tasks.platform.common import StageError
from tasks.stages import era5_download as era5, era5_harmonise as harm, era5_prepare as prep, era5_synthetic

UK_GRIB = "era5/xarray-data/era5-2mt-2019-03-uk.grib"
DEFAULT_ERA5 = {"source": "synthetic", "start": "2020-01-01T00:00", "n_days": 30, "step_hours": 1,
                "levels": [850, 500, 250], "variables": ["z", "t", "u", "v", "t2m", "msl", "u10", "v10"],
                "synthetic": {"grid_deg": 5.625, "seed": 0}}
DEFAULT_PREPARE = {"variables": ["z", "t", "u", "v", "t2m", "msl", "u10", "v10"], "levels": [850, 500, 250],
                   "grid_deg": 11.25, "split": {"val": 0.15, "test": 0.15}, "max_lead_hours": 24}


def small_raw(path, days=4, step=1, grid=22.5, levels=(850, 500), variables=("z", "t", "t2m", "msl"),
              seed=0, mutate=None):
    """A raw store from the synthetic model, optionally altered by `mutate(ds) -> ds` before writing."""
    times = pd.date_range("2020-01-01", periods=days * 24 // step, freq=f"{step}h")
    ds = era5_synthetic.generate(times, grid, list(levels), list(variables), seed)
    ds = ds.assign_attrs(source="synthetic")
    if mutate is None:
        era5.write_store(ds, path, "small_raw")
    else:  # a faulty store as another tool (or an older version of the download stage) might write it
        ds = mutate(ds)
        ds.to_zarr(path, mode="w", consolidated=False)
    return ds


def small_cfg(**over):
    cfg = {"variables": ["z", "t", "t2m", "msl"], "levels": [850, 500], "grid_deg": None,
           "split": {"val": 0.2, "test": 0.2}, "max_lead_hours": 6}
    cfg.update(over)
    return cfg


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


# ---------------------------------------------------------------------------------------------------
# names and units

def da(values, units, dims=("time",)):
    return xr.DataArray(np.asarray(values, np.float32), dims=dims, attrs={"units": units})


@pytest.mark.parametrize("var, value, units, expected", [
    ("z", 5500.0, "gpm", 5500 * 9.80665),        # geopotential height → geopotential
    ("z", 5500.0, "m", 53936.575),
    ("z", 53936.575, "m**2 s**-2", 53936.575),
    ("t", 15.0, "degC", 288.15),
    ("t2m", -40.0, "°C", 233.15),
    ("t2m", 290.0, "K", 290.0),
    ("q", 12.0, "g kg**-1", 0.012),
    ("q", 0.012, "kg kg**-1", 0.012),
    ("msl", 1013.25, "hPa", 101325.0),
    ("sp", 850.0, "millibars", 85000.0),
    ("u10", 7.5, "m s**-1", 7.5),
    ("v", -3.0, "m/s", -3.0),
])
def test_unit_conversions_match_hand_computed_values(var, value, units, expected):
    out = harm.convert_units(da([value], units), var, "raw.zarr")
    assert out.dtype == np.float32 and out.attrs["units"] == schema.VARIABLES[var].units
    np.testing.assert_allclose(out.values, [expected], rtol=1e-6)


@pytest.mark.parametrize("units", ["furlongs", "degF", None])
def test_unknown_units_are_an_error(units):
    attrs = {} if units is None else {"units": units}
    arr = xr.DataArray(np.zeros(2, np.float32), dims=("time",), attrs=attrs)
    with pytest.raises(StageError, match="wrong units") as e:
        harm.convert_units(arr, "t2m", "raw.zarr")
    assert e.value.path == "raw.zarr"


def test_harmonise_maps_arco_cfgrib_and_cds_names():
    t = pd.date_range("2020-01-01", periods=3, freq="h")
    lat, lon = [10.0, 0.0], [0.0, 1.0]
    field = np.full((3, 1, 2, 2), 5000.0, np.float32)
    dims4 = ("time", "level", "latitude", "longitude")
    arco = xr.Dataset({"geopotential": (dims4, field, {"units": "m**2 s**-2"}),
                       "2m_temperature": (("time", "latitude", "longitude"), field[:, 0], {"units": "K"})},
                      {"time": t, "level": [500], "latitude": lat, "longitude": lon})
    cfgrib = xr.Dataset({"gh": (("time", "isobaricInhPa", "latitude", "longitude"), field, {"units": "gpm"}),
                         "2t": (("time", "latitude", "longitude"), field[:, 0], {"units": "K"})},
                        {"time": t, "isobaricInhPa": [500.0], "latitude": lat, "longitude": lon,
                         "valid_time": ("time", t + pd.Timedelta(hours=0)), "step": np.timedelta64(0, "h"),
                         "number": 0})
    cds = xr.Dataset({"z": (("valid_time", "pressure_level", "lat", "lon"), field, {"units": "m**2 s**-2"}),
                      "t2m": (("valid_time", "lat", "lon"), field[:, 0], {"units": "K"}),
                      "d2m": (("valid_time", "lat", "lon"), field[:, 0], {"units": "K"})},
                     {"valid_time": t, "pressure_level": ("pressure_level", [50000.0], {"units": "Pa"}),
                      "lat": lat, "lon": lon, "expver": ("valid_time", ["0001"] * 3)})
    for ds in (arco, cfgrib, cds):
        out = harm.harmonise(ds, "raw.zarr")
        assert set(out.data_vars) == {"z", "t2m"}  # d2m is not used: dropped
        assert out.z.dims == ("time", "level", "latitude", "longitude")
        assert out["level"].values.tolist() == [500]
        assert set(out.coords) == {"time", "level", "latitude", "longitude"}  # step, number, expver dropped
        np.testing.assert_array_equal(out["time"].values, t.values)
    np.testing.assert_allclose(harm.harmonise(cfgrib, "r").z.values, 5000 * 9.80665, rtol=1e-6)


def test_upper_and_surface_vars_in_canonical_order():
    dims3, dims4 = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    ds = xr.Dataset({v: (dims4 if schema.VARIABLES[v].upper else dims3,
                         np.zeros((1, 1, 1, 1) if schema.VARIABLES[v].upper else (1, 1, 1)))
                     for v in ["v10", "q", "msl", "z", "t2m", "u", "sp", "t", "u10", "v"]})
    assert schema.upper_vars(ds) == ["z", "t", "u", "v", "q"]
    assert schema.surface_vars(ds) == ["t2m", "msl", "sp", "u10", "v10"]


# ---------------------------------------------------------------------------------------------------
# grid

def grid_ds(lat, lon, values):
    return xr.Dataset({"t2m": (("time", "latitude", "longitude"), values, {"units": "K"})},
                      {"time": pd.date_range("2020-01-01", periods=values.shape[0], freq="h"),
                       "latitude": lat, "longitude": lon})


def test_coarsening_matches_a_numpy_loop_mean():
    rng = np.random.default_rng(0)
    lat, lon = 58.0 - 0.25 * np.arange(9), -10.0 + 0.25 * np.arange(13)   # odd sizes: trimmed
    x = rng.random((2, 9, 13)).astype(np.float32) + 270
    out, how = prep.regrid(grid_ds(lat, lon, x), 0.5)
    assert how == "block mean 2x2" and out.t2m.shape == (2, 4, 6)
    ref = np.empty((2, 4, 6))
    for i in range(4):
        for j in range(6):
            ref[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].astype(float).mean(axis=(1, 2))
    np.testing.assert_allclose(out.t2m.values, ref, rtol=1e-6)
    np.testing.assert_allclose(out.latitude.values, [57.875, 57.375, 56.875, 56.375])
    np.testing.assert_allclose(out.longitude.values, -9.875 + 0.5 * np.arange(6))
    # then ERA5 order: longitudes in [0, 360) ascending, latitude descending
    final = prep.wrap_and_sort(out)
    np.testing.assert_allclose(final.longitude.values, 350.125 + 0.5 * np.arange(6))


def test_block_mean_of_unequal_blocks_matches_a_loop_on_numpy_and_dask():
    """3 x 2 blocks on an upper-air (time, level, lat, lon) field, trimmed; Dask gives the same numbers."""
    rng = np.random.default_rng(1)
    x = rng.normal(5e4, 1e3, (3, 2, 7, 9)).astype(np.float32)
    ds = xr.Dataset({"z": (("time", "level", "latitude", "longitude"), x)},
                    {"latitude": 30.0 - np.arange(7), "longitude": 0.5 * np.arange(9), "level": [850, 500]})
    ref = np.empty((3, 2, 2, 4))
    for i in range(2):
        for j in range(4):
            ref[..., i, j] = x[..., 3 * i:3 * i + 3, 2 * j:2 * j + 2].astype(float).mean(axis=(-2, -1))
    eager = ds.coarsen(latitude=3, longitude=2, boundary="trim").reduce(prep.block_mean)
    lazy = ds.chunk({"time": 1}).coarsen(latitude=3, longitude=2, boundary="trim").reduce(prep.block_mean)
    assert lazy.z.chunks is not None
    np.testing.assert_allclose(eager.z.values, ref, rtol=1e-6)
    np.testing.assert_array_equal(lazy.z.values, eager.z.values)


def test_sort_by_sorts_only_what_is_unsorted():
    ds = grid_ds([1.0, 0.0], [10.0, 0.0, 5.0], np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    assert prep.sort_by(ds, "latitude", ascending=False) is ds
    out = prep.sort_by(ds, "longitude")
    assert out.longitude.values.tolist() == [0, 5, 10]
    np.testing.assert_array_equal(out.t2m.values[0], [[1, 2, 0], [4, 5, 3]])


def test_coarsening_keeps_nan_for_validation():
    x = np.full((1, 4, 4), 280.0, np.float32)
    x[0, 0, 0] = np.nan
    out, _ = prep.regrid(grid_ds([3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], x), 2.0)
    assert np.isnan(out.t2m.values[0, 0, 0]) and np.isfinite(out.t2m.values[0, 1, 1])


def test_non_integer_ratio_interpolates_linearly():
    lat, lon = np.arange(10.0, -0.5, -1.0), np.arange(0.0, 10.5, 1.0)
    plane = 250 + 2.0 * lat[:, None] + 0.5 * lon[None, :]  # linear: interpolation is exact
    out, how = prep.regrid(grid_ds(lat, lon, plane[None].astype(np.float32)), 1.5)
    assert how == "linear interpolation"
    np.testing.assert_allclose(out.latitude.values, [10, 8.5, 7, 5.5, 4, 2.5, 1])
    np.testing.assert_allclose(out.longitude.values, [0, 1.5, 3, 4.5, 6, 7.5, 9])
    expected = 250 + 2.0 * out.latitude.values[:, None] + 0.5 * out.longitude.values[None, :]
    np.testing.assert_allclose(out.t2m.values[0], expected, rtol=1e-6)


def test_longitudes_from_minus_180_are_wrapped_and_sorted():
    lon = np.arange(-180.0, 180.0, 90.0)  # -180, -90, 0, 90
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 4) + 250
    out = prep.wrap_and_sort(grid_ds([-45.0, 45.0], lon, x))  # latitude ascending in the source
    assert out.longitude.values.tolist() == [0, 90, 180, 270]
    assert out.latitude.values.tolist() == [45, -45]
    np.testing.assert_array_equal(out.t2m.values[0], [[256, 257, 254, 255], [252, 253, 250, 251]])


# ---------------------------------------------------------------------------------------------------
# splits

def test_fraction_split_leaves_more_than_max_lead_between_splits():
    times = pd.date_range("2020-01-01", periods=300, freq="h").values
    idx = prep.split_indices(times, {"val": 0.2, "test": 0.1}, max_lead_hours=24, step_hours=1)
    all_idx = np.concatenate([idx[s] for s in schema.SPLITS])
    assert len(np.unique(all_idx)) == len(all_idx)
    assert idx["train"][-1] < idx["val"][0] and idx["val"][-1] < idx["test"][0]
    assert idx["val"][0] - idx["train"][-1] == 25 and idx["test"][0] - idx["val"][-1] == 25
    # 300 - 2 x 24 = 252 usable: val round(50.4) = 50, test round(25.2) = 25, train the rest
    assert (len(idx["train"]), len(idx["val"]), len(idx["test"])) == (177, 50, 25)
    # no leakage: no target up to max_lead after a time of one split is a time of a later split
    for earlier, later in (("train", "val"), ("train", "test"), ("val", "test")):
        targets = {t + np.timedelta64(h, "h") for t in times[idx[earlier]] for h in range(25)}
        assert not targets & set(times[idx[later]])


def test_explicit_split_ranges_and_a_too_small_gap():
    times = pd.date_range("2020-01-01", periods=24 * 10, freq="h").values
    ok = {"train": ["2020-01-01", "2020-01-06T23"], "val": ["2020-01-08", "2020-01-08T23"],
          "test": ["2020-01-10", "2020-01-10T23"]}
    idx = prep.split_indices(times, ok, max_lead_hours=24, step_hours=1)
    assert (len(idx["train"]), len(idx["val"]), len(idx["test"])) == (144, 24, 24)
    close = {**ok, "val": ["2020-01-07T12", "2020-01-08T23"]}
    with pytest.raises(StageError, match="val starts 13 h after train ends") as e:
        prep.split_indices(times, close, max_lead_hours=24, step_hours=1)
    assert e.value.path == "params.yaml"
    with pytest.raises(StageError, match="too few"):
        prep.split_indices(times[:50], {"val": 0.2, "test": 0.2}, max_lead_hours=24, step_hours=1)


def test_embargo_zero_lets_splits_share_one_boundary_step_and_no_more():
    times = pd.date_range("2017-01-01", periods=4, freq="12h").values
    shared = {"train": ["2017-01-01T00", "2017-01-01T12"], "val": ["2017-01-01T12", "2017-01-02T00"],
              "test": ["2017-01-02T00", "2017-01-02T12"]}
    with pytest.raises(StageError, match="val starts 0 h after train ends; need more than max_lead_hours=12"):
        prep.split_indices(times, shared, max_lead_hours=12, step_hours=12)
    idx = prep.split_indices(times, shared, max_lead_hours=12, step_hours=12, embargo_hours=0)
    assert {k: v.tolist() for k, v in idx.items()} == {"train": [0, 1], "val": [1, 2], "test": [2, 3]}
    # targets (every time after a split's first) are never in two splits, for any lead
    targets = {k: set(v[1:].tolist()) for k, v in idx.items()}
    assert not (targets["train"] & targets["val"] or targets["val"] & targets["test"])
    overlap = {**shared, "val": ["2017-01-01T00", "2017-01-02T00"]}
    with pytest.raises(StageError, match="val starts -12 h after train ends; need at least embargo_hours=0"):
        prep.split_indices(times, overlap, max_lead_hours=12, step_hours=12, embargo_hours=0)
    with pytest.raises(StageError, match="embargo_hours must be >= 0"):
        prep.split_indices(times, shared, max_lead_hours=12, step_hours=12, embargo_hours=-1)


# ---------------------------------------------------------------------------------------------------
# statistics and climatology

def test_climatology_by_hour_matches_a_loop_and_fills_sub_daily_hours():
    times = pd.date_range("2020-01-01", periods=72, freq="h")
    rng = np.random.default_rng(2)
    x = rng.random((72, 2, 3)).astype(np.float32) + 280
    clim = prep.compute_climatology(grid_ds([10.0, 0.0], [0.0, 1.0, 2.0], x))
    assert clim.t2m.dims == ("hour", "latitude", "longitude") and clim.hour.values.tolist() == list(range(24))
    for h in range(24):
        expected = x[times.hour == h].astype(float).mean(axis=0)
        np.testing.assert_allclose(clim.t2m.values[h], expected, rtol=1e-6)
    six = grid_ds([10.0, 0.0], [0.0, 1.0, 2.0], x[::6]).assign_coords(time=times[::6])  # 00, 06, 12, 18 UTC
    c6 = prep.compute_climatology(six).t2m.values
    m = {h: x[::6][times[::6].hour == h].astype(float).mean(axis=0) for h in (0, 6, 12, 18)}
    np.testing.assert_allclose(c6[6], m[6], rtol=1e-6)
    np.testing.assert_allclose(c6[3], (m[0] + m[6]) / 2, rtol=1e-6)
    np.testing.assert_allclose(c6[22], m[18] + (m[0] - m[18]) * 4 / 6, rtol=1e-6)  # wraps past midnight


def test_stats_and_climatology_come_from_the_training_period_only(tmp_path):
    cfg = small_cfg()
    base = small_raw(tmp_path / "a.zarr")
    meta = prep.prepare(tmp_path / "a.zarr", tmp_path / "out_a", cfg)
    n_train = meta["splits"]["train"]["n_times"]

    def later_changed(ds):  # val and test periods altered, training period untouched
        ds = ds.copy(deep=True)
        ds["t2m"][n_train + 1:] += 5.0
        ds["z"][n_train + 1:] *= 1.01
        return ds
    small_raw(tmp_path / "b.zarr", mutate=later_changed)
    prep.prepare(tmp_path / "b.zarr", tmp_path / "out_b", cfg)

    stats_a = json.loads((tmp_path / "out_a" / "stats.json").read_text())
    stats_b = json.loads((tmp_path / "out_b" / "stats.json").read_text())
    assert stats_a == stats_b
    a, b = schema.load_prepared(tmp_path / "out_a"), schema.load_prepared(tmp_path / "out_b")
    xr.testing.assert_identical(a["climatology"], b["climatology"])
    assert not np.allclose(a["val"].t2m.values, b["val"].t2m.values)

    # against numpy on the raw training slice (native grid here, so no regridding in between)
    train = base.isel(time=slice(0, n_train))
    for v in ("z", "t"):
        x = train[v].values.astype(float)  # (time, level, lat, lon), levels [850, 500]
        np.testing.assert_allclose(stats_a[v]["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-9)
        np.testing.assert_allclose(stats_a[v]["std"], x.std(axis=(0, 2, 3)), rtol=1e-9)
    x = train.t2m.values.astype(float)
    assert stats_a["t2m"]["mean"] == pytest.approx(x.mean(), rel=1e-9)
    assert stats_a["t2m"]["std"] == pytest.approx(x.std(), rel=1e-9)
    hour0 = train.t2m.values[train.time.dt.hour.values == 0].astype(float).mean(axis=0)
    np.testing.assert_allclose(a["climatology"].t2m.sel(hour=0).values, hour0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the default profile end to end, and the consumer API

@pytest.fixture(scope="module")
def default_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    era5.download(DEFAULT_ERA5, root / "raw.zarr")
    meta = prep.prepare(root / "raw.zarr", root / "prepared", DEFAULT_PREPARE)
    return root, meta


def test_default_profile_yields_16x32_and_the_documented_layout(default_prepared):
    root, meta = default_prepared
    out = root / "prepared"
    assert sorted(p.name for p in out.iterdir()) == ["climatology.zarr", "meta.json", "stats.json",
                                                      "test.zarr", "train.zarr", "val.zarr"]
    assert not list(root.glob(".prepared*"))
    assert (meta["grid"]["n_lat"], meta["grid"]["n_lon"]) == (16, 32)
    assert meta["grid"]["regrid"] == "block mean 2x2" and meta["step_hours"] == 1
    assert meta["source"] == "synthetic" and meta["levels"] == [850, 500, 250]
    d = schema.load_prepared(out)
    assert set(d) == {"train", "val", "test", "climatology", "stats", "meta"}
    for split in schema.SPLITS:
        ds = d[split]
        assert schema.upper_vars(ds) == ["z", "t", "u", "v"]
        assert schema.surface_vars(ds) == ["t2m", "msl", "u10", "v10"]
        assert ds.z.dims == ("time", "level", "latitude", "longitude")
        assert ds.t2m.dims == ("time", "latitude", "longitude")
        assert all(ds[v].dtype == np.float32 for v in ds.data_vars)
        assert ds.sizes["latitude"] == 16 and ds.sizes["longitude"] == 32
        assert ds.level.values.tolist() == [850, 500, 250]
        assert ds.sizes["time"] == meta["splits"][split]["n_times"]
    lat = d["train"].latitude.values
    assert (np.diff(lat) < 0).all() and (np.diff(d["train"].longitude.values) > 0).all()
    np.testing.assert_allclose(lat, 90 - 11.25 / 2 - 11.25 * np.arange(16))
    assert sum(s["n_times"] for s in meta["splits"].values()) == 720 - 2 * 24
    assert d["climatology"].z.dims == ("hour", "level", "latitude", "longitude")
    assert d["climatology"].sizes["hour"] == 24
    assert len(d["stats"]["z"]["mean"]) == 3 and isinstance(d["stats"]["t2m"]["std"], float)


def test_load_prepared_revalidates_and_names_the_bad_split(default_prepared, tmp_path):
    import shutil
    root, _ = default_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(root / "prepared", copy)
    val = xr.open_zarr(copy / "val.zarr", consolidated=False).load()
    val["t2m"][3, 2, 2] = np.nan
    for var in val.variables.values():
        var.encoding = {}
    val.to_zarr(copy / "val.zarr", mode="w", consolidated=False)
    with pytest.raises(StageError, match="t2m has NaN in 1 time steps") as e:
        schema.load_prepared(copy)
    assert e.value.path == str(copy / "val.zarr")
    lazy = schema.load_prepared(copy, validate=False)  # no check: opened lazily
    assert np.isnan(lazy["val"].t2m.values).sum() == 1
    with pytest.raises(StageError, match="not found"):
        schema.load_prepared(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------
# the real UK t2m sample

def test_with_and_without_dask_the_stores_are_identical(tmp_path):
    raw = tmp_path / "raw.zarr"
    small_raw(raw, grid=11.25)
    assert not prep.use_dask({}, 10**6) and prep.use_dask({"dask_above_mb": 0.5}, 10**6)
    cfg = small_cfg(grid_deg=22.5)
    outputs = {flag: prep.assemble(raw, dict(cfg, dask=flag))[0] for flag in (True, False)}
    for name, ds in outputs[True].items():
        xr.testing.assert_identical(ds, outputs[False][name])
    with pytest.raises(StageError, match="era5_prepare.dask: expected auto, true or false"):
        prep.assemble(raw, dict(cfg, dask="sometimes"))


def test_splits_out_of_order_or_on_different_grids_fail_validation(default_prepared):
    root, meta = default_prepared
    d = schema.load_prepared(root / "prepared")
    args = (meta["variables"], meta["levels"], meta["step_hours"])
    sources = {name: f"{name}.zarr" for name in schema.SPLITS}
    swapped = {"train": d["val"], "val": d["train"], "test": d["test"]}  # each split alone is valid
    with pytest.raises(StageError, match="time_h") as e:
        schema.validate_splits(swapped, *args, sources)
    assert e.value.path == "train.zarr"
    shifted = dict(d, test=d["test"].assign_coords(longitude=d["test"].longitude + 1.0))
    with pytest.raises(StageError, match="test split: longitude differs from the train split") as e:
        schema.validate_splits({k: shifted[k] for k in schema.SPLITS}, *args, sources)
    assert e.value.path == "test.zarr"


def test_samples_profile_on_the_uk_t2m_grib(tmp_path):
    grib = shared_file(UK_GRIB)
    cfg_era5 = {"source": "files", "variables": ["t2m"], "files": {"paths": [str(grib)]}}
    era5.download(cfg_era5, tmp_path / "raw.zarr")
    cfg = {"variables": ["t2m"], "levels": [], "grid_deg": 0.5, "split": {"val": 0.15, "test": 0.15},
           "max_lead_hours": 24}
    meta = prep.prepare(tmp_path / "raw.zarr", tmp_path / "prepared", cfg)
    assert (meta["grid"]["n_lat"], meta["grid"]["n_lon"]) == (16, 24)  # 33 x 49 at 0.25°, blocks of 2 x 2
    assert meta["step_hours"] == 1 and sum(s["n_times"] for s in meta["splits"].values()) == 744 - 48
    d = schema.load_prepared(tmp_path / "prepared")
    train = d["train"]
    assert "level" not in train.dims and schema.surface_vars(train) == ["t2m"]
    # the block of (58, 57.75) x (-10, -9.75) at longitude 350.125 (wrapped from -9.875)
    src = xr.open_dataset(grib, engine="cfgrib", backend_kwargs={"indexpath": ""}).t2m.values
    block = src[:, 0:2, 0:2].astype(float).mean(axis=(1, 2))
    got = train.t2m.sel(latitude=57.875, longitude=350.125).values
    np.testing.assert_allclose(got, block[:len(got)], rtol=1e-6)
    assert 260 < float(train.t2m.min()) and float(train.t2m.max()) < 295


MEMBERS_GRIB = "era5/cfgrib/era5-levels-members.grib"


def test_members_profile_on_the_eda_grib_keeps_members_and_pools_them(tmp_path):
    """The real ERA5 EDA sample: 10 members x 4 times (12-hourly) of z, t at 850/500 hPa on a 3° grid."""
    grib = shared_file(MEMBERS_GRIB)
    cfg_era5 = {"source": "files", "variables": ["z", "t"], "files": {"paths": [str(grib)], "ensemble_member": "all"}}
    era5.download(cfg_era5, tmp_path / "raw.zarr")
    cfg = {"variables": ["z", "t"], "levels": [500, 850], "grid_deg": 6.0, "max_lead_hours": 12, "embargo_hours": 0,
           "split": {"train": ["2017-01-01T00", "2017-01-01T12"], "val": ["2017-01-01T12", "2017-01-02T00"],
                     "test": ["2017-01-02T00", "2017-01-02T12"]}}
    meta = prep.prepare(tmp_path / "raw.zarr", tmp_path / "prepared", cfg)
    assert meta["members"] == 10 and meta["step_hours"] == 12 and meta["levels"] == [500, 850]
    assert (meta["grid"]["n_lat"], meta["grid"]["n_lon"]) == (30, 60)  # 61 x 120 in 2 x 2 blocks, trimmed
    d = schema.load_prepared(tmp_path / "prepared")
    assert d["train"].z.dims == ("member", "time", "level", "latitude", "longitude")
    assert [d[s].sizes["time"] for s in schema.SPLITS] == [2, 2, 2]
    # references straight from the GRIB, by loops: block means, then statistics pooled over members
    src = xr.open_dataset(grib, engine="cfgrib", backend_kwargs={"indexpath": ""}).sel(isobaricInhPa=[500, 850])
    z = src.z.values[:, :2].astype(float)                      # train: (member, time, level, 61, 120)
    blocks = np.empty(z.shape[:3] + (30, 60))
    for i in range(30):
        for j in range(60):
            blocks[..., i, j] = z[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(-2, -1))
    np.testing.assert_allclose(d["train"].z.values, blocks, rtol=1e-6)
    for lvl in range(2):
        x = blocks[:, :, lvl]
        assert d["stats"]["z"]["mean"][lvl] == pytest.approx(x.mean(), rel=1e-9)
        assert d["stats"]["z"]["std"][lvl] == pytest.approx(x.std(), rel=1e-6)
    # climatology: the member mean at 00 and 12 UTC of the training day, linear in between
    clim = d["climatology"].z.values
    np.testing.assert_allclose(clim[0], blocks[:, 0].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(clim[12], blocks[:, 1].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(clim[6], (clim[0] + clim[12]) / 2, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# bad input: StageError naming the raw store, nothing written

def _nan_field(ds):
    ds = ds.copy(deep=True)
    ds["t2m"][-5] = np.nan  # one whole field, in the test period
    return ds


def _celsius_labelled_kelvin(ds):
    ds = ds.copy(deep=True)
    ds["t2m"] = ds["t2m"] - 273.15  # attrs still say K
    ds["t2m"].attrs["units"] = "K"
    return ds


def _wrong_units(ds):
    ds = ds.copy()
    ds["t2m"].attrs["units"] = "furlongs"
    return ds


def _gap_in_time(ds):
    return ds.drop_isel(time=[30])


@pytest.mark.parametrize("mutate, cfg_over, message", [
    (_nan_field, {}, r"test split failed validation .*t2m has NaN in 1 time steps"),
    (_celsius_labelled_kelvin, {}, r"train split failed validation .*t2m spans .* outside \[170, 340\]"),
    (_wrong_units, {}, r"t2m: wrong units 'furlongs'"),
    (None, {"variables": ["z", "t", "q", "t2m"]}, r"missing variable\(s\) \['q'\]"),
    (None, {"levels": [850, 250]}, r"missing level\(s\) \[250\]"),
    (_gap_in_time, {}, r"train split failed validation .*dt_h"),
])
def test_bad_input_is_an_error_naming_the_raw_store_and_writes_nothing(tmp_path, mutate, cfg_over, message):
    raw = tmp_path / "raw.zarr"
    small_raw(raw, mutate=mutate)
    out = tmp_path / "prepared"
    with pytest.raises(StageError, match=message) as e:
        prep.prepare(raw, out, small_cfg(**cfg_over))
    assert e.value.path == str(raw)
    assert no_leftovers(out)


def test_a_failed_store_write_publishes_nothing_and_keeps_the_previous_output(tmp_path, monkeypatch):
    raw, out = tmp_path / "raw.zarr", tmp_path / "prepared"
    small_raw(raw)
    old_meta = prep.prepare(raw, out, small_cfg())
    before = sorted(p.name for p in out.iterdir())
    write = prep._to_zarr

    def disk_full_on_val(ds, path):
        if path.name == "val.zarr":
            raise OSError(28, "No space left on device")
        write(ds, path)

    monkeypatch.setattr(prep, "_to_zarr", disk_full_on_val)
    with pytest.raises(StageError, match="prepared: cannot write: No space left"):
        prep.prepare(raw, out, small_cfg(split={"val": 0.3, "test": 0.2}))
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "meta.json").read_text()) == old_meta  # not the 0.3 val split
    assert not list(tmp_path.glob(".prepared*"))


def test_stores_are_chunked_by_whole_fields_in_time_and_read_back_exactly(tmp_path, monkeypatch):
    raw, out = tmp_path / "raw.zarr", tmp_path / "prepared"
    small_raw(raw)
    splits, _ = prep.assemble(raw, small_cfg())
    field_bytes = 2 * 8 * 16 * 4  # z: 2 levels on the 8x16 grid, float32
    monkeypatch.setattr(prep, "CHUNK_BYTES", 5 * field_bytes + 3)  # 5 time steps of z, 10 of t2m
    prep.prepare(raw, out, small_cfg())
    store = xr.open_zarr(out / "train.zarr", consolidated=False)
    assert store["z"].encoding["chunks"] == (5, 2, 8, 16)
    assert store["t2m"].encoding["chunks"] == (10, 8, 16)
    assert [type(c).__name__ for c in store["z"].encoding["compressors"]] == ["BloscCodec"]
    clim = xr.open_zarr(out / "climatology.zarr", consolidated=False)
    assert clim["z"].encoding["chunks"] == (5, 2, 8, 16)  # hour plays the part of time
    d = schema.load_prepared(out)
    for name in schema.SPLITS:
        np.testing.assert_array_equal(d[name]["z"].values, splits[name]["z"].values)
        np.testing.assert_array_equal(d[name]["t2m"].values, splits[name]["t2m"].values)


def test_unreadable_raw_store_is_an_error(tmp_path):
    raw = tmp_path / "raw.zarr"
    raw.mkdir()
    (raw / "zarr.json").write_text("{ not json")
    with pytest.raises(StageError, match="not a readable Zarr store") as e:
        prep.prepare(raw, tmp_path / "prepared", small_cfg())
    assert e.value.path == str(raw) and no_leftovers(tmp_path / "prepared")
    with pytest.raises(StageError, match="not found"):
        prep.prepare(tmp_path / "absent.zarr", tmp_path / "prepared", small_cfg())


def test_cli_prints_one_line_error_and_exits_1(tmp_path):
    small_raw(tmp_path / "raw.zarr", variables=("z", "t", "t2m"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"era5_prepare": {"small": small_cfg()}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tasks.stages.era5_prepare", "--profile", "small", "raw.zarr", "out"],
                          cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: raw.zarr: missing variable(s) ['msl']"), proc.stderr
    assert not (tmp_path / "out").exists()
