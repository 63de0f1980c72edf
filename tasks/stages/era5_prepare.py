"""DVC stage `era5_prepare`: raw ERA5 store → harmonised, regridded, split, validated training data.

    python -m tasks.stages.era5_prepare [--profile NAME] [RAW] [OUT_DIR]
        # defaults data/era5/raw.zarr data/era5/prepared; params: params.yaml › era5_prepare [› NAME]

Steps, in order:
1. Harmonise to ERA5 short names (z t u v q t2m msl sp u10 v10; ARCO long names, `2t`, `10u`, `gh`...
   are mapped), dims (time, level, latitude, longitude) (`valid_time`, `pressure_level`,
   `isobaricInhPa`, `lat`, `lon` are mapped) and SI units (gpm → m² s⁻² ×9.80665, °C → K, g/kg → kg/kg,
   hPa → Pa). Units this module does not know are an error ("wrong units"), never a guess.
2. Select the variables and levels (levels keep the order given in params).
3. Regrid to `grid_deg`: when it is an integer multiple k of the source spacing, block-average k × k
   cells (xarray coarsen, boundary "trim": rows/columns that do not fill a block are dropped, e.g. the
   south pole row of a 721-row grid; coordinates become block centres); otherwise linear interpolation
   (xarray interp) onto a grid that starts at the source's first latitude and longitude and stays inside
   the source domain (no extrapolation, no wrap-around). Averaging happens in the source's contiguous
   longitude order, then longitudes are wrapped into [0, 360) and sorted ascending (a regional box that
   crosses 0° E therefore becomes two increasing runs, e.g. 0..2 then 350..359.75), latitudes descending.
4. Split by time, chronologically, train → val → test, either by fractions of the time steps or by
   explicit inclusive date ranges. By default consecutive splits are more than `max_lead_hours` apart
   (the fraction split drops floor(max_lead_hours / step) steps in between; explicit ranges that do
   not satisfy it are an error), so no time of one split is within a lead of another. `embargo_hours`
   sets a shorter least distance, down to 0 (a shared boundary step) for data too short to spare a
   gap; no forecast target lies in two splits either way. Ensemble members (a `member` dim) are kept:
   every member is split at the same times.
5. Statistics and climatology from the training split only. Normalisation statistics: mean and
   population std (ddof 0) per variable and level over ([member,] time, latitude, longitude), NOT
   latitude-weighted (the normaliser only needs one consistent scale per channel; skill scores apply
   the latitude weights). Climatology: mean per hour of day (UTC), over members too, of every
   variable/level/grid point; always 24 hours 0..23, and when the data are sub-daily (e.g. 6-hourly)
   the missing hours are filled by periodic linear interpolation between the hours present.
6. Validate the splits with Great Expectations, all in one run per suite (physical range per variable,
   no NaN/inf, latitude strictly decreasing, longitude strictly increasing in [0, 360), time strictly
   increasing with a regular step within a split and not decreasing across splits), and write OUT_DIR
   atomically: the stores go into a temporary directory while validation runs, and it replaces OUT_DIR
   only when everything passed. OUT_DIR holds train.zarr, val.zarr, test.zarr (float32; upper
   variables ([member,] time, level, latitude, longitude), surface ([member,] time, latitude,
   longitude)), climatology.zarr (hour, [level,] latitude, longitude), stats.json, meta.json. Chunks
   are whole fields along time (≤ 64 MiB), compressed with Blosc LZ4 + byte shuffle.

The params this module expects (`params.yaml`)::

    era5_prepare:
      variables: [z, t, u, v, t2m, msl, u10, v10]   # ERA5 short names; null = every one the raw data has
      levels: [850, 500, 250]          # hPa, in this order; [] when there are no upper-air variables
      grid_deg: 11.25                  # target spacing in degrees; null keeps the source grid
      split: {val: 0.15, test: 0.15}   # fractions of the time steps, or explicit inclusive ranges:
                                       # {train: [2020-01-01, 2020-01-20T23], val: [...], test: [...]}
      max_lead_hours: 24               # the longest forecast lead trained or scored (default 24)
      embargo_hours: null              # least time from the end of a split to the start of the next
                                       # (default max_lead_hours + one step; see split_indices)
      dask: auto                       # auto: Dask only for selections over dask_above_mb (default 2048)

The prepared layout and its suites are the forecast kind's contract (tasks/kinds/forecast/schema.py):
`load_prepared(data_dir)` there is what training reads, re-validated with the same suites.
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ..kinds.forecast.schema import (DIMS_SURFACE, DIMS_UPPER, MEMBER, SPLITS, VARIABLES, open_store,
                                     surface_vars, upper_vars, validate_splits)
from ..platform.common import StageError, atomic_dir, cli_main, write_json
from ..platform.params import naming_profile, pop_profile, stage_params
from .era5_harmonise import harmonise

RAW = "data/era5/raw.zarr"
OUT_DIR = "data/era5/prepared"


# ---------------------------------------------------------------------------------------------------
# 1. harmonise

def open_raw(path: str | Path, dask: bool = True) -> xr.Dataset:
    """Lazily: Dask arrays in the store's chunks, or (dask=False) arrays read whole on first use."""
    return open_store(path, dask=dask, hint="run `dvc repro era5_download`")


