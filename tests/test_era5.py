"""The ERA5 download stage: synthetic model, ARCO subset on a local store, CDS requests with a fake
client, local GRIB/netCDF files (the real samples in shared/data), and bad input → clear error, no output."""
import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tasks.kinds.forecast import schema
from tasks.platform.common import StageError
from tasks.stages import era5_download as era5, era5_synthetic
from conftest import SHARED, shared_file

UK_GRIB = "era5/xarray-data/era5-2mt-2019-03-uk.grib"
MEMBERS_GRIB = "era5/cfgrib/era5-levels-members.grib"
DEFAULT = {"source": "synthetic", "start": "2020-01-01T00:00", "n_days": 30, "step_hours": 1,
           "levels": [850, 500, 250], "variables": ["z", "t", "u", "v", "t2m", "msl", "u10", "v10"],
           "synthetic": {"grid_deg": 5.625, "seed": 0}}


def open_grib(path):
    return xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""})


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


# ---------------------------------------------------------------------------------------------------
# synthetic

@pytest.fixture(scope="module")
def synthetic():
    """The default profile: 30 days hourly on the 5.625° grid, 4 upper variables x 3 levels + 4 surface."""
    cfg = {**DEFAULT, "variables": DEFAULT["variables"] + ["q"]}
    return era5.load_source(cfg)


def test_synthetic_has_the_era5_schema(synthetic):
    ds = synthetic
    assert dict(ds.sizes) == {"time": 720, "level": 3, "latitude": 32, "longitude": 64}
    assert ds.attrs["source"] == "synthetic"
    for v in ("z", "t", "u", "v", "q"):
        assert ds[v].dims == ("time", "level", "latitude", "longitude")
    for v in ("t2m", "msl", "u10", "v10"):
        assert ds[v].dims == ("time", "latitude", "longitude")
    for v in ds.data_vars:
        assert ds[v].dtype == np.float32
        assert ds[v].attrs["units"] == schema.VARIABLES[v].units and ds[v].attrs["long_name"]
    lat, lon = ds.latitude.values, ds.longitude.values
    np.testing.assert_allclose(lat, 90 - 5.625 / 2 - 5.625 * np.arange(32))  # cell centres, descending
    np.testing.assert_allclose(lon, 5.625 * np.arange(64))
    assert ds.level.values.tolist() == [850, 500, 250]
    steps = np.diff(ds.time.values) / np.timedelta64(1, "h")
    assert (steps == 1).all() and str(ds.time.values[0])[:13] == "2020-01-01T00"


def test_synthetic_values_lie_in_physical_ranges(synthetic):
    ds = synthetic
    ranges = {("z", 500): (4.5e4, 6.0e4), ("z", 850): (1.1e4, 1.65e4), ("t", 850): (235, 305),
              ("u", None): (-60, 60), ("v", None): (-60, 60), ("q", None): (0, 0.02),
              ("t2m", None): (220, 310), ("msl", None): (9.6e4, 1.05e5),
              ("u10", None): (-40, 40), ("v10", None): (-40, 40)}
    for (v, lv), (lo, hi) in ranges.items():
        x = (ds[v].sel(level=lv) if lv else ds[v]).values
        assert np.isfinite(x).all()
        assert lo <= x.min() and x.max() <= hi, (v, lv, x.min(), x.max())
    # temperature falls and geopotential rises with height; the equator is warmer than the poles
    t_zonal = ds.t.mean(("time", "longitude"))
    assert (t_zonal.sel(level=850) > t_zonal.sel(level=250)).all()
    assert (ds.z.sel(level=250).min() > ds.z.sel(level=500).max())
    assert t_zonal.sel(level=850).values[16] > t_zonal.sel(level=850).values[0] + 30


