"""Forecast scores as WeatherBench 2 defines them, in physical units.

- Latitude weights are the grid cells' areas, normalised to mean 1 over latitude (WB2
  `get_lat_weights`): w_i ∝ sin(φ_i + Δφ/2) − sin(φ_i − Δφ/2), clipped at the poles (irregular rows:
  cells reach halfway to their neighbours; see `lat_weights`).
- RMSE is the square root of the *time-mean* of the latitude-weighted spatial MSE
  (WB2 `RMSESqrtBeforeTimeAvg=False`): sqrt(mean_t mean_ij w_i (f − o)²).
- ACC is computed per forecast time on anomalies against a climatology, then averaged over time:
  ACC_t = Σ w f'o' / sqrt(Σ w f'² · Σ w o'²), with f' = f − c and o' = o − c.

Fields are tensors (..., lat, lon); leading dims are time/sample (and anything else, which is averaged
the same way).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .data import Fields, Normalizer, lead_steps


def lat_weights(lat_deg: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cell-area weights, mean 1, for latitudes in any order (a descending NumPy view included).

    A cell reaches halfway to each neighbouring latitude, and as far beyond the first and last row
    as to their neighbour, clipped at the poles; its area is proportional to sin(top) − sin(bottom).
    On a regular grid that is WB2's sin(φ + Δφ/2) − sin(φ − Δφ/2), computed in exactly that form.
    A regional grid gets the same cell areas normalised to mean 1 over its own rows, so a weighted
    mean over it is the area-weighted mean over the region (what WB2 gives for a region mask).
    """
    lat = torch.tensor(np.array(lat_deg, dtype=np.float64))  # a copy: torch refuses negative strides
    if len(lat) < 2:
        return torch.ones_like(lat)
    gaps = torch.diff(lat).abs()
    if torch.allclose(gaps, gaps[0], rtol=1e-6, atol=0):
        half = gaps[0] / 2
        upper, lower = lat + half, lat - half
    else:  # irregular rows: halfway to each neighbour
        order = torch.argsort(lat)
        s = lat[order]
        mid = (s[1:] + s[:-1]) / 2
        bottom = torch.cat([s[:1] - (s[1] - s[0]) / 2, mid])
        top = torch.cat([mid, s[-1:] + (s[-1] - s[-2]) / 2])
        upper, lower = torch.empty_like(lat), torch.empty_like(lat)
        upper[order], lower[order] = top, bottom
    upper = torch.clamp(upper, max=90.0)
    lower = torch.clamp(lower, min=-90.0)
    w = torch.sin(torch.deg2rad(upper)) - torch.sin(torch.deg2rad(lower))
    return w / w.mean()


def _spatial_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Latitude-weighted mean over the last two dims (lat, lon)."""
    return (x * w.to(x)[:, None]).mean(dim=(-2, -1))


def weighted_rmse(forecast: torch.Tensor, truth: torch.Tensor, lat_deg) -> float:
    """WB2 RMSE: sqrt of the time-mean (over all leading dims) latitude-weighted MSE."""
    mse_t = _spatial_mean((forecast.double() - truth.double()) ** 2, lat_weights(lat_deg))
    return float(mse_t.mean().sqrt())


def weighted_acc(forecast: torch.Tensor, truth: torch.Tensor, climatology: torch.Tensor, lat_deg) -> float:
    """WB2 ACC: per-time anomaly correlation (latitude-weighted, uncentred), averaged over time."""
    w = lat_weights(lat_deg)
    fa, oa = forecast.double() - climatology.double(), truth.double() - climatology.double()
    num = _spatial_mean(fa * oa, w)
    den = torch.sqrt(_spatial_mean(fa ** 2, w) * _spatial_mean(oa ** 2, w))
    return float((num / den.clamp_min(1e-30)).mean())


# ---------------------------------------------------------------------------------------------------
# scoring any predictor in physical units

# WB2's headline variables; those the data have are scored (name, variable, level or None)
HEADLINE = (("z500", "z", 500), ("t850", "t", 850), ("t2m", "t2m", None))
Pair = tuple[torch.Tensor, torch.Tensor]
Predictor = Callable[[torch.Tensor, int], Pair]  # (init indices, lead hours) -> normalised forecast


def headline_index(upper_vars: list[str], levels: list[int], surface_vars: list[str]) -> list[tuple]:
    """(name, "upper"/"surface", channel, level index) for the headline variables present."""
    out = []
    for name, var, level in HEADLINE:
        if level is not None and var in upper_vars and level in levels:
            out.append((name, "upper", upper_vars.index(var), levels.index(level)))
        elif level is None and var in surface_vars:
            out.append((name, "surface", surface_vars.index(var), None))
    return out


def headline(data) -> list[tuple]:
    """The headline variables a ForecastData has."""
    return headline_index(data.norm.upper_vars, data.levels, data.norm.surface_vars)


def score(predict: Predictor, fields: Fields, norm: Normalizer, clim_phys: Pair, lat: np.ndarray,
          leads: list[int], headline: list[tuple], init_stride: int = 1) -> dict[str, float]:
    """`rmse_<var>_<lead>h` and `acc_<var>_<lead>h` over every init time with a verifying truth."""
    cu, cs = clim_phys
    metrics: dict[str, float] = {}
    for lead in leads:
        k = lead_steps(lead, fields.step_hours)
        idx = fields.inits(k)[::init_stride]
        if len(idx) == 0:
            continue
        fu, fs = norm.denorm(*predict(idx, lead))
        tu, ts = norm.denorm(fields.upper[idx + k], fields.surface[idx + k])
        hours = torch.from_numpy((fields.hours[idx.numpy()] + lead) % 24)
        for name, kind, ch, lvl in headline:
            if kind == "upper":
                f, t, c = fu[:, ch, lvl], tu[:, ch, lvl], cu[hours][:, ch, lvl]
            else:
                f, t, c = fs[:, ch], ts[:, ch], cs[hours][:, ch]
            metrics[f"rmse_{name}_{lead}h"] = weighted_rmse(f, t, lat)
            metrics[f"acc_{name}_{lead}h"] = weighted_acc(f, t, c, lat)
    return metrics