def select(ds: xr.Dataset, variables: list[str] | None, levels: list[float] | None, where: str) -> xr.Dataset:
    """The requested variables (canonical order) and levels (params order); StageError when absent."""
    variables = list(variables) if variables else [v for v in VARIABLES if v in ds.data_vars]
    unknown = [v for v in variables if v not in VARIABLES]
    if unknown:
        raise StageError("params.yaml",
                         f"era5_prepare.variables: unknown {unknown} (known: {list(VARIABLES)})")
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise StageError(where, f"missing variable(s) {missing} (has {list(ds.data_vars)})")
    ds = ds[[v for v in VARIABLES if v in variables]]
    for v in ds.data_vars:
        expected = DIMS_UPPER if VARIABLES[v].upper else DIMS_SURFACE
        if set(ds[v].dims) - {MEMBER} != set(expected):
            raise StageError(where, f"{v} has dims {ds[v].dims}, expected [{MEMBER},] {expected}")
    if "level" in ds.dims:
        if not levels:
            raise StageError("params.yaml", "era5_prepare.levels: upper-air variables need levels")
        have = ds["level"].values.tolist()
        absent = [lv for lv in levels if lv not in have]
        if absent:
            raise StageError(where, f"missing level(s) {absent} (has {have})")
        if have != list(levels):  # sel copies every upper-air variable, even when nothing changes
            ds = ds.sel(level=list(levels))
    elif levels:
        raise StageError("params.yaml", f"era5_prepare.levels: {list(levels)} requested, but {where} has "
                                        f"no upper-air variables; set levels: []")
    elif "level" in ds.coords:
        ds = ds.drop_vars("level")
    return ds.transpose(*[d for d in (MEMBER, *DIMS_UPPER) if d in ds.dims])


# ---------------------------------------------------------------------------------------------------
# 2. grid

def _regular_step(values: np.ndarray) -> float | None:
    """|spacing| of a regular, monotonic axis, else None."""
    if len(values) < 2:
        return None
    d = np.diff(values.astype(float))
    if not (np.all(d > 0) or np.all(d < 0)) or not np.allclose(d, d[0], rtol=1e-6, atol=1e-9):
        return None
    return abs(float(d[0]))


def sort_by(ds: xr.Dataset, dim: str, ascending: bool = True) -> xr.Dataset:
    """ds.sortby(dim), but free when already sorted: sortby copies every variable even then (1 s for
    380 MB), and ERA5 data nearly always arrives sorted."""
    d = np.diff(ds[dim].values.astype(float))
    return ds if np.all(d > 0 if ascending else d < 0) else ds.sortby(dim, ascending=ascending)


