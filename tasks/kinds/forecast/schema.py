"""The ERA5 data contract: the variables the pipeline knows, the layout of a prepared store
(`era5_prepare` writes it, the forecast kind reads it) and the Great Expectations suites both sides
run on it.

A prepared directory holds train.zarr, val.zarr, test.zarr (float32; upper-air variables
([member,] time, level, latitude, longitude), surface ([member,] time, latitude, longitude)),
climatology.zarr (hour, [level,] latitude, longitude), stats.json and meta.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ...platform.common import StageError, read_json
from ...platform.validation import validate_frame

SPLITS = ("train", "val", "test")
DIMS_UPPER = ("time", "level", "latitude", "longitude")
DIMS_SURFACE = ("time", "latitude", "longitude")
# an ensemble (e.g. ERA5's EDA) keeps its members as a leading `member` dim: each member is one
# trajectory in time; statistics and climatology pool the members
MEMBER = "member"



@dataclass(frozen=True)
class Variable:
    long_name: str   # the ARCO-ERA5 / CDS request name
    units: str       # ERA5 units, spelt as ERA5 files spell them
    title: str       # ERA5's `long_name` attribute
    upper: bool      # on pressure levels


# ERA5 short names in the canonical order the prepared data uses: upper-air first, then surface
VARIABLES: dict[str, Variable] = {
    "z": Variable("geopotential", "m**2 s**-2", "Geopotential", True),
    "t": Variable("temperature", "K", "Temperature", True),
    "u": Variable("u_component_of_wind", "m s**-1", "U component of wind", True),
    "v": Variable("v_component_of_wind", "m s**-1", "V component of wind", True),
    "q": Variable("specific_humidity", "kg kg**-1", "Specific humidity", True),
    "t2m": Variable("2m_temperature", "K", "2 metre temperature", False),
    "msl": Variable("mean_sea_level_pressure", "Pa", "Mean sea level pressure", False),
    "sp": Variable("surface_pressure", "Pa", "Surface pressure", False),
    "u10": Variable("10m_u_component_of_wind", "m s**-1", "10 metre U wind component", False),
    "v10": Variable("10m_v_component_of_wind", "m s**-1", "10 metre V wind component", False),
}
UPPER = tuple(k for k, v in VARIABLES.items() if v.upper)
SURFACE = tuple(k for k, v in VARIABLES.items() if not v.upper)

# other names sources use for the same quantities (GRIB paramId short names, geopotential height)
ALIASES: dict[str, str] = {
    **{v.long_name: k for k, v in VARIABLES.items()},
    "2t": "t2m", "10u": "u10", "10v": "v10", "gh": "z", "geopotential_height": "z",
}


def short_name(name: str) -> str | None:
    """The ERA5 short name of a source variable name, or None when it is not one this project uses."""
    if name in VARIABLES:
        return name
    return ALIASES.get(name)


# physical bounds for validation: wide enough for any real ERA5 value, narrow enough to catch a unit slip
# (t2m in °C labelled K, pressure in hPa labelled Pa, z in metres labelled m² s⁻²)
BOUNDS: dict[str, tuple[float, float]] = {
    "z": (-1.0e4, 5.0e5),      # m² s⁻²: ~-500 m at 1000 hPa in deep lows, ~48 km at 1 hPa
    "t": (150.0, 350.0),       # K
    "u": (-150.0, 150.0),      # m s⁻¹
    "v": (-150.0, 150.0),
    "q": (-1.0e-4, 0.05),      # kg kg⁻¹ (ERA5 has tiny negative values)
    "t2m": (170.0, 340.0),     # K
    "msl": (8.5e4, 1.1e5),     # Pa
    "sp": (3.0e4, 1.1e5),      # Pa: ~33 kPa on Everest
    "u10": (-100.0, 100.0),
    "v10": (-100.0, 100.0),
}


def upper_vars(ds: xr.Dataset) -> list[str]:
    """Variables with a `level` dim, in the canonical order z, t, u, v, q."""
    return [v for v in VARIABLES if v in ds.data_vars and "level" in ds[v].dims]


def surface_vars(ds: xr.Dataset) -> list[str]:
    """Variables without a `level` dim, in the canonical order t2m, msl, sp, u10, v10."""
    return [v for v in VARIABLES if v in ds.data_vars and "level" not in ds[v].dims]


# ---------------------------------------------------------------------------------------------------
# validation (Great Expectations on small summary frames)

def _stems(variables: list[str], levels: list[int]) -> dict[str, tuple[str, int | None]]:
    """Summary row label ("z500", "t2m") → (variable, level)."""
    stems = {}
    for v in variables:
        for lv in (levels if VARIABLES[v].upper else [None]):
            stems[f"{v}{lv}" if lv is not None else v] = (v, lv)
    return stems


def field_frame(ds: xr.Dataset, split: str) -> pd.DataFrame:
    """One row per variable/level and time step: min and max over the grid (NaN propagates, so a NaN
    anywhere in the field makes both NaN) and the variable's physical bounds."""
    levels = ds["level"].values.tolist() if "level" in ds.dims else []
    n_time = ds.sizes["time"]
    parts = []
    for stem, (v, lv) in _stems(list(ds.data_vars), levels).items():
        field = ds[v].sel(level=lv) if lv is not None else ds[v]
        x = field.transpose("time", ...).values.reshape(n_time, -1)
        lo, hi = BOUNDS[v]
        parts.append(pd.DataFrame({"split": split, "variable": stem, "min": x.min(axis=1).astype(float),
                                   "max": x.max(axis=1).astype(float), "lower": lo, "upper": hi}))
    return pd.concat(parts, ignore_index=True)


