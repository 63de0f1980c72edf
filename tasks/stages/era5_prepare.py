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
6. Validate the splits with Great Expectations, all in one run per suite, on each field's min and
   max (`extremes`; physical range per variable, no NaN/inf, latitude strictly decreasing, longitude
   strictly increasing in [0, 360), time strictly increasing with a regular step within a split and
   not decreasing across splits), and write OUT_DIR
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
      dask: auto                       # auto: Dask only for selections over dask_above_mb; true; false
      dask_above_mb: null              # default 512, or 2048 with a cluster (see use_dask)
      cluster: null                    # where Dask runs: null = this process's threads; "local:N" = N
                                       # worker processes started and closed by the stage;
                                       # "tcp://host:port" = an existing scheduler.
                                       # $DASK_SCHEDULER_ADDRESS takes precedence (platform/dask_cluster.py)

Two paths, the same bytes (tests/test_dask_prepare.py). In process: the selection is loaded whole,
then validated, summarised and written from memory. On Dask (`use_dask`): one graph, computed where
the data are: each variable is read in blocks of whole raw chunks (≤ READ_CHUNK_BYTES) and regridded
block by block with the in-process code (`regrid_lazily`); each block of a split's output chunks is
then written to its store, reduced to min/max per field (all the validation suites look at:
`extremes`) and, for train, to partial statistics, by one task. Nothing but those summaries and the
statistics comes back to the client, which runs the same Great Expectations suites on them. The
statistics and climatology are folded from per-chunk partials in a fixed order on both paths, so
they agree to the bit (section 4). Workers of an existing scheduler need this checkout and a shared
filesystem for RAW and OUT_DIR.