def contiguous_longitude(ds: xr.Dataset) -> xr.Dataset:
    """Longitudes as one increasing run: as given, else in [0, 360), else in [-180, 180)."""
    lon = ds["longitude"].values.astype(float)
    if len(lon) < 2 or np.all(np.diff(lon) > 0):
        return ds
    for wrapped in (lon % 360, (lon + 180) % 360 - 180):
        if _regular_step(np.sort(wrapped)) is not None:
            return sort_by(ds.assign_coords(longitude=wrapped), "longitude")
    return sort_by(ds.assign_coords(longitude=lon % 360), "longitude")


def block_mean(x: Any, axis: tuple[int, ...]) -> Any:
    """np.mean over the block axes of coarsen's (..., lat, k_lat, lon, k_lon) view, as a sum of the
    k_lat·k_lon strided slices: one pass over memory, 5x faster than np.mean over two strided axes on
    a 100 MB array (benchmarks/era5_prepare.py). NaN propagates, so it reaches validation. Works on
    NumPy and Dask arrays alike."""
    axis = tuple(a % x.ndim for a in axis)
    total = None
    for offsets in itertools.product(*(range(x.shape[a]) for a in axis)):
        index = [slice(None)] * x.ndim
        for a, i in zip(axis, offsets):
            index[a] = i
        part = x[tuple(index)]
        total = part if total is None else total + part
    return total / math.prod(x.shape[a] for a in axis)


def regrid(ds: xr.Dataset, grid_deg: float | None) -> tuple[xr.Dataset, str]:
    """Block mean when `grid_deg` is an integer multiple of the source spacing, else linear interpolation.
    Returns the dataset and a description for meta.json."""
    ds = contiguous_longitude(sort_by(ds, "latitude", ascending=False))
    if grid_deg is None:
        return ds, "native"
    steps = [_regular_step(ds[c].values) for c in ("latitude", "longitude")]
    factors = [grid_deg / s if s else None for s in steps]
    if all(f is not None and abs(f - round(f)) < 1e-6 and round(f) >= 1 for f in factors):
        k_lat, k_lon = (int(round(f)) for f in factors)
        if (k_lat, k_lon) == (1, 1):
            return ds, "native"
        coarse = ds.coarsen(latitude=k_lat, longitude=k_lon, boundary="trim").reduce(block_mean)
        return coarse.assign_attrs(ds.attrs), f"block mean {k_lat}x{k_lon}"
    lat, lon = ds["latitude"].values, ds["longitude"].values
    new_lat = lat[0] - grid_deg * np.arange(int(math.floor((lat[0] - lat[-1]) / grid_deg + 1e-6)) + 1)
    new_lon = lon[0] + grid_deg * np.arange(int(math.floor((lon[-1] - lon[0]) / grid_deg + 1e-6)) + 1)
    out = ds.interp(latitude=new_lat, longitude=new_lon, method="linear")
    return out.assign_attrs(ds.attrs), "linear interpolation"


def wrap_and_sort(ds: xr.Dataset) -> xr.Dataset:
    """ERA5 order: longitude ascending in [0, 360), latitude descending."""
    lon = (ds["longitude"].values.astype(float) % 360 + 360) % 360
    return sort_by(sort_by(ds.assign_coords(longitude=lon), "longitude"), "latitude", ascending=False)


# ---------------------------------------------------------------------------------------------------
# 3. splits

def step_hours_of(times: np.ndarray, where: str) -> int:
    if len(times) < 2:
        raise StageError(where, "needs at least two time steps")
    step = (times[1] - times[0]) / np.timedelta64(1, "h")
    if step <= 0 or step != int(step):
        raise StageError(where, f"time step {step} h is not a positive whole number of hours")
    return int(step)