def axes_frame(splits: list[xr.Dataset]) -> pd.DataFrame:
    """latitude, longitude (of the first split), time (hours since 1970, the splits one after another)
    and the step before each time within its split, side by side; the shorter columns are padded with
    NaN at the end (GX skips nulls). Time increasing across the splits means chronological."""
    hours = [(ds["time"].values - np.datetime64("1970-01-01")) / np.timedelta64(1, "h") for ds in splits]
    cols = {"latitude": splits[0]["latitude"].values.astype(float),
            "longitude": splits[0]["longitude"].values.astype(float),
            "time_h": np.concatenate(hours).astype(float),
            "dt_h": np.concatenate([np.concatenate([[np.nan], np.diff(h)]) for h in hours])}
    n = max(len(c) for c in cols.values())
    return pd.DataFrame({k: np.concatenate([c, np.full(n - len(c), np.nan)]) for k, c in cols.items()})


def fields_suite(stems: list[str]):
    """Every expected variable/level present, no NaN/inf, min and max within the physical bounds."""
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        return [
            E.ExpectTableColumnsToMatchSet(column_set=["split", "variable", "min", "max", "lower", "upper"],
                                           exact_match=True),
            E.ExpectColumnDistinctValuesToEqualSet(column="variable", value_set=stems),
            E.ExpectColumnValuesToNotBeNull(column="min"),
            E.ExpectColumnValuesToNotBeNull(column="max"),
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="min", column_B="lower", or_equal=True),
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="upper", column_B="max", or_equal=True),
        ]
    return build


def axes_suite(step_hours: int):
    """ERA5 orientation and a regular time axis."""
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        return [
            E.ExpectColumnValuesToBeDecreasing(column="latitude", strictly=True),
            E.ExpectColumnValuesToBeBetween(column="latitude", min_value=-90, max_value=90),
            E.ExpectColumnValuesToBeIncreasing(column="longitude", strictly=True),
            E.ExpectColumnValuesToBeBetween(column="longitude", min_value=0, max_value=360, strict_max=True),
            # non-strict: consecutive splits may share a boundary step (embargo_hours: 0); within a
            # split, dt_h equal to the step already makes time strictly increasing
            E.ExpectColumnValuesToBeIncreasing(column="time_h"),
            E.ExpectColumnValuesToBeBetween(column="dt_h", min_value=step_hours, max_value=step_hours),
        ]
    return build


def time_problems(times: np.ndarray, step_hours: float | None = None, limit: int = 3) -> list[str]:
    """A time axis' faults in words, each naming its step: repeated, going back, or off the regular step
    (`step_hours`; None: the axis' most common step). Empty when the axis is fine."""
    t = pd.DatetimeIndex(times)
    if len(t) < 2:
        return []
    dt = np.diff(t.values) / np.timedelta64(1, "h")
    if step_hours is None:
        values, counts = np.unique(dt[dt > 0], return_counts=True)
        step_hours = float(values[np.argmax(counts)]) if len(values) else 1.0
    stamp = lambda i: f"{t[i]:%Y-%m-%dT%H:%M}"
    problems = []
    for i in np.flatnonzero(dt != step_hours):
        if dt[i] == 0:
            problems.append(f"time step {i + 1} ({stamp(i + 1)}) repeats step {i}")
        elif dt[i] < 0:
            problems.append(f"time step {i + 1} ({stamp(i + 1)}) is {-dt[i]:g} h before step {i} ({stamp(i)})")
        else:
            problems.append(f"time step {i + 1} ({stamp(i + 1)}) is {dt[i]:g} h after step {i} ({stamp(i)}), "
                            f"expected {step_hours:g} h")
    if len(problems) > limit:
        problems = problems[:limit] + [f"{len(problems) - limit} more"]
    return problems


def _field_problems(frame: pd.DataFrame, times: np.ndarray, limit: int = 5) -> str:
    """Which variables failed and where, in words (GX reports only counts for the pair expectations).
    `frame` has one row per time step for each variable (field_frame), so row i of a variable is times[i]."""
    problems = []
    for stem, rows in frame.groupby("variable", sort=False):
        lo, hi = rows["lower"].iloc[0], rows["upper"].iloc[0]
        if rows[["min", "max"]].isna().any().any():
            nan = rows["min"].isna().to_numpy()
            problems.append(f"{stem} has NaN in {int(nan.sum())} time steps, first "
                            f"{pd.Timestamp(times[int(np.argmax(nan))]):%Y-%m-%dT%H:%M}")
        elif rows["min"].min() < lo or rows["max"].max() > hi:
            problems.append(f"{stem} spans {rows['min'].min():.6g}..{rows['max'].max():.6g}, "
                            f"outside [{lo:g}, {hi:g}]")
    return "; ".join(problems[:limit])