The prepared layout and its suites are the forecast kind's contract (tasks/kinds/forecast/schema.py):
`load_prepared(data_dir)` there is what training reads, re-validated with the same suites.
"""
from __future__ import annotations

import itertools
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import dask
import dask.array
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import is_dask_collection

from ..kinds.forecast.schema import (DIMS_SURFACE, DIMS_UPPER, MEMBER, SPLITS, VARIABLES, open_store,
                                     surface_vars, upper_vars, validate_splits)
from ..platform import dask_cluster
from ..platform.common import StageError, atomic_dir, stage_main, write_json
from ..platform.params import naming_profile, pop_profile, stage_params
from .era5_harmonise import harmonise

RAW = "data/era5/raw.zarr"
OUT_DIR = "data/era5/prepared"
DASK_ABOVE_MB = 512  # selections over this go to Dask (see use_dask) ...
CLUSTER_ABOVE_MB = 2048  # ... or this, with a cluster configured


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
#
# Both are folded from partial results of time blocks. The blocks are the split's Zarr chunks along
# time (zarr_encoding: they follow from the data's shape alone), each block's partial is a NumPy
# reduction of that block, and the partials are added up by a fixed binary tree in time order. The
# in-process path runs this on slices of the loaded split, the Dask path on the same blocks where
# they are computed: the same operations on the same arrays, so stats.json and climatology.zarr are
# the same to the bit either way (a float sum depends on its order: np.mean over the whole split
# would not equal a sum of per-chunk sums).

def _now(fn: Callable) -> Callable:
    """What `dask.delayed` is to the Dask path: here the function itself, called at once."""
    return fn


def _tree_sum(parts: list, add: Callable, do: Callable) -> Any:
    """parts[0] + parts[1] + ... as a balanced tree of `add`: the same tree for the same number of
    parts, and on Dask no task holds more than two partials."""
    while len(parts) > 1:
        parts = [do(add)(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def time_step_of_chunks(ds: xr.Dataset) -> dict[str, int]:
    """Time steps per Zarr chunk (the last may be shorter), per data variable."""
    return {v: enc["chunks"][ds[v].dims.index("time")] for v, enc in zarr_encoding(ds).items()}


def _block_partial(x: np.ndarray, hour_of_step: np.ndarray, dims: tuple[str, ...]) -> tuple:
    """One block's ((count, mean, M2) per level, {hour of day: sum over its steps at that hour}), all
    float64 (M2: the sum of squared deviations from the block's mean, as np.std computes it)."""
    x = np.ascontiguousarray(x)  # the same memory layout, hence the same summation order, on every path
    time_axis = dims.index("time")
    axes = tuple(i for i, d in enumerate(dims) if d != "level")
    mean = x.mean(axis=axes, dtype=np.float64, keepdims=True)
    dev = x - mean
    np.multiply(dev, dev, out=dev)
    m2 = dev.sum(axis=axes)
    moments = (x.size // m2.size, mean.reshape(m2.shape), m2)
    lead = tuple(range(time_axis + 1))  # [member,] time lead (`select`): climatology pools members
    hourly = {int(h): x.compress(hour_of_step == h, axis=time_axis).sum(axis=lead, dtype=np.float64)
              for h in np.unique(hour_of_step)}
    return moments, hourly


def _add_partials(a: tuple, b: tuple) -> tuple:
    """Two blocks' partials as one (Chan et al.'s pairwise update of mean and M2)."""
    (na, ma, m2a), (nb, mb, m2b) = a[0], b[0]
    n, delta = na + nb, mb - ma
    moments = (n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n))
    hourly = {h: a[1][h] + b[1][h] if h in a[1] and h in b[1] else a[1].get(h, b[1].get(h))
              for h in sorted(a[1].keys() | b[1].keys())}
    return moments, hourly


def _stats_entry(partial: tuple) -> dict[str, Any]:
    n, mean, m2 = partial[0]
    return {"mean": mean.tolist(), "std": np.sqrt(m2 / n).tolist()}  # a float, or a list per level


def _climatology_values(partial: tuple, counts: dict[int, int]) -> np.ndarray:
    """Mean per hour of day 0..23, float32; hours the data lack are interpolated linearly between the
    hours present, periodically (23 h is next to 0 h)."""
    hours = np.array(sorted(partial[1]))
    means = np.stack([partial[1][h] / counts[h] for h in hours.tolist()])
    if len(hours) == 24:
        return means.astype(np.float32)
    known_hours = np.concatenate([hours - 24, hours, hours + 24])
    known = np.concatenate([means, means, means])
    out = np.empty((24, *means.shape[1:]), np.float64)
    for h in range(24):
        i = int(np.searchsorted(known_hours, h, side="right")) - 1  # the last known hour <= h
        w = (h - known_hours[i]) / (known_hours[i + 1] - known_hours[i])
        out[h] = known[i] if w == 0 else known[i] + (known[i + 1] - known[i]) * w
    return out.astype(np.float32)


def hour_of_time(ds: xr.Dataset) -> np.ndarray:
    return pd.DatetimeIndex(ds["time"].values).hour.to_numpy()


def _fold_train(parts: dict[str, list], train: xr.Dataset, do: Callable) -> tuple[dict, dict]:
    """(stats, {variable: climatology values}) from each variable's block partials, in time order."""
    hours, n_steps = np.unique(hour_of_time(train), return_counts=True)
    counts = dict(zip(hours.tolist(), (n_steps * train.sizes.get(MEMBER, 1)).tolist()))
    stats, values = {}, {}
    for v, p in parts.items():
        total = _tree_sum(p, _add_partials, do)
        stats[v], values[v] = do(_stats_entry)(total), do(_climatology_values)(total, counts)
    return stats, values


def climatology_dataset(values: dict[str, Any], train: xr.Dataset) -> xr.Dataset:
    """The climatology store's dataset: (hour, [level,] latitude, longitude) per variable."""
    grid = {d: train[d] for d in ("level", "latitude", "longitude") if d in train.coords}
    clim = {v: xr.DataArray(x, dims=["hour", *[d for d in train[v].dims if d not in ("time", MEMBER)]],
                            attrs=dict(train[v].attrs)) for v, x in values.items()}
    return xr.Dataset(clim, coords={"hour": np.arange(24), **grid})


def train_summaries(train: xr.Dataset) -> tuple[dict[str, Any], xr.Dataset]:
    """(stats, climatology) of a loaded training split."""
    hours, steps = hour_of_time(train), time_step_of_chunks(train)
    parts = {}
    for v, da in train.data_vars.items():
        x, axis, step = da.values, da.dims.index("time"), steps[v]
        block = lambda s: x[(slice(None),) * axis + (slice(s, s + step),)]  # the Zarr chunk from step s
        parts[v] = [_block_partial(block(s), hours[s:s + step], da.dims)
                    for s in range(0, da.sizes["time"], step)]
    stats, values = _fold_train(parts, train, _now)
    return stats, climatology_dataset(values, train)


def compute_stats(train: xr.Dataset) -> dict[str, dict[str, Any]]:
    """{var: {"mean": [per level] | float, "std": ...}} over [member,] time, latitude, longitude
    (unweighted)."""
    return train_summaries(train)[0]


def compute_climatology(train: xr.Dataset) -> xr.Dataset:
    """Mean per hour of day 0..23 (and over ensemble members); hours the data lack are interpolated
    periodically."""
    return train_summaries(train)[1]


# ---------------------------------------------------------------------------------------------------
# 5. validation

def _min_max(x: np.ndarray, dims: tuple[str, ...]) -> np.ndarray:
    """Min and max of each field (over all but time and level), stacked on a new last axis; NaN
    propagates."""
    axes = tuple(i for i, d in enumerate(dims) if d not in ("time", "level"))
    return np.stack([x.min(axis=axes), x.max(axis=axes)], axis=-1)


def _extremes_dataset(arrays: dict[str, np.ndarray], ds: xr.Dataset) -> xr.Dataset:
    out = {v: xr.DataArray(x, dims=[*[d for d in ds[v].dims if d in ("time", "level")], "extreme"])
           for v, x in arrays.items()}
    axes = ("time", "level", "latitude", "longitude")
    return xr.Dataset(out, coords={d: ds[d] for d in axes if d in ds.coords})


def extremes(ds: xr.Dataset) -> xr.Dataset:
    """Per variable, level and time step of a loaded split: the min and max over the grid (and
    members), NaN when the field has a NaN, with the split's coordinates. The Great Expectations
    suites see nothing else of the fields (schema.field_frame reduces each one to these two numbers;
    min and max are exact in any order), so `validate_splits` on these summaries gives the same
    verdict and the same message as on the split itself, and the Dask path, which computes them
    block by block where the blocks are, validates without moving a field."""
    return _extremes_dataset({v: _min_max(da.values, da.dims) for v, da in ds.data_vars.items()}, ds)


def validate(summaries: dict[str, xr.Dataset], meta: dict[str, Any]) -> None:
    """The splits' `extremes` against the suites; StageError naming the raw store."""
    validate_splits(summaries, meta["variables"], meta["levels"], meta["step_hours"],
                    {name: meta["raw"] for name in summaries})


# ---------------------------------------------------------------------------------------------------
# the stage

def use_dask(cfg: dict[str, Any], nbytes: int, cluster: str | None = None) -> bool:
    """Whether the selection (`nbytes` of raw data) is prepared on Dask. `dask: auto` (default) says
    yes above `dask_above_mb`, whose defaults come from benchmarks/era5_prepare.py (results/
    era5_prepare.json; 2 cores shared with another job, so three runs are quoted):

    - no cluster, DASK_ABOVE_MB = 512: Dask's threads took 1.3x the in-process time at 94 MB (graph
      and scheduling overhead) and broke even at 300-650 MB; above that they are level with the
      in-process path (0.97-1.42x its speed at 755 MB-1.5 GB) and hold blocks, not the selection:
      peak RSS 0.68 GB against 2.0 GB in process at 1.5 GB.
    - a cluster (`cluster`, or $DASK_SCHEDULER_ADDRESS), CLUSTER_ABOVE_MB = 2048: not a speed
      break-even, as there is none on this machine. Two worker processes on the same 2 cores can only
      win back their own overhead: a running 2-worker scheduler reached 0.44-0.68x the in-process
      speed up to 377 MB, 0.79-1.30x at 755 MB and 0.80-0.93x at 1.5 GB. `local:N` also starts and
      stops its workers on every run (1-5.5 s here, mostly 3-4 s; 0.12-0.73x). Above 2 GB the
      in-process path needs over 2.5 GB in one process, the cluster ~0.4 GB in the client and ~0.55 GB
      per worker (blocks: it does not grow with the selection). A cluster with more cores than the
      client's machine breaks even far sooner: set dask_above_mb for it (or dask: true).
    """
    choice = cfg.get("dask", "auto")
    if choice == "auto":
        above = cfg.get("dask_above_mb")
        if above is None:
            above = CLUSTER_ABOVE_MB if cluster else DASK_ABOVE_MB
        return nbytes > float(above) * 1e6
    if not isinstance(choice, bool):
        raise StageError("params.yaml", f"era5_prepare.dask: expected auto, true or false, got {choice!r}")
    return choice


def cluster_of(cfg: dict[str, Any]) -> str | None:
    """Where the Dask path runs: $DASK_SCHEDULER_ADDRESS, else `cluster` (None: threads here)."""
    try:
        configured = dask_cluster.check(cfg.get("cluster"))
    except ValueError as e:
        raise StageError("params.yaml", f"era5_prepare.cluster: {e}") from None
    return dask_cluster.resolve(configured)


class Unreadable(Exception):
    """(variable, detail): a raw chunk that does not decode. Raised where the chunk is read, maybe in
    a worker process; it pickles back to the client, which StageError (two-argument __init__) does not."""


class _RawVariable:
    """A raw variable that reads the region a task asks for, in whichever process runs the task."""

    def __init__(self, name: str, variable: xr.Variable) -> None:
        self.name, self.variable = name, variable
        self.shape, self.dtype, self.ndim = variable.shape, variable.dtype, variable.ndim

    def __getitem__(self, key: tuple) -> np.ndarray:
        try:
            return np.asarray(self.variable[key].values)
        except Exception as e:  # zarr's codecs raise RuntimeError, ValueError, ... naming no file
            raise Unreadable(self.name, f"{type(e).__name__}: {e}") from None


READ_CHUNK_BYTES = 64 * 2**20


def read_lazily(ds: xr.Dataset, block_bytes: int | None = None) -> xr.Dataset:
    """`ds` (opened without Dask) with every data variable as a Dask array of whole fields, read where
    each block's task runs; nothing is read here. A block is one stored chunk along time (None), or
    as many whole stored chunks as fit in `block_bytes` (at least one). The raw store's own chunks
    are small (0.7 MB at 120 days, 512 of them): read as they were, each became ~7 tasks through
    regridding, each costing the scheduler and a worker ~1.4 ms of CPU on this machine, and 3600
    tasks took 5.4 s where the work took 1.4 s."""
    out = ds.copy()
    for v, da in ds.data_vars.items():
        chunks = list(da.shape)
        if "time" in da.dims:
            axis = da.dims.index("time")
            stored = (da.encoding.get("chunks") or da.shape)[axis]
            per_chunk = stored * da.dtype.itemsize * math.prod(n for d, n in da.sizes.items() if d != "time")
            chunks[axis] = min(da.shape[axis], stored * max(1, (block_bytes or 0) // max(per_chunk, 1)))
        # inline_array: the reader travels inside each read task rather than as a task of its own
        data = dask.array.from_array(_RawVariable(str(v), da.variable), chunks=tuple(chunks), lock=False,
                                     asarray=False, inline_array=True, name=f"read-{v}-{uuid.uuid4().hex}",
                                     meta=np.empty((0,) * da.ndim, da.dtype))
        out[v] = da.copy(data=data)
    return out


def _regrid_block(block: xr.Dataset, grid_deg: float | None) -> xr.Dataset:
    """`regrid` and `wrap_and_sort` of one block of whole fields: the in-process code on in-memory
    data, so the same numbers, in one task per block instead of ~10."""
    return wrap_and_sort(regrid(block, grid_deg)[0])


def regrid_lazily(ds: xr.Dataset, grid_deg: float | None) -> tuple[xr.Dataset, str]:
    """`regrid` + `wrap_and_sort` of Dask-backed `ds`, as one task per block and variable."""
    regridded, how = regrid(ds, grid_deg)  # lazily: the coordinates and the shapes, no data
    template = wrap_and_sort(regridded)
    blocks = {v: xr.map_blocks(_regrid_block, ds[[v]], args=[grid_deg], template=template[[v]])[v]
              for v in ds.data_vars}
    return template.assign(blocks), how


def read_all(ds: xr.Dataset, where: str) -> xr.Dataset:
    """Loads every variable, naming the one whose chunk does not decode (zarr's codecs raise
    RuntimeError, ValueError, ... for a corrupt chunk, with no file name)."""
    for var in list(ds.data_vars):
        try:
            ds[var] = ds[var].load()
        except Exception as e:
            raise StageError(where, f"{var}: unreadable chunk ({type(e).__name__}: {e})") from None
    return ds.load()


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive indices as a slice: a view of loaded data instead of a copy, and on Dask
    a slice of each block instead of a gather (splits are always runs; the general case is kept)."""
    return slice(int(idx[0]), int(idx[-1]) + 1) if np.all(np.diff(idx) == 1) else idx


def assemble(raw: str | Path, cfg: dict[str, Any],
             cluster: str | None = None) -> tuple[dict[str, xr.Dataset], dict[str, Any]]:
    """Read, harmonise, select, regrid and split: ({split: Dataset}, meta); not validated. The splits
    are loaded, or (Dask, see `use_dask`: `cluster` is the one Dask would run on) lazy: nothing has
    been read yet."""
    where = str(raw)
    opened = open_raw(raw, dask=False)
    pick = lambda ds: select(harmonise(ds, where), cfg.get("variables"), cfg.get("levels"), where)
    ds = pick(read_lazily(opened))  # the selection, lazily: what it would take in memory
    lazy = use_dask(cfg, ds.nbytes, cluster)
    if lazy:
        ds, regrid_how = regrid_lazily(pick(read_lazily(opened, READ_CHUNK_BYTES)), cfg.get("grid_deg"))
    else:
        ds, regrid_how = regrid(pick(opened), cfg.get("grid_deg"))
        ds = read_all(wrap_and_sort(ds), where)
    # the raw attributes describe the source grid: keep only where the data came from
    ds.attrs = {"source": ds.attrs.get("source", "unknown")}
    variables = list(ds.data_vars)
    levels = ds["level"].values.tolist() if "level" in ds.dims else []
    times = ds["time"].values
    step = step_hours_of(times, where)
    max_lead = cfg.get("max_lead_hours", 24)
    idx = split_indices(times, cfg.get("split") or {}, max_lead, step, cfg.get("embargo_hours"))
    splits = {name: ds.isel(time=_as_slice(i)) for name, i in idx.items()}
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


def _to_zarr(ds: xr.Dataset, path: Path, compute: bool = True) -> Any:
    """Writes `ds` with `zarr_encoding`; compute=False (Dask data): the metadata now, and a Delayed
    that writes the chunks wherever it is computed."""
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}
    return ds.to_zarr(path, mode="w", consolidated=False, encoding=zarr_encoding(ds), compute=compute)


def _write_here(splits: dict[str, xr.Dataset], meta: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The in-process path: the split stores are written by a thread while the splits are validated
    and summarised (Blosc and NumPy release the GIL: 20% faster at 120 days). Returns the stats."""
    with ThreadPoolExecutor(1) as writer:
        writes = [writer.submit(_to_zarr, ds, tmp / f"{name}.zarr") for name, ds in splits.items()]
        try:
            validate({name: extremes(ds) for name, ds in splits.items()}, meta)
            stats, climatology = train_summaries(splits["train"])
        except BaseException:
            writer.shutdown(cancel_futures=True)  # the writes not yet started are not needed
            raise
        _to_zarr(climatology, tmp / "climatology.zarr")
        for w in writes:
            w.result()  # a write error surfaces here, before the directory is published
    return stats


def _write_block(x: np.ndarray, store: str, name: str, start: int, time_axis: int) -> None:
    """Block `x` of variable `name`, from time step `start`, into the Zarr store (whose arrays
    `_to_zarr(..., compute=False)` created); blocks are whole chunks, so no two tasks share one."""
    import zarr

    region = [slice(None)] * x.ndim
    region[time_axis] = slice(start, start + x.shape[time_axis])
    zarr.open_group(store, mode="r+")[name][tuple(region)] = x


def _consume_block(x: np.ndarray, store: str, name: str, start: int, dims: tuple[str, ...],
                   hour_of_step: np.ndarray | None) -> tuple:
    """All the stage needs of one block of a split, in one task where the block is: written to its
    store, reduced to its extremes and (train, `hour_of_step` given) to its partial statistics."""
    _write_block(x, store, name, start, dims.index("time"))
    return _min_max(x, dims), None if hour_of_step is None else _block_partial(x, hour_of_step, dims)


def _write_on_dask(splits: dict[str, xr.Dataset], meta: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The Dask path, one graph on the current scheduler: blocks are read, regridded and split
    (read blocks of whole raw chunks, split blocks of whole output chunks), and each split block is
    written, reduced to its extremes and (train) to its partial statistics by one task; the client
    gets back the extremes (two numbers per field) and the stats, then validates. Returns the stats.

    xarray's own `to_zarr(compute=False)` only creates the stores here: its write graph would fuse
    the blocks' upstream into its tasks under new names, and the blocks would be computed twice."""
    found, parts = {}, {}
    for name, ds in splits.items():
        steps = time_step_of_chunks(ds)
        ds = ds.assign({v: ds[v].chunk({"time": steps[v]}) for v in ds.data_vars})
        store = tmp / f"{name}.zarr"
        _to_zarr(ds, store, compute=False)  # metadata and coordinates; the data below
        hours = hour_of_time(ds) if name == "train" else None
        found[name] = {}
        for v, da in ds.data_vars.items():
            starts = range(0, da.sizes["time"], steps[v])
            blocks = da.data.to_delayed(optimize_graph=False).ravel()  # only time is chunked: in order
            done = [dask.delayed(_consume_block, nout=2)(b, str(store), v, s, da.dims,
                                                         None if hours is None else hours[s:s + steps[v]])
                    for s, b in zip(starts, blocks)]
            found[name][v] = [d[0] for d in done]
            if hours is not None:
                parts[v] = [d[1] for d in done]
    train = splits["train"]
    stats, values = _fold_train(parts, train, dask.delayed)
    shape = lambda v: (24, *[n for d, n in train[v].sizes.items() if d not in ("time", MEMBER)])
    zeros = {v: dask.array.zeros(shape(v), dtype=np.float32, chunks=-1) for v in values}
    template = climatology_dataset(zeros, train)  # its shape, for the store's metadata
    store = tmp / "climatology.zarr"
    _to_zarr(template, store, compute=False)
    writes = [dask.delayed(_write_block)(x, str(store), v, 0, 0) for v, x in values.items()]
    try:
        # every collection is Delayed: one graph, culled and optimised as a whole
        found, stats, _ = dask.compute(found, stats, writes)
    except Unreadable as e:
        raise StageError(meta["raw"], f"{e.args[0]}: unreadable chunk ({e.args[1]})") from None
    validate({name: _extremes_dataset({v: np.concatenate(x) for v, x in per_var.items()}, splits[name])
              for name, per_var in found.items()}, meta)
    return stats


def prepare(raw: str | Path, out_dir: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Assembles the splits, validates them and writes OUT_DIR atomically; returns meta.

    Everything goes into a temporary directory, which a validation error discards, so nothing is
    ever written where a later stage would look. The Dask path runs on `cluster_of(cfg)`: a cluster
    started here is closed before the directory is published or removed."""
    cluster = cluster_of(cfg)
    splits, meta = assemble(raw, cfg, cluster)
    lazy = any(is_dask_collection(da.data) for da in splits["train"].data_vars.values())
    with atomic_dir(out_dir) as tmp, dask_cluster.connect(cluster if lazy else None, "era5_prepare.cluster"):
        stats = (_write_on_dask if lazy else _write_here)(splits, meta, tmp)
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "meta.json", meta)
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
    stage_main(main)