def test_synthetic_t2m_has_a_diurnal_cycle_in_local_solar_time(synthetic):
    ds = synthetic
    t2m = ds.t2m.values.astype(float)
    anomaly = t2m - t2m.mean(axis=0)  # remove each point's 30-day mean
    lst = (ds.time.dt.hour.values[:, None] + ds.longitude.values[None, :] / 15) % 24
    tropics = np.abs(ds.latitude.values) < 30
    mean_anomaly = anomaly[:, tropics, :].mean(axis=1)  # (time, lon)
    r = np.corrcoef(mean_anomaly.ravel(), np.cos(2 * np.pi * (lst - 15) / 24).ravel())[0, 1]
    assert r > 0.8
    # and not in UTC alone: at one UTC hour, the warm side of the globe is where it is afternoon
    afternoon = (lst[12] > 12) & (lst[12] < 18)
    assert mean_anomaly[12, afternoon].mean() > mean_anomaly[12, ~afternoon].mean() + 1.0


def test_synthetic_is_deterministic_for_a_seed():
    cfg = {**DEFAULT, "n_days": 2, "variables": ["z", "t2m"], "levels": [500],
           "synthetic": {"grid_deg": 11.25, "seed": 3}}
    a, b = era5.load_source(cfg), era5.load_source(cfg)
    xr.testing.assert_identical(a, b)
    c = era5.load_source({**cfg, "synthetic": {"grid_deg": 11.25, "seed": 4}})
    assert not np.allclose(a.z.values, c.z.values)


def test_advect_matches_a_whole_cell_roll():
    """Independent reference: a wind that moves one grid cell in the time given is np.roll by one."""
    lat, lon = era5_synthetic.grid(5.625)
    rng = np.random.default_rng(0)
    field = rng.standard_normal((len(lat), len(lon)))
    cell = np.radians(5.625) * era5_synthetic.EARTH_RADIUS * np.cos(np.radians(lat))  # metres per cell
    hours = 6.0
    u = cell / (hours * 3600)
    np.testing.assert_allclose(era5_synthetic.advect(field, lat, u, hours), np.roll(field, 1, axis=-1),
                               atol=1e-10)
    np.testing.assert_allclose(era5_synthetic.advect(field, lat, -2 * u, hours), np.roll(field, -2, axis=-1),
                               atol=1e-10)


def test_synthetic_dynamics_are_learnable(synthetic):
    """Advecting today's z500 anomaly with the model's wind beats persistence a day ahead."""
    ds = synthetic
    lat = ds.latitude.values
    anomaly = ds.z.sel(level=500).values.astype(float) - era5_synthetic.geopotential(lat, 500)[None, :, None]
    lead = 24
    persistence = np.sqrt(((anomaly[lead:] - anomaly[:-lead]) ** 2).mean())
    advected = era5_synthetic.advect(anomaly[:-lead], lat, era5_synthetic.zonal_wind(lat, 500), lead)
    advection = np.sqrt(((anomaly[lead:] - advected) ** 2).mean())
    assert advection < 0.8 * persistence


def test_download_writes_the_store_atomically(tmp_path):
    cfg = {**DEFAULT, "n_days": 1, "variables": ["t", "t2m"], "levels": [850],
           "synthetic": {"grid_deg": 11.25, "seed": 0}}
    out = tmp_path / "era5" / "raw.zarr"
    ds = era5.download(cfg, out)
    back = xr.open_zarr(out, consolidated=False).load()
    assert back.attrs["source"] == "synthetic"
    xr.testing.assert_equal(back[["t", "t2m"]], ds[["t", "t2m"]])
    assert not list(out.parent.glob(".raw.zarr*"))


def test_bad_params_are_stage_errors(tmp_path):
    with pytest.raises(StageError, match="source must be"):
        era5.load_source({**DEFAULT, "source": "ftp"})
    with pytest.raises(StageError, match="unknown variables"):
        era5.load_source({**DEFAULT, "variables": ["t2m", "tp"]})
    with pytest.raises(StageError, match="divide"):
        era5.load_source({**DEFAULT, "synthetic": {"grid_deg": 7.0}})


