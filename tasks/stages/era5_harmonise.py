"""ERA5 data as sources deliver it → ERA5 short names, dims and SI units; and the checks a raw store
must pass before a stage writes it.

`harmonise` is step 1 of `era5_prepare`. `check_raw` is what `era5_download` runs on the store it is
about to publish: the raw store is a DVC output, cached and pushed to the remote for every worker, so
a NaN field, °C labelled K or a broken time axis is refused there, where the error can name the source
file, rather than at `era5_prepare`, which could only name raw.zarr.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import xarray as xr

from ..kinds.forecast.schema import BOUNDS, VARIABLES, short_name, time_problems
from ..platform.common import StageError

G = 9.80665

# accepted unit spellings (lower case, without spaces, '*', '^', '.' and '_') → (scale, offset) to ERA5 units
_SAME = (1.0, 0.0)
_WIND = {"ms-1": _SAME, "m/s": _SAME, "ms**-1": _SAME, "meterspersecond": _SAME, "metrepersecond": _SAME}
_KELVIN = {"k": _SAME, "kelvin": _SAME, "degc": (1.0, 273.15), "°c": (1.0, 273.15), "c": (1.0, 273.15),
           "celsius": (1.0, 273.15), "degreescelsius": (1.0, 273.15)}
_PASCAL = {"pa": _SAME, "pascal": _SAME, "hpa": (100.0, 0.0), "mbar": (100.0, 0.0), "mb": (100.0, 0.0),
           "millibars": (100.0, 0.0)}
UNITS: dict[str, dict[str, tuple[float, float]]] = {
    "z": {"m2s-2": _SAME, "m2/s2": _SAME, "m**2s**-2": _SAME, "gpm": (G, 0.0), "m": (G, 0.0)},
    "t": _KELVIN, "t2m": _KELVIN,
    "u": _WIND, "v": _WIND, "u10": _WIND, "v10": _WIND,
    "q": {"kgkg-1": _SAME, "kg/kg": _SAME, "1": _SAME, "gkg-1": (1e-3, 0.0), "g/kg": (1e-3, 0.0)},
    "msl": _PASCAL, "sp": _PASCAL,
}
DIM_NAMES = {"isobaricInhPa": "level", "pressure_level": "level", "plev": "level",
             "lat": "latitude", "lon": "longitude", "number": "member"}


def _norm_units(units: str) -> str:
    return re.sub(r"[\s*^._]", "", str(units).strip().lower())


def convert_units(da: xr.DataArray, var: str, where: str) -> xr.DataArray:
    """`da` in ERA5 units; StageError for units this module does not know."""
    units = da.attrs.get("units")
    if units is None:
        raise StageError(where, f"{var}: wrong units: no `units` attribute")
    try:
        scale, offset = UNITS[var][_norm_units(units)]
    except KeyError:
        raise StageError(where, f"{var}: wrong units {units!r} (expected {VARIABLES[var].units!r} "
                                f"or a known equivalent)") from None
    out = da if (scale, offset) == _SAME else da * scale + offset
    return (out.astype(np.float32, copy=False)
            .assign_attrs(units=VARIABLES[var].units, long_name=VARIABLES[var].title))


def _harmonise_time(ds: xr.Dataset) -> xr.Dataset:
    """`time` is the valid time: CDS netCDF calls its time axis `valid_time`; cfgrib has `time` (the
    analysis/initial time) with `valid_time` beside it, equal for analyses."""
    if "valid_time" in ds.dims:
        ds = ds.drop_vars([c for c in ("time",) if c in ds.variables]).rename({"valid_time": "time"})
    elif "valid_time" in ds.coords and "time" in ds.dims and ds["valid_time"].dims == ("time",):
        ds = ds.assign_coords(time=ds["valid_time"].values).drop_vars("valid_time")
    return ds


def harmonise(ds: xr.Dataset, where: str) -> xr.Dataset:
    """ERA5 short names, dims and units; variables this project does not use are dropped."""
    ds = _harmonise_time(ds)
    ds = ds.rename({k: v for k, v in DIM_NAMES.items() if k in ds.variables or k in ds.dims})
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims])
    if "time" not in ds.dims:
        raise StageError(where, f"no time dimension (dims {list(ds.dims)})")
    out = {}
    for name in ds.data_vars:
        short = short_name(str(name))
        if short is None:
            continue
        if short in out:
            raise StageError(where, f"two variables map to {short!r}")
        try:  # on data read whole (no Dask) the conversion reads it: a corrupt chunk fails here
            out[short] = convert_units(ds[name], short, where)
        except StageError:
            raise
        except Exception as e:  # zarr's codecs raise RuntimeError, ValueError, ... naming no file
            raise StageError(where, f"{short}: unreadable chunk ({type(e).__name__}: {e})") from None
    ds = xr.Dataset(out, coords=ds.coords, attrs=ds.attrs)
    if "level" in ds.coords:
        ds = _harmonise_levels(ds)
    return ds


def _harmonise_levels(ds: xr.Dataset) -> xr.Dataset:
    level = ds["level"]
    values = np.asarray(level.values, dtype=float)
    if _norm_units(level.attrs.get("units", "hpa")) in ("pa", "pascal"):
        values = values / 100
    values = values.astype(np.int64) if np.all(values == np.round(values)) else values
    return ds.assign_coords(level=("level", values, {"units": "hPa", "long_name": "pressure level"}))


# ---------------------------------------------------------------------------------------------------
# the raw store's checks

def _stamp(t: np.datetime64) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M")


def check_raw(ds: xr.Dataset, where: str, step_hours: float | None = None) -> None:
    """StageError naming `where` when the data are not what ERA5 delivers: units this project does not
    know, a time axis that repeats, goes back or skips a step (`step_hours`; else the axis' most
    common step), NaN/inf anywhere, or values outside the physical bounds (a unit slip such as °C
    labelled K). Reads the data once (Dask-friendly reductions)."""
    ds = harmonise(ds, where)
    times = ds["time"].values
    problems = time_problems(times, step_hours)
    if problems:
        raise StageError(where, "time axis: " + "; ".join(problems))
    for var in ds.data_vars:
        da = ds[var]
        other = [d for d in da.dims if d != "time"]
        bad = (~np.isfinite(da)).any(other).values if other else ~np.isfinite(da.values)
        if bad.any():
            first = times[int(np.argmax(bad))]
            raise StageError(where, f"{var}: NaN or inf in {int(bad.sum())} time step(s), first {_stamp(first)}")
        lo, hi = BOUNDS[var]
        vmin, vmax = float(da.min().values), float(da.max().values)
        if vmin < lo or vmax > hi:
            raise StageError(where, f"{var}: values span {vmin:.6g}..{vmax:.6g} {VARIABLES[var].units}, outside "
                                    f"the physical [{lo:g}, {hi:g}]: wrong units or a unit slip "
                                    f"(e.g. °C labelled K)?")
