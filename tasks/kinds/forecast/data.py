"""The forecast kind's data: prepared ERA5 splits as normalised tensors, and the forecast pairs a lead
time trains on.

Fields are z-scored with the training-period statistics of `era5_prepare` and go through a model as
(upper (B, V, L, H, W), surface (B, S, H, W)). A forecast pair is (state at t, state at t + lead);
with ensemble members, the members are trajectories of their own and no pair crosses from one to
the next.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import BatchedDataset
from .schema import load_prepared, surface_vars, upper_vars

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Fields:
    """One split as normalised tensors, with what scoring needs to go back to physical units.

    Rows are states in time order; an ensemble's members are trajectories of their own, stored one
    after another (member-major), so a forecast pair (row i, row i + k) must not cross from one
    trajectory into the next: `inits(k)` lists the rows where it does not."""
    upper: torch.Tensor        # (N, V, L, H, W)
    surface: torch.Tensor      # (N, S, H, W)
    hours: np.ndarray          # (N,) hour of day (UTC) of each state, to index the climatology
    step_hours: int
    trajectory: np.ndarray | None = None  # (N,) which trajectory (ensemble member) each row is in

    def inits(self, k: int) -> torch.Tensor:
        """Rows whose state k steps later is in the same trajectory: the valid forecast inits."""
        n = len(self.hours) - k
        if n <= 0:
            return torch.zeros(0, dtype=torch.long)
        if self.trajectory is None:
            return torch.arange(n)
        return torch.from_numpy(np.flatnonzero(self.trajectory[:n] == self.trajectory[k:]))


class Normalizer:
    """z-scores per variable (and level) with the training-period statistics."""

    def __init__(self, stats: dict[str, Any], upper_vars: list[str], surface_vars: list[str]) -> None:
        self.upper_vars, self.surface_vars = upper_vars, surface_vars
        def arr(var, key, shape):
            return torch.tensor(np.asarray(stats[var][key], dtype=np.float32)).reshape(shape)
        # surface-only (upper-air-only) data: an empty (0, 1, 1, 1) ((0, 1, 1)) scale broadcasts
        # against the empty tensor
        empty_u, empty_s = torch.zeros(0, 1, 1, 1), torch.zeros(0, 1, 1)
        self.u_mean = torch.stack([arr(v, "mean", (-1, 1, 1)) for v in upper_vars]) if upper_vars else empty_u
        self.u_std = torch.stack([arr(v, "std", (-1, 1, 1)) for v in upper_vars]) if upper_vars else empty_u + 1
        self.s_mean = torch.stack([arr(v, "mean", (1, 1)) for v in surface_vars]) if surface_vars else empty_s
        self.s_std = torch.stack([arr(v, "std", (1, 1)) for v in surface_vars]) if surface_vars else empty_s + 1

    def norm(self, upper: torch.Tensor, surface: torch.Tensor) -> Pair:
        return (upper - self.u_mean) / self.u_std, (surface - self.s_mean) / self.s_std

    def denorm(self, upper: torch.Tensor, surface: torch.Tensor) -> Pair:
        return upper * self.u_std + self.u_mean, surface * self.s_std + self.s_mean


def _rows(ds, var: str, dims: tuple[str, ...]) -> np.ndarray:
    """`var` as (rows, *dims): member-major when the data have ensemble members."""
    leading = ("member", "time") if "member" in ds.dims else ("time",)
    x = ds[var].transpose(*leading, *dims).values
    return x.reshape(-1, *x.shape[len(leading):])


def dataset_tensors(ds, upper_vars: list[str], surface_vars: list[str]) -> Pair:
    """(N, V, L, H, W) and (N, S, H, W) float32 tensors in physical units (V = L = 0 without upper air,
    S = 0 without surface variables); N = members x times."""
    grid = ("latitude", "longitude")
    upper = [_rows(ds, v, ("level", *grid)) for v in upper_vars]
    surface = [_rows(ds, v, grid) for v in surface_vars]
    n, h, w = (upper or surface)[0].shape[0], ds.sizes["latitude"], ds.sizes["longitude"]
    upper_t = np.stack(upper, 1) if upper else np.zeros((n, 0, 0, h, w), np.float32)
    surface_t = np.stack(surface, 1) if surface else np.zeros((n, 0, h, w), np.float32)
    return torch.from_numpy(upper_t.astype(np.float32)), torch.from_numpy(surface_t.astype(np.float32))


def to_fields(ds, norm: Normalizer, step_hours: int) -> Fields:
    upper, surface = norm.norm(*dataset_tensors(ds, norm.upper_vars, norm.surface_vars))
    hours = ds["time"].dt.hour.values.astype(np.int64)
    if "member" not in ds.dims:
        return Fields(upper, surface, hours, step_hours)
    members = ds.sizes["member"]
    return Fields(upper, surface, np.tile(hours, members), step_hours,
                  trajectory=np.repeat(np.arange(members), len(hours)))


def lead_steps(lead_hours: int, step_hours: int) -> int:
    if lead_hours % step_hours:
        raise ValueError(f"lead {lead_hours} h is not a multiple of the data's {step_hours} h step")
    return lead_hours // step_hours


@dataclass
class ForecastData:
    train: Fields
    val: Fields
    test: Fields
    norm: Normalizer
    clim_phys: Pair
    lat: np.ndarray
    levels: list[int]
    meta: dict[str, Any]
    global_lon: bool = True   # the grid closes round the globe in longitude

    def example(self) -> Pair:
        return self.train.upper[:1], self.train.surface[:1]


def longitude_layout(lon: np.ndarray) -> tuple[bool, int]:
    """(whether the grid spans the globe, the roll that makes a regional grid contiguous).

    Prepared data keeps longitudes ascending in [0, 360), so a box across 0° E (the UK samples) is
    stored as 0.125..1.625 then 350.125..359.625: neighbours in the array are not neighbours on Earth
    unless the columns are rolled to start after the gap.
    """
    gaps = np.diff(lon)
    spacing = float(gaps.min()) if len(gaps) else 360.0
    if abs(len(lon) * spacing - 360.0) < 1e-6 * 360.0:
        return True, 0
    wrap_gap = lon[0] + 360.0 - lon[-1]   # from the last column round to the first
    inner = int(np.argmax(gaps))
    return False, (inner + 1 if gaps[inner] > wrap_gap else 0)


def load_forecast_data(data_dir: str, validate: bool = False) -> ForecastData:
    """The prepared splits as tensors. Every task of a flow reads the same store, so the result is
    kept per process, keyed on the store's path and its meta.json (rewritten by every prepare);
    validation always runs when asked for. Callers must not modify the tensors in place."""
    meta = Path(data_dir) / "meta.json"
    stamp = meta.stat().st_mtime_ns if meta.is_file() else None
    if validate or stamp is None:
        load_prepared(data_dir, validate=validate)  # raises the clear StageError on bad input
    return _load_forecast_data(str(Path(data_dir).resolve()), stamp)


@functools.lru_cache(maxsize=2)
def _load_forecast_data(data_dir: str, stamp: int | None) -> ForecastData:
    d = load_prepared(data_dir, validate=False)
    global_lon, shift = longitude_layout(d["train"]["longitude"].values)
    if shift:  # a regional box across 0° E: make its columns contiguous in space
        d = {k: v.roll(longitude=-shift, roll_coords=True) if k in ("train", "val", "test", "climatology") else v
             for k, v in d.items()}
    up, sf = upper_vars(d["train"]), surface_vars(d["train"])
    norm = Normalizer(d["stats"], up, sf)
    step = int(d["meta"]["step_hours"])
    clim = d["climatology"]
    cu, cs = dataset_tensors(clim.rename(hour="time"), up, sf)  # (24, V, L, H, W), (24, S, H, W)
    return ForecastData(train=to_fields(d["train"], norm, step), val=to_fields(d["val"], norm, step),
                        test=to_fields(d["test"], norm, step), norm=norm,
                        clim_phys=(cu, cs), lat=d["train"]["latitude"].values,
                        levels=[int(x) for x in d["train"]["level"].values] if up else [],
                        meta=d["meta"], global_lon=global_lon)


class ForecastPairs(BatchedDataset):
    """The (input state, state `lead_hours` later) pairs of one split. Item i is the i-th valid
    initial time; a batch is ((upper, surface), {"upper", "surface"} targets, positions)."""

    def __init__(self, fields: Fields, lead_hours: int) -> None:
        self.fields, self.k = fields, lead_steps(lead_hours, fields.step_hours)
        self.inits = fields.inits(self.k)
        if len(self.inits) == 0:
            raise ValueError(f"split has {len(fields.hours)} states, too few for a {lead_hours} h lead")

    def __len__(self) -> int:
        return len(self.inits)

    def __getitems__(self, pos: torch.Tensor) -> tuple[Pair, dict[str, torch.Tensor], torch.Tensor]:
        pos = torch.as_tensor(pos)
        idx = self.inits[pos]
        f = self.fields
        return (f.upper[idx], f.surface[idx]), {"upper": f.upper[idx + self.k], "surface": f.surface[idx + self.k]}, pos