# ---------------------------------------------------------------------------------------------------
# ARCO-ERA5 (a local store with the ARCO schema)

ARCO_LONG = {"z": "geopotential", "t": "temperature", "t2m": "2m_temperature",
             "msl": "mean_sea_level_pressure"}


@pytest.fixture(scope="module")
def arco_store(tmp_path_factory):
    """ARCO layout at 10°: long names, level ascending, latitude 90..-90, longitude 0..350, one time
    per chunk."""
    times = pd.date_range("2020-01-01", periods=48, freq="h")
    levels = [250, 500, 850, 1000]
    lat, lon = np.linspace(90, -90, 19), np.arange(36) * 10.0
    rng = np.random.default_rng(1)
    data = {}
    for short, long in ARCO_LONG.items():
        upper = schema.VARIABLES[short].upper
        dims = ("time", "level", "latitude", "longitude") if upper else ("time", "latitude", "longitude")
        shape = (48, 4, 19, 36) if upper else (48, 19, 36)
        lo, hi = schema.BOUNDS[short]  # random, but within the bounds the download stage checks
        values = (lo + (hi - lo) * (0.25 + 0.5 * rng.random(shape))).astype(np.float32)
        data[long] = (dims, values, {"units": schema.VARIABLES[short].units})
    ds = xr.Dataset(data, {"time": times, "level": levels, "latitude": lat, "longitude": lon})
    path = tmp_path_factory.mktemp("arco") / "arco.zarr"
    ds.chunk({"time": 1}).to_zarr(path, mode="w", consolidated=True)
    return path, ds


@pytest.fixture
def chunk_reads(monkeypatch):
    """Paths of the data-variable chunks read through fsspec's local filesystem (the coordinate
    arrays are read at open time, as they must be)."""
    from fsspec.implementations.local import LocalFileSystem
    reads: list[str] = []
    original = LocalFileSystem.cat_file
    coords = ("time", "level", "latitude", "longitude")

    def cat_file(self, path, *args, **kwargs):
        if "/c/" in str(path) and str(path).split(".zarr/")[1].split("/")[0] not in coords:
            reads.append(str(path))
        return original(self, path, *args, **kwargs)
    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    return reads


def arco_cfg(path, **over):
    cfg = {"source": "arco", "start": "2020-01-01T06:00", "end": "2020-01-01T11:00", "step_hours": 1,
           "levels": [500, 850], "variables": ["z", "t2m"],
           "arco": {"url": f"file://{path}", "area": [60, -20, 30, 40], "chunks": {"time": 4}}}
    cfg.update(over)
    return cfg


def test_arco_subset_is_lazy_and_reads_only_the_subset(arco_store, chunk_reads, tmp_path):
    path, full = arco_store
    ds = era5.open_arco(arco_cfg(path))
    assert chunk_reads == []  # nothing but metadata read so far
    assert all(ds[v].chunks is not None for v in ds.data_vars)  # Dask-backed
    assert set(ds.data_vars) == {"geopotential", "2m_temperature"}
    assert dict(ds.sizes) == {"time": 6, "level": 2, "latitude": 4, "longitude": 7}
    assert ds.longitude.values.tolist() == [-20, -10, 0, 10, 20, 30, 40]  # contiguous across 0° E
    # 2 kB of the 530 kB in the store
    assert sum(ds[v].nbytes for v in ds.data_vars) == (6 * 2 * 4 * 7 + 6 * 4 * 7) * 4

    out = tmp_path / "raw.zarr"
    era5.download(arco_cfg(path), out)
    # only time chunks 6..11 of the two requested variables were read
    read_vars = {p.split("/arco.zarr/")[1].split("/")[0] for p in chunk_reads}
    read_times = {int(p.split("/c/")[1].split("/")[0]) for p in chunk_reads}
    assert read_vars == {"geopotential", "2m_temperature"}
    assert read_times == set(range(6, 12))

    raw = xr.open_zarr(out, consolidated=False).load()
    assert raw.attrs["source"] == "arco"
    lon_idx = [34, 35, 0, 1, 2, 3, 4]  # 340, 350, 0 .. 40
    expected = full["geopotential"].values[6:12][:, [1, 2]][:, :, 3:7][..., lon_idx]
    got = raw["geopotential"].transpose("time", "level", "latitude", "longitude").values
    np.testing.assert_array_equal(got, expected)
    expected_t2m = full["2m_temperature"].values[6:12, 3:7][..., lon_idx]
    np.testing.assert_array_equal(raw["2m_temperature"].values, expected_t2m)


