"""DVC stage `era5_download`: fetch ERA5 fields from one source into a raw Zarr store.

    python -m tasks.stages.era5_download [--profile NAME] [OUT_DIR]   # params: params.yaml › era5 [› NAME]
                                                      # OUT_DIR default data/era5/raw.zarr

The store keeps the names the source uses (ARCO long names, CDS/cfgrib short names, `valid_time`,
`pressure_level`, `isobaricInhPa`, ...) plus a `source` attribute; `tasks.stages.era5_prepare` harmonises
them. It is written to a temporary directory and renamed into place, so a failed run leaves nothing.

Sources (`source:`):
  synthetic  fields from a small advection-diffusion model with an ERA5 schema (tasks.stages.era5_synthetic)
  arco       the public ARCO-ERA5 Zarr on Google Cloud Storage, opened lazily (gcsfs + Dask); only the
             requested variables/levels/times/area are read, when the store is written
  cds        the Copernicus Climate Data Store API (cdsapi): one pressure-level and one single-level
             request. The key comes from ~/.cdsapirc (CDSAPI_RC) or CDSAPI_URL/CDSAPI_KEY, read by
             cdsapi itself; this module reads it only to scrub it from cdsapi's errors and log lines
             (cdsapi logs its key at DEBUG), and never logs or stores it
  files      local GRIB (cfgrib) and netCDF files, merged

The params this module expects (`params.yaml`)::

    era5:
      source: synthetic                 # synthetic | arco | cds | files
      start: "2020-01-01T00:00"         # first time (synthetic, arco, cds)
      n_days: 30                        # or `end: "2020-01-30T23:00"` (inclusive)
      step_hours: 1                     # time step of the output
      levels: [850, 500, 250]           # hPa; [] for surface variables only
      variables: [z, t, u, v, t2m, msl, u10, v10]   # ERA5 short names (see VARIABLES)
      synthetic: {grid_deg: 5.625, seed: 0}
      arco:
        url: gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3
        storage_options: {token: anon}
        area: null                      # [N, W, S, E] in degrees, or null for the globe
        chunks: {time: 6}               # Dask chunks of the written store (other dims whole)
      cds:
        area: null                      # [N, W, S, E] or null
        data_format: netcdf             # netcdf | grib
      files:
        paths: [../shared/data/era5/xarray-data/era5-2mt-2019-03-uk.grib]   # paths or globs
        ensemble_member: 0              # member kept from files with a `number` dim, "mean" or "all"

Only the sub-section of the chosen source is needed. The `files` source reads whole files: there the
time range and levels are not applied (`era5_prepare` selects levels), and `variables` may be null
for "every ERA5 variable found".
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import xarray as xr

from ..kinds.forecast.schema import VARIABLES, short_name
from ..platform.common import StageError, atomic_dir, stage_main
from ..platform.params import naming_profile, pop_profile, stage_params
from ..platform.progress import dask_progress, progress_bar
from .era5_harmonise import check_raw

log = logging.getLogger(__name__)

OUT_DIR = "data/era5/raw.zarr"
ARCO_URL = "gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3"
CDS_PRESSURE = "reanalysis-era5-pressure-levels"
CDS_SINGLE = "reanalysis-era5-single-levels"
GRIB_SUFFIXES = (".grib", ".grb", ".grib1", ".grib2", ".grb2")


def check_variables(variables: list[str] | None, where: str) -> list[str]:
    variables = list(variables or [])
    unknown = [v for v in variables if v not in VARIABLES]
    if unknown:
        raise StageError(where, f"unknown variables {unknown} (known: {list(VARIABLES)})")
    return variables


# ---------------------------------------------------------------------------------------------------
# time range

def time_range(cfg: dict[str, Any], where: str = "params.yaml") -> pd.DatetimeIndex:
    """Times from `start` and `n_days` (or an inclusive `end`) every `step_hours`."""
    step = int(cfg.get("step_hours", 1))
    if "start" not in cfg or not ("n_days" in cfg or "end" in cfg):
        raise StageError(where, "era5: needs `start` and `n_days` or `end`")
    start = pd.Timestamp(cfg["start"])
    if cfg.get("end") is not None:
        end = pd.Timestamp(cfg["end"])
    else:
        end = start + pd.Timedelta(days=float(cfg["n_days"])) - pd.Timedelta(hours=step)
    times = pd.date_range(start, end, freq=f"{step}h")
    if len(times) == 0:
        raise StageError(where, f"era5: empty time range {start} .. {end}")
    return times


# ---------------------------------------------------------------------------------------------------
# source: synthetic

def load_synthetic(cfg: dict[str, Any]) -> xr.Dataset:
    from .era5_synthetic import generate  # numpy-heavy: only for the synthetic source
    times = time_range(cfg)
    syn = cfg.get("synthetic") or {}
    return generate(times, grid_deg=float(syn.get("grid_deg", 5.625)), levels=list(cfg.get("levels") or []),
                    variables=check_variables(cfg.get("variables"), "params.yaml"),
                    seed=int(syn.get("seed", 0)))


# ---------------------------------------------------------------------------------------------------
# source: ARCO-ERA5 (Zarr on GCS)

def open_arco(cfg: dict[str, Any]) -> xr.Dataset:
    """The requested subset of the ARCO-ERA5 store, lazily: nothing but metadata is read here."""
    arco = cfg.get("arco") or {}
    url = arco.get("url", ARCO_URL)
    variables = check_variables(cfg.get("variables"), "params.yaml")
    try:
        ds = xr.open_zarr(url, chunks={}, storage_options=arco.get("storage_options", {"token": "anon"}))
    except Exception as e:  # gcsfs, zarr and fsspec raise many types; all mean "cannot open"
        raise StageError(url, f"cannot open the ARCO Zarr store: {e}") from e
    names = [VARIABLES[v].long_name for v in variables]
    missing = [n for n in names if n not in ds.data_vars]
    if missing:
        raise StageError(url, f"missing requested variables {missing}")
    ds = ds[names]
    ds = _subset_levels(ds, cfg.get("levels"), "level", url)
    ds = _subset_time(ds, time_range(cfg), int(cfg.get("step_hours", 1)), "time", url)
    ds = _subset_area(ds, arco.get("area"), url)
    # uniform chunks, whole in space unless params say otherwise: Zarr needs regular chunks, and the
    # two halves of a box across 0° E arrive as two longitude chunks
    return ds.chunk({**{dim: -1 for dim in ds.dims}, **(arco.get("chunks") or {"time": 6})})


def _subset_levels(ds: xr.Dataset, levels: list[int] | None, dim: str, where: str) -> xr.Dataset:
    if dim not in ds.dims:  # surface variables only
        return ds
    if not levels:
        raise StageError("params.yaml", "era5.levels: upper-air variables need pressure levels")
    have = set(np.asarray(ds[dim].values).tolist())
    missing = [lv for lv in levels if lv not in have]
    if missing:
        raise StageError(where, f"missing requested levels {missing} (has {sorted(have)})")
    return ds.sel({dim: list(levels)})


def _subset_time(ds: xr.Dataset, times: pd.DatetimeIndex, step_hours: int, dim: str,
                 where: str) -> xr.Dataset:
    ds = ds.sel({dim: slice(times[0], times[-1])})
    if ds.sizes[dim] == 0:
        raise StageError(where, f"no data between {times[0]} and {times[-1]}")
    if ds.sizes[dim] > 1:
        native = (ds[dim].values[1] - ds[dim].values[0]) / np.timedelta64(1, "h")
        stride = step_hours / native
        if stride != int(stride) or stride < 1:
            raise StageError(where, f"step_hours={step_hours} is not a multiple of the source's {native:g} h")
        ds = ds.isel({dim: slice(None, None, int(stride))})
    return ds


def _subset_area(ds: xr.Dataset, area: list[float] | None, where: str) -> xr.Dataset:
    """[N, W, S, E] on a 90..-90, 0..360 grid. A box across 0° E is returned with longitudes in
    -180..180 so that it stays one contiguous, increasing axis."""
    if not area:
        return ds
    north, west, south, east = (float(a) for a in area)
    ds = ds.sel(latitude=slice(north, south))
    if east - west < 360:
        w, e = west % 360, east % 360
        if w <= e:
            ds = ds.sel(longitude=slice(w, e))
        else:
            ds = xr.concat([ds.sel(longitude=slice(w, None)), ds.sel(longitude=slice(None, e))], "longitude")
            ds = ds.assign_coords(longitude=((ds.longitude + 180) % 360) - 180)
    if ds.sizes["latitude"] == 0 or ds.sizes["longitude"] == 0:
        raise StageError(where, f"area {area} selects no grid points")
    return ds


# ---------------------------------------------------------------------------------------------------
# source: Copernicus CDS API

def cds_requests(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The CDS request per dataset. CDS takes the product of the year/month/day lists, so a range across
    months asks for a few days too many; `retrieve_cds` trims them."""
    variables = check_variables(cfg.get("variables"), "params.yaml")
    times = time_range(cfg)
    cds = cfg.get("cds") or {}
    fmt = cds.get("data_format", "netcdf")
    if fmt not in ("netcdf", "grib"):
        raise StageError("params.yaml", f"era5.cds.data_format must be netcdf or grib, got {fmt!r}")
    base: dict[str, Any] = {
        "product_type": ["reanalysis"],
        "year": sorted({f"{t:%Y}" for t in times}),
        "month": sorted({f"{t:%m}" for t in times}),
        "day": sorted({f"{t:%d}" for t in times}),
        "time": sorted({f"{t:%H}:00" for t in times}),
        "data_format": fmt,
        "download_format": "unarchived",
    }
    if cds.get("area"):
        base["area"] = [float(a) for a in cds["area"]]  # N, W, S, E
    requests = {}
    upper = [VARIABLES[v].long_name for v in variables if VARIABLES[v].upper]
    surface = [VARIABLES[v].long_name for v in variables if not VARIABLES[v].upper]
    if upper:
        if not cfg.get("levels"):
            raise StageError("params.yaml", "era5.levels: upper-air variables need pressure levels")
        requests[CDS_PRESSURE] = {**base, "variable": upper,
                                  "pressure_level": [str(lv) for lv in cfg["levels"]]}
    if surface:
        requests[CDS_SINGLE] = {**base, "variable": surface}
    return requests