def split_indices(times: np.ndarray, split: dict[str, Any], max_lead_hours: float, step_hours: int,
                  embargo_hours: float | None = None) -> dict[str, np.ndarray]:
    """Index arrays per split, chronological, each starting at least `embargo_hours` after the previous
    one ends. The default, max_lead_hours + one step, keeps every time of a split more than the longest
    lead away from the other splits. The smallest allowed, 0, lets a split start on the step where the
    previous one ends: that step is a target of the earlier split and an input of the later one, never
    a target of both (for data too short to spare a gap, like the 4-step EDA sample)."""
    embargo = max_lead_hours + step_hours if embargo_hours is None else float(embargo_hours)
    if embargo < 0:
        raise StageError("params.yaml", f"era5_prepare.embargo_hours must be >= 0, got {embargo:g}")
    if all(k in split for k in SPLITS):
        idx = _explicit_split(times, split)
    else:
        idx = _fraction_split(len(times), float(split.get("val", 0.15)), float(split.get("test", 0.15)),
                              max(math.ceil(embargo / step_hours) - 1, 0))
    for earlier, later in zip(SPLITS, SPLITS[1:]):
        gap = (times[idx[later][0]] - times[idx[earlier][-1]]) / np.timedelta64(1, "h")
        if gap < embargo:
            need = (f"more than max_lead_hours={max_lead_hours:g} h" if embargo_hours is None
                    else f"at least embargo_hours={embargo:g} h")
            raise StageError("params.yaml", f"era5_prepare.split: {later} starts {gap:g} h after {earlier} "
                                            f"ends; need {need}")
    return idx


def _fraction_split(n: int, val: float, test: float, gap_steps: int) -> dict[str, np.ndarray]:
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise StageError("params.yaml",
                         f"era5_prepare.split: need 0 < val, test and val + test < 1, got {val}, {test}")
    usable = n - 2 * gap_steps
    n_val, n_test = round(usable * val), round(usable * test)
    n_train = usable - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise StageError("params.yaml", f"era5_prepare.split: {n} time steps are too few for the split "
                                        f"with {gap_steps} steps between splits")
    val_start = n_train + gap_steps
    test_start = val_start + n_val + gap_steps
    return {"train": np.arange(0, n_train), "val": np.arange(val_start, val_start + n_val),
            "test": np.arange(test_start, test_start + n_test)}