def test_arco_time_stride_and_global_area(arco_store):
    path, _ = arco_store
    ds = era5.open_arco(arco_cfg(path, step_hours=6, start="2020-01-01", end="2020-01-02T23:00",
                                 arco={"url": f"file://{path}", "area": None}))
    assert ds.time.dt.hour.values.tolist() == [0, 6, 12, 18] * 2
    assert dict(ds.sizes)["longitude"] == 36 and dict(ds.sizes)["latitude"] == 19


def test_arco_missing_variable_or_level_names_the_store(arco_store, tmp_path):
    path, _ = arco_store
    with pytest.raises(StageError, match="missing requested variables") as e:
        era5.download(arco_cfg(path, variables=["z", "q"]), tmp_path / "raw.zarr")
    assert str(path) in e.value.path
    with pytest.raises(StageError, match="missing requested levels"):
        era5.open_arco(arco_cfg(path, levels=[500, 700]))
    with pytest.raises(StageError, match="cannot open"):
        era5.open_arco(arco_cfg(tmp_path / "nothing.zarr"))
    assert no_leftovers(tmp_path / "raw.zarr")


# ---------------------------------------------------------------------------------------------------
# CDS (a fake client that writes what the CDS returns)

SECRET = "123456:abcdef01-2345-6789-abcd-ef0123456789"
CDS_SHORT = {"geopotential": ("z", "m**2 s**-2"), "temperature": ("t", "K"), "2m_temperature": ("t2m", "K"),
             "mean_sea_level_pressure": ("msl", "Pa")}


class FakeCDS:
    """Records the requests; writes a small netCDF in the CDS layout: `valid_time`/`pressure_level`
    (the 2024 CDS) or `time`/`level` (the legacy CDS, as in the WAM2layers files)."""

    def __init__(self, style="new"):
        self.style, self.requests = style, []

    def retrieve(self, name, request, target):
        self.requests.append((name, copy.deepcopy(request)))
        times = [pd.Timestamp(f"{y}-{m}-{d}T{t}") for y in request["year"] for m in request["month"]
                 for d in request["day"] for t in request["time"] if _valid_date(y, m, d)]
        north, west, south, east = request["area"]
        lat, lon = np.arange(north, south - 1, -1.0), np.arange(west, east + 1, 1.0)
        tname, lname = ("valid_time", "pressure_level") if self.style == "new" else ("time", "level")
        coords = {tname: times, "latitude": lat, "longitude": lon}
        data = {}
        for long in request["variable"]:
            short, units = CDS_SHORT[long]
            if "pressure_level" in request:
                coords[lname] = [int(p) for p in request["pressure_level"]]
                shape = (len(times), len(coords[lname]), len(lat), len(lon))
                dims = (tname, lname, "latitude", "longitude")
            else:
                shape, dims = (len(times), len(lat), len(lon)), (tname, "latitude", "longitude")
            value = np.mean(schema.BOUNDS[short])  # physically plausible: download checks the ranges
            data[short] = (dims, np.full(shape, value, np.float32), {"units": units, "long_name": long})
        ds = xr.Dataset(data, coords)
        if self.style == "new":
            ds = ds.assign_coords(number=0, expver=(tname, ["0001"] * len(times)))
        ds.to_netcdf(target, engine="netcdf4")


def _valid_date(y, m, d):
    try:
        pd.Timestamp(f"{y}-{m}-{d}")
        return True
    except ValueError:
        return False