_KEYLIKE = re.compile(r"\b(\d+:)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)


def _configured_keys() -> list[str]:
    """The CDS key as cdsapi would find it (CDSAPI_KEY, else the `key:` line of CDSAPI_RC or
    ~/.cdsapirc), and its secret part after `<UID>:`, longest first: cdsapi sends the two parts
    separately, so a message may echo either."""
    keys = [os.environ.get("CDSAPI_KEY", "")]
    rc = Path(os.environ.get("CDSAPI_RC") or Path.home() / ".cdsapirc")
    try:
        keys += [v.strip() for k, _, v in (line.partition(":") for line in rc.read_text().splitlines())
                 if k.strip() == "key"]
    except (OSError, UnicodeDecodeError):
        pass
    parts = {p for key in keys if key for p in (key, key.partition(":")[2]) if len(p) >= 8}
    return sorted(parts, key=len, reverse=True)


def _scrub(message: str) -> str:
    """Error text from cdsapi may echo configuration: drop the key and anything that looks like one."""
    for key in _configured_keys():
        message = message.replace(key, "***")
    return _KEYLIKE.sub("***", message)


def _scrubbed_log(level: int) -> Callable[..., None]:
    """A cdsapi callback (logging-style arguments) that logs here, scrubbed: cdsapi's own debug line
    on creating a client holds the key."""
    def emit(msg: Any, *args: Any, **_: Any) -> None:
        if log.isEnabledFor(level):
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                text = " ".join(map(str, (msg, *args)))
            log.log(level, "cdsapi: %s", _scrub(text))
    return emit


def _default_client_factory():
    import cdsapi
    return cdsapi.Client(quiet=True, progress=False,
                         **{f"{name}_callback": _scrubbed_log(level) for name, level in
                            (("debug", logging.DEBUG), ("info", logging.INFO), ("warning", logging.WARNING),
                             ("error", logging.ERROR))})


def retrieve_cds(cfg: dict[str, Any], client_factory: Callable[[], Any] | None = None) -> xr.Dataset:
    """Runs the requests into a temporary directory, reads and merges the downloads (loaded in memory)."""
    requests = cds_requests(cfg)
    try:
        client = (client_factory or _default_client_factory)()
    except Exception as e:  # cdsapi raises a bare Exception when no key is configured
        raise StageError("~/.cdsapirc", f"cannot create a CDS API client: {_scrub(str(e))}") from None
    times = time_range(cfg)
    parts = []
    with tempfile.TemporaryDirectory(prefix="era5-cds-") as tmp:
        # a request waits in the CDS queue, then downloads: minutes each, so a bar per request
        for name, request in progress_bar(requests.items(), total=len(requests), desc="era5 CDS requests",
                                          unit="request"):
            target = Path(tmp) / f"{name}.{'nc' if request['data_format'] == 'netcdf' else 'grib'}"
            log.info("CDS request %s: %s", name, request)
            try:
                client.retrieve(name, request, str(target))
            except Exception as e:
                raise StageError(name, f"CDS request failed: {_scrub(str(e))}") from None
            ds = read_file(target, cfg.get("cds", {}).get("ensemble_member", 0))
            tdim = "valid_time" if "valid_time" in ds.dims else "time"
            parts.append(ds.sel({tdim: ds[tdim].isin(times.values)}))
        return _merge(parts, "CDS downloads")


# ---------------------------------------------------------------------------------------------------
# source: local files

def expand_paths(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise StageError(pattern, "no file matches")
        paths += [Path(m) for m in matches]
    return paths


def check_grib_complete(path: Path) -> None:
    """cfgrib skips a truncated last message with only a log line, so walk the messages with ecCodes."""
    import eccodes
    n = 0
    try:
        with open(path, "rb") as fh:
            while (handle := eccodes.codes_grib_new_from_file(fh)) is not None:
                eccodes.codes_release(handle)
                n += 1
    except Exception as e:  # gribapi's PrematureEndOfFileError, ReadError, ...
        raise StageError(path, f"truncated or corrupt GRIB after {n} messages ({type(e).__name__})") from None
    if n == 0:
        raise StageError(path, "no GRIB messages found")


def file_kind(path: Path) -> str:
    """'grib' or 'netcdf' from the file's first bytes (extensions lie)."""
    if not path.is_file():
        raise StageError(path, "file not found")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"GRIB"):
        return "grib"
    if head.startswith((b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF")):
        return "netcdf"
    if path.suffix.lower() in GRIB_SUFFIXES:  # GRIB may follow a header: let ecCodes decide
        return "grib"
    raise StageError(path, "not a GRIB or netCDF file")


def read_file(path: Path, ensemble_member: int | str = 0) -> xr.Dataset:
    """One GRIB or netCDF file, loaded into memory, ensemble members reduced, extra coordinates dropped."""
    kind = file_kind(path)
    try:
        if kind == "grib":
            check_grib_complete(path)
            ds = _open_grib(path)
        else:
            ds = xr.open_dataset(path, engine="netcdf4")
        ds = ds.load()
    except StageError:
        raise
    except Exception as e:  # netCDF4/cfgrib/eccodes raise OSError, ValueError, KeyError, EOFError, ...
        raise StageError(path, f"unreadable {kind} file: {type(e).__name__}: {e}") from None
    ds = _select_member(ds, ensemble_member, path)
    # forecast step, surface level, expver, ... are not needed downstream; valid_time may be the time axis
    extra = [c for c in ds.coords if c not in ds.dims and c != "valid_time"]
    return ds.drop_vars(extra)


def _open_grib(path: Path) -> xr.Dataset:
    kwargs = {"indexpath": ""}
    try:
        return xr.open_dataset(path, engine="cfgrib", backend_kwargs=kwargs)
    except Exception as e:
        # a file mixing level types is several hypercubes; cfgrib.open_datasets splits them
        if type(e).__name__ != "DatasetBuildError":
            raise
        import cfgrib
        return xr.merge(cfgrib.open_datasets(str(path), backend_kwargs=kwargs), compat="override")


def _select_member(ds: xr.Dataset, member: int | str, path: Path) -> xr.Dataset:
    """ERA5 ensemble files (the EDA) have a `number` dim: keep one member, their mean, or all of them
    (as a `member` dim: each member a trajectory of its own)."""
    if "number" not in ds.dims:
        return ds
    if member == "mean":
        return ds.mean("number", keep_attrs=True)
    if member == "all":
        return ds.rename(number="member")
    if not str(member).lstrip("-").isdigit():
        raise StageError("params.yaml", f"era5.files.ensemble_member: expected a member number, mean or all, "
                                        f"got {member!r}")
    if int(member) not in ds["number"].values:
        raise StageError(path, f"has no ensemble member {member} (has {ds['number'].values.tolist()})")
    return ds.sel(number=int(member))


def _merge(parts: list[xr.Dataset], where: str) -> xr.Dataset:
    try:
        # exact: files on different grids or times are a mistake, not something to NaN-pad
        return xr.merge(parts, join="exact", compat="no_conflicts", combine_attrs="drop_conflicts")
    except (ValueError, xr.MergeError) as e:
        raise StageError(where, f"cannot merge: {e}") from None


def select_variables(ds: xr.Dataset, variables: list[str] | None, where: str) -> xr.Dataset:
    """Keeps the source variables that are (aliases of) the requested ERA5 short names."""
    known = {name: short_name(name) for name in ds.data_vars if short_name(name)}
    wanted = variables or sorted(set(known.values()), key=list(VARIABLES).index)
    missing = [v for v in wanted if v not in known.values()]
    if missing:
        raise StageError(where, f"missing requested variables {missing} (found {list(ds.data_vars)})")
    return ds[[name for name, short in known.items() if short in wanted]]


def _has_time_axis(ds: xr.Dataset) -> bool:
    return "valid_time" in ds.dims or "time" in ds.dims


def open_files(cfg: dict[str, Any]) -> xr.Dataset:
    files_cfg = cfg.get("files") or {}
    patterns = files_cfg.get("paths") or []
    if not patterns:
        raise StageError("params.yaml", "era5.files.paths is empty")
    paths = expand_paths(patterns)
    member = files_cfg.get("ensemble_member", 0)
    parts = [read_file(p, member) for p in progress_bar(paths, desc="era5 files", unit="file")]
    for path, part in zip(paths, parts):
        if _has_time_axis(part):  # a one-time file has none; the merged store's axis is checked on write
            check_raw(part, str(path))
    where = ", ".join(map(str, paths))
    variables = check_variables(cfg.get("variables"), "params.yaml") or None
    return select_variables(_merge(parts, where), variables, where)


# ---------------------------------------------------------------------------------------------------
# the stage

def load_source(cfg: dict[str, Any], client_factory: Callable[[], Any] | None = None) -> xr.Dataset:
    source = cfg.get("source", "synthetic")
    if source == "synthetic":
        ds = load_synthetic(cfg)
    elif source == "arco":
        ds = open_arco(cfg)
    elif source == "cds":
        ds = retrieve_cds(cfg, client_factory)
    elif source == "files":
        ds = open_files(cfg)
    else:
        raise StageError("params.yaml", f"era5.source must be synthetic, arco, cds or files, got {source!r}")
    return ds.assign_attrs(source=source)


def write_store(ds: xr.Dataset, out_dir: str | Path, where: str, step_hours: float | None = None) -> None:
    """Writes the store atomically, and publishes it only when what was written passes `check_raw`
    (read back from the temporary store: a lazy ARCO source is read once, not twice). Source encodings
    (netCDF fill values, GRIB/ARCO chunking) are dropped: they do not fit a new Zarr store."""
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}
    with atomic_dir(out_dir) as tmp:
        # an ARCO source is lazy: its chunks are downloaded here, as Dask writes them
        with dask_progress("era5 chunks read + written"):
            ds.to_zarr(tmp, mode="w", consolidated=False)
        check_raw(xr.open_zarr(tmp, consolidated=False, chunks={}), where, step_hours)


def describe_source(cfg: dict[str, Any]) -> str:
    """What an error about the downloaded data names: the files, the store or the requests."""
    source = cfg.get("source", "synthetic")
    if source == "files":
        return ", ".join(map(str, expand_paths((cfg.get("files") or {}).get("paths") or [])))
    if source == "arco":
        return (cfg.get("arco") or {}).get("url", ARCO_URL)
    if source == "cds":
        return " + ".join(cds_requests(cfg))
    return "era5 synthetic source"


def download(cfg: dict[str, Any], out_dir: str | Path = OUT_DIR,
             client_factory: Callable[[], Any] | None = None) -> xr.Dataset:
    """Loads the configured source and writes it to `out_dir`; returns the (possibly lazy) dataset."""
    ds = load_source(cfg, client_factory)
    if not ds.data_vars:
        raise StageError("params.yaml", "era5: no variables selected")
    # the files source keeps the files' own time step; the others were asked for `step_hours`
    step = None if cfg.get("source") == "files" else float(cfg.get("step_hours", 1))
    write_store(ds, out_dir, describe_source(cfg), step)
    return ds


def main(argv: list[str]) -> None:
    profile, argv = pop_profile(argv)  # `--profile samples` reads params.yaml › era5 › samples
    cfg = stage_params("era5", profile)
    out_dir = argv[0] if argv else OUT_DIR
    with naming_profile("era5", profile):
        ds = download(cfg, out_dir)
    print(f"era5: wrote {out_dir} (source {ds.attrs['source']}, {dict(ds.sizes)}, {list(ds.data_vars)})")


if __name__ == "__main__":
    stage_main(main)