def _explicit_split(times: np.ndarray, split: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for name in SPLITS:
        start, end = (np.datetime64(pd.Timestamp(t)) for t in split[name])
        idx = np.flatnonzero((times >= start) & (times <= end))
        if len(idx) == 0:
            raise StageError("params.yaml", f"era5_prepare.split.{name}: no data between {start} and {end}")
        out[name] = idx
    return out


# ---------------------------------------------------------------------------------------------------
# 4. statistics and climatology (training split only)

def compute_stats(train: xr.Dataset) -> dict[str, dict[str, Any]]:
    """{var: {"mean": [per level] | float, "std": ...}} over [member,] time, latitude, longitude
    (unweighted)."""
    stats = {}
    for v in train.data_vars:
        x = train[v].values  # float32, accumulated in float64 without a float64 copy
        if "level" in train[v].dims:
            axes = tuple(i for i, d in enumerate(train[v].dims) if d != "level")
            stats[v] = {"mean": x.mean(axis=axes, dtype=np.float64).tolist(),
                        "std": x.std(axis=axes, dtype=np.float64).tolist()}
        else:
            stats[v] = {"mean": float(x.mean(dtype=np.float64)), "std": float(x.std(dtype=np.float64))}
    return stats


def compute_climatology(train: xr.Dataset) -> xr.Dataset:
    """Mean per hour of day 0..23 (and over ensemble members); hours the data lack are interpolated
    periodically."""
    hour_of_time = pd.DatetimeIndex(train["time"].values).hour
    hours = np.unique(hour_of_time)
    clim = {}
    for v in train.data_vars:
        # (time, [member,] ...): every member has the same times, so the mean over (time, member)
        # weights all samples equally
        da = train[v].transpose("time", *[d for d in train[v].dims if d != "time"])
        x = da.values
        axes = (0, 1) if MEMBER in da.dims else 0
        # accumulated in float64 without a float64 copy of the split (xarray's groupby made one: 3x slower)
        means = np.stack([x[hour_of_time == h].mean(axis=axes, dtype=np.float64) for h in hours])
        dims = [d for d in da.dims if d not in ("time", MEMBER)]
        clim[v] = xr.DataArray(means, dims=["hour", *dims], coords={"hour": hours}, attrs=dict(da.attrs))
    grid = {d: train[d] for d in ("level", "latitude", "longitude") if d in train.coords}
    clim = xr.Dataset(clim, coords=grid)
    if len(hours) < 24:
        # pad one period on each side so that interpolation wraps around midnight
        padded = xr.concat([clim.assign_coords(hour=hours - 24), clim, clim.assign_coords(hour=hours + 24)],
                           "hour")
        clim = padded.interp(hour=np.arange(24), method="linear")
    clim = clim.astype(np.float32)
    for v in clim.data_vars:
        clim[v].attrs = dict(train[v].attrs)
    return clim.transpose("hour", *[d for d in DIMS_UPPER[1:] if d in clim.dims])


# ---------------------------------------------------------------------------------------------------
# the stage

def use_dask(cfg: dict[str, Any], nbytes: int) -> bool:
    """`dask: auto` (default) uses Dask only for selections over `dask_above_mb` (default 2048): below
    that, Dask's task overhead costs more than it saves (the raw read of 94 MB takes 0.40 s through Dask,
    0.19 s without; benchmarks/era5_prepare.py)."""
    choice = cfg.get("dask", "auto")
    if choice == "auto":
        return nbytes > float(cfg.get("dask_above_mb", 2048)) * 1e6
    if not isinstance(choice, bool):
        raise StageError("params.yaml", f"era5_prepare.dask: expected auto, true or false, got {choice!r}")
    return choice


def read_all(ds: xr.Dataset, where: str) -> xr.Dataset:
    """Loads every variable, naming the one whose chunk does not decode (zarr's codecs raise
    RuntimeError, ValueError, ... for a corrupt chunk, with no file name)."""
    for var in list(ds.data_vars):
        try:
            ds[var] = ds[var].load()
        except Exception as e:
            raise StageError(where, f"{var}: unreadable chunk ({type(e).__name__}: {e})") from None
    return ds.load()


def assemble(raw: str | Path, cfg: dict[str, Any]) -> tuple[dict[str, xr.Dataset], dict[str, Any]]:
    """Read, harmonise, select, regrid and split, in memory: ({split: Dataset}, meta); not validated."""
    where = str(raw)
    ds = select(harmonise(open_raw(raw), where), cfg.get("variables"), cfg.get("levels"), where)
    if not use_dask(cfg, ds.nbytes):
        ds = select(harmonise(open_raw(raw, dask=False), where), cfg.get("variables"), cfg.get("levels"), where)
    ds, regrid_how = regrid(ds, cfg.get("grid_deg"))
    ds = read_all(wrap_and_sort(ds), where)
    # the raw attributes describe the source grid: keep only where the data came from
    ds.attrs = {"source": ds.attrs.get("source", "unknown")}
    variables = list(ds.data_vars)
    levels = ds["level"].values.tolist() if "level" in ds.dims else []
    times = ds["time"].values
    step = step_hours_of(times, where)
    max_lead = cfg.get("max_lead_hours", 24)
    idx = split_indices(times, cfg.get("split") or {}, max_lead, step, cfg.get("embargo_hours"))
    splits = {name: ds.isel(time=i) for name, i in idx.items()}
    lat, lon = ds["latitude"].values, ds["longitude"].values
    meta = {
        "source": ds.attrs["source"],
        "raw": where,
        "variables": variables,
        "upper_variables": upper_vars(ds),
        "surface_variables": surface_vars(ds),
        "levels": levels,
        "step_hours": step,
        "max_lead_hours": max_lead,
        "members": int(ds.sizes[MEMBER]) if MEMBER in ds.dims else None,
        "grid": {"grid_deg": cfg.get("grid_deg"), "regrid": regrid_how, "n_lat": len(lat), "n_lon": len(lon),
                 "latitude": [float(lat[0]), float(lat[-1])], "longitude": [float(lon[0]), float(lon[-1])]},
        "splits": {name: {"start": str(p["time"].values[0])[:19], "end": str(p["time"].values[-1])[:19],
                          "n_times": int(p.sizes["time"])} for name, p in splits.items()},
        "stats_method": "mean and population std over time, latitude, longitude of the train split, "
                        "not latitude-weighted",
    }
    return splits, meta


def check_and_summarise(splits: dict[str, xr.Dataset], meta: dict[str, Any]) -> tuple[dict, xr.Dataset]:
    """Validates the splits (StageError naming the raw store); then (stats, climatology) of the train
    split."""
    validate_splits(splits, meta["variables"], meta["levels"], meta["step_hours"],
                    {name: meta["raw"] for name in splits})
    return compute_stats(splits["train"]), compute_climatology(splits["train"])


CHUNK_BYTES = 64 * 2**20


def zarr_encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Per data variable: chunks of whole fields along `time` (or `hour`), at most CHUNK_BYTES each, since
    training reads time slices of every grid point; Blosc LZ4 with byte shuffle, which on the default
    profile's 120-day splits writes 1.5x and reads 1.6x faster than Zarr's default Zstd and is 16%
    smaller."""
    from zarr.codecs import BloscCodec

    encoding = {}
    for v, da in ds.data_vars.items():
        along = "time" if "time" in da.dims else "hour"
        per_step = da.dtype.itemsize * math.prod(n for d, n in da.sizes.items() if d != along)
        per_chunk = max(1, min(da.sizes[along], CHUNK_BYTES // max(per_step, 1)))
        encoding[v] = {"chunks": tuple(per_chunk if d == along else n for d, n in da.sizes.items()),
                       "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}
    return encoding


def _to_zarr(ds: xr.Dataset, path: Path) -> None:
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(path, mode="w", consolidated=False, encoding=zarr_encoding(ds))


def prepare(raw: str | Path, out_dir: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Assembles the splits, validates them and writes OUT_DIR atomically; returns meta.

    The split stores are written into the temporary directory while the splits are validated and
    summarised (Blosc and NumPy release the GIL: 20% faster at 120 days). A validation error discards
    the directory, so nothing is ever written where a later stage would look."""
    splits, meta = assemble(raw, cfg)
    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(1) as writer:
        writes = [writer.submit(_to_zarr, ds, tmp / f"{name}.zarr") for name, ds in splits.items()]
        try:
            stats, climatology = check_and_summarise(splits, meta)
        except BaseException:
            writer.shutdown(cancel_futures=True)  # the writes not yet started are not needed
            raise
        _to_zarr(climatology, tmp / "climatology.zarr")
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "meta.json", meta)
        for w in writes:
            w.result()  # a write error surfaces here, before the directory is published
    return meta


def main(argv: list[str]) -> None:
    profile, argv = pop_profile(argv)
    cfg = stage_params("era5_prepare", profile)
    raw = argv[0] if argv else RAW
    out_dir = argv[1] if len(argv) > 1 else OUT_DIR
    with naming_profile("era5_prepare", profile):
        meta = prepare(raw, out_dir, cfg)
    sizes = {k: v["n_times"] for k, v in meta["splits"].items()}
    print(f"era5_prepare: wrote {out_dir} ({meta['grid']['n_lat']}x{meta['grid']['n_lon']}, "
          f"{meta['variables']}, levels {meta['levels']}, times {sizes})")


if __name__ == "__main__":
    cli_main(main)