def validate_split(ds: xr.Dataset, split: str, variables: list[str], levels: list[int], step_hours: int,
                   source: str) -> None:
    """StageError naming `source` when the split fails the suites."""
    frame = field_frame(ds, split)
    try:
        validate_frame(frame, fields_suite(list(_stems(variables, levels))), source=source,
                       name=f"era5-{split}")
        validate_frame(axes_frame([ds]), axes_suite(step_hours), source=source, name=f"era5-{split}-axes")
    except StageError as e:
        detail = "; ".join(filter(None, [_field_problems(frame, ds["time"].values),
                                          "; ".join(time_problems(ds["time"].values, step_hours))]))
        raise StageError(source, f"{split} split {e.problem}" + (f" ({detail})" if detail else "")) from None


def validate_splits(splits: dict[str, xr.Dataset], variables: list[str], levels: list[int], step_hours: int,
                    sources: dict[str, str]) -> None:
    """Every split against the suites in two GX runs (fields, axes), not two per split: each run has a
    fixed cost of ~0.1 s, half of what a small prepare takes. When that fails, the splits are checked
    one by one so that the error names the split and its `sources` entry."""
    stems = list(_stems(variables, levels))
    first = next(iter(splits))
    for name, ds in splits.items():
        for axis in ("latitude", "longitude"):
            if not np.array_equal(ds[axis].values, splits[first][axis].values):
                raise StageError(sources[name], f"{name} split: {axis} differs from the {first} split")
    try:
        validate_frame(pd.concat([field_frame(ds, name) for name, ds in splits.items()], ignore_index=True),
                       fields_suite(stems), source=sources[first], name="era5-splits")
        validate_frame(axes_frame(list(splits.values())), axes_suite(step_hours), source=sources[first],
                       name="era5-splits-axes")
    except StageError:
        for name, ds in splits.items():
            validate_split(ds, name, variables, levels, step_hours, sources[name])
        raise  # each split passes alone, so together they are out of order


# ---------------------------------------------------------------------------------------------------
# the consumer side

def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "run `dvc repro era5_prepare`")


def open_store(path: str | Path, dask: bool = False, hint: str = "run `dvc repro era5_prepare`") -> xr.Dataset:
    """A Zarr store this project wrote, whole: StageError naming it when it is absent, unreadable, or
    has lost chunks of a data variable (Zarr would read those as fill values, NaN, without a word)."""
    path = Path(path)
    if not path.exists():
        raise StageError(path, f"not found ({hint})")
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks={} if dask else None)
    except Exception as e:  # zarr raises many types for a broken store
        raise StageError(path, f"not a readable Zarr store: {type(e).__name__}: {e}") from None
    lost = missing_chunks(path, list(ds.data_vars))
    if lost:
        raise StageError(path, f"chunks missing from {', '.join(lost)}: an incomplete copy? "
                               f"Rerun the stage that wrote it, or `dvc checkout`")
    return ds


def missing_chunks(path: str | Path, names: list[str]) -> list[str]:
    """'<name> (k of n)' for each float array of `names` with chunk files absent. Only floats: their
    fill value is NaN, so an absent chunk is never a legitimately empty one (Zarr skips writing chunks
    that hold only the fill value)."""
    import zarr
    group = zarr.open_group(str(path), mode="r")
    out = []
    for name in names:
        arr = group[name]
        if np.issubdtype(arr.dtype, np.floating) and arr.nchunks_initialized < arr.nchunks:
            out.append(f"{name} ({arr.nchunks - arr.nchunks_initialized} of {arr.nchunks})")
    return out


def load_prepared(data_dir: str | Path, validate: bool = True) -> dict[str, Any]:
    """{"train", "val", "test": Dataset, "climatology": Dataset, "stats": dict, "meta": dict}.

    With validate=True the splits are loaded into memory and checked with the suite `prepare` used;
    otherwise they are opened lazily (no Dask; values are read on access)."""
    data_dir = Path(data_dir)
    meta = _read_json(data_dir / "meta.json")
    out: dict[str, Any] = {"stats": _read_json(data_dir / "stats.json"), "meta": meta}
    for name in (*SPLITS, "climatology"):
        ds = open_store(data_dir / f"{name}.zarr")
        out[name] = ds[upper_vars(ds) + surface_vars(ds)]  # Zarr does not keep the order
    if validate:
        splits = {name: out[name].load() for name in SPLITS}
        validate_splits(splits, meta["variables"], meta["levels"], int(meta["step_hours"]),
                        {name: str(data_dir / f"{name}.zarr") for name in SPLITS})
    return out