def cds_cfg(**over):
    cfg = {"source": "cds", "start": "2020-01-31T00:00", "end": "2020-02-01T18:00", "step_hours": 6,
           "levels": [850, 500], "variables": ["z", "t", "t2m", "msl"],
           "cds": {"area": [60, -10, 50, 2], "data_format": "netcdf"}}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("style", ["new", "old"])
def test_cds_requests_and_merged_download(style, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("CDSAPI_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    client = FakeCDS(style)
    out = tmp_path / "raw.zarr"
    ds = era5.download(cds_cfg(), out, client_factory=lambda: client)

    names = [name for name, _ in client.requests]
    assert names == ["reanalysis-era5-pressure-levels", "reanalysis-era5-single-levels"]
    pl, sl = client.requests[0][1], client.requests[1][1]
    common = {"product_type": ["reanalysis"], "year": ["2020"], "month": ["01", "02"], "day": ["01", "31"],
              "time": ["00:00", "06:00", "12:00", "18:00"], "area": [60.0, -10.0, 50.0, 2.0],
              "data_format": "netcdf", "download_format": "unarchived"}
    assert pl == {**common, "variable": ["geopotential", "temperature"], "pressure_level": ["850", "500"]}
    assert sl == {**common, "variable": ["2m_temperature", "mean_sea_level_pressure"]}

    # the product year x month x day asked for 01-01 and 02-31 too: trimmed to the range
    tname = "valid_time" if style == "new" else "time"
    assert ds.sizes[tname] == 8 and str(ds[tname].values[0])[:10] == "2020-01-31"
    raw = xr.open_zarr(out, consolidated=False)
    assert raw.attrs["source"] == "cds" and set(raw.data_vars) == {"z", "t", "t2m", "msl"}

    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert SECRET.encode() not in stored and SECRET.split(":")[1].encode() not in stored
    printed = capsys.readouterr()
    assert SECRET not in caplog.text + printed.out + printed.err


def test_cds_errors_do_not_leak_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CDSAPI_KEY", SECRET)

    def no_client():
        raise Exception(f"Missing/incomplete configuration file: key {SECRET}")
    with pytest.raises(StageError) as e:
        era5.download(cds_cfg(), tmp_path / "raw.zarr", client_factory=no_client)
    assert SECRET not in str(e.value) and SECRET.split(":")[1] not in str(e.value)

    class Failing:
        def retrieve(self, name, request, target):
            raise RuntimeError(f"401 Unauthorized for key {SECRET}")
    with pytest.raises(StageError, match="CDS request failed") as e:
        era5.download(cds_cfg(), tmp_path / "raw.zarr", client_factory=Failing)
    assert e.value.path == "reanalysis-era5-pressure-levels"
    assert SECRET.split(":")[1] not in str(e.value)
    assert no_leftovers(tmp_path / "raw.zarr")


def test_cds_request_without_upper_air_variables_is_single_levels_only():
    reqs = era5.cds_requests(cds_cfg(variables=["t2m"], levels=[], cds={"data_format": "grib"}))
    assert list(reqs) == ["reanalysis-era5-single-levels"]
    assert reqs["reanalysis-era5-single-levels"]["data_format"] == "grib" and "area" not in reqs[
        "reanalysis-era5-single-levels"]


# ---------------------------------------------------------------------------------------------------
# local files: the real samples

def files_cfg(*paths, **over):
    cfg = {"source": "files", "variables": None, "files": {"paths": [str(p) for p in paths]}}
    cfg.update(over)
    return cfg


def test_files_reads_the_uk_t2m_grib(tmp_path):
    grib = shared_file(UK_GRIB)
    out = tmp_path / "raw.zarr"
    era5.download(files_cfg(grib, variables=["t2m"]), out)
    raw = xr.open_zarr(out, consolidated=False)
    assert raw.attrs["source"] == "files"
    assert raw.t2m.shape == (744, 33, 49)
    ref = open_grib(grib).t2m.values
    np.testing.assert_array_equal(raw.t2m.values, ref)
    assert not list(grib.parent.glob("*.idx"))  # cfgrib wrote no index beside the sample


@pytest.mark.parametrize("member", [0, 7, "mean"])
def test_files_selects_an_ensemble_member_or_the_mean(member):
    grib = shared_file(MEMBERS_GRIB)
    ds = era5.open_files(files_cfg(grib, files={"paths": [str(grib)], "ensemble_member": member}))
    assert "number" not in ds.dims and set(ds.data_vars) == {"z", "t"}
    ref = open_grib(grib)
    ref = ref.mean("number") if member == "mean" else ref.sel(number=member)
    np.testing.assert_allclose(ds.z.values, ref.z.values, rtol=1e-6)
    assert ds.z.dims == ("time", "isobaricInhPa", "latitude", "longitude")


def test_files_keeps_all_members_as_a_member_dim_or_rejects_a_bad_choice():
    grib = shared_file(MEMBERS_GRIB)
    ds = era5.open_files(files_cfg(grib, files={"paths": [str(grib)], "ensemble_member": "all"}))
    assert ds.z.dims == ("member", "time", "isobaricInhPa", "latitude", "longitude")
    np.testing.assert_array_equal(ds.z.values, open_grib(grib).z.values)
    with pytest.raises(StageError, match="ensemble_member: expected a member number, mean or all, got 'some'"):
        era5.open_files(files_cfg(grib, files={"paths": [str(grib)], "ensemble_member": "some"}))
    with pytest.raises(StageError, match="has no ensemble member 12"):
        era5.open_files(files_cfg(grib, files={"paths": [str(grib)], "ensemble_member": 12}))


def test_files_merges_the_wam2layers_netcdf_files():
    shared_file("era5/wam2layers/ERA5_2020-01-01_pl_u.nc")
    pattern = SHARED / "era5" / "wam2layers" / "ERA5_2020-01-01_*.nc"
    ds = era5.open_files(files_cfg(pattern, variables=["u", "v", "q", "sp", "u10", "v10"]))
    assert set(ds.data_vars) == {"u", "v", "q", "sp", "u10", "v10"}  # d2m, tp, tcw, e left out
    assert dict(ds.sizes) == {"time": 24, "level": 20, "latitude": 41, "longitude": 41}


def test_truncated_grib_is_an_error_naming_the_file(tmp_path):
    grib = shared_file(UK_GRIB)
    bad = tmp_path / "truncated.grib"
    bad.write_bytes(grib.read_bytes()[:1_000_000])  # cfgrib alone would silently return 297 of 744 steps
    out = tmp_path / "raw.zarr"
    with pytest.raises(StageError, match="truncated or corrupt GRIB") as e:
        era5.download(files_cfg(bad), out)
    assert e.value.path == str(bad)
    assert no_leftovers(out)


def test_unreadable_missing_and_unmatched_files_are_errors(tmp_path):
    text = tmp_path / "notes.nc"
    text.write_text("not a netCDF file\n")
    with pytest.raises(StageError, match="not a GRIB or netCDF") as e:
        era5.open_files(files_cfg(text))
    assert e.value.path == str(text)
    broken = tmp_path / "broken.nc"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(StageError, match="unreadable netcdf") as e:
        era5.open_files(files_cfg(broken))
    assert e.value.path == str(broken)
    with pytest.raises(StageError, match="no file matches"):
        era5.open_files(files_cfg(tmp_path / "*.grib"))


def test_missing_requested_variable_names_the_file(tmp_path):
    grib = shared_file(UK_GRIB)
    out = tmp_path / "raw.zarr"
    with pytest.raises(StageError, match=r"missing requested variables \['msl'\]") as e:
        era5.download(files_cfg(grib, variables=["t2m", "msl"]), out)
    assert str(grib) in e.value.path
    assert no_leftovers(out)
