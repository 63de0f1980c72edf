"""Forecast scores as WeatherBench 2 defines them, in physical units.

- Latitude weights are the grid cells' areas, normalised to mean 1 over latitude (WB2
  `get_lat_weights`): w_i ∝ sin(φ_i + Δφ/2) − sin(φ_i − Δφ/2), clipped at the poles.
- RMSE is the square root of the *time-mean* of the latitude-weighted spatial MSE
  (WB2 `RMSESqrtBeforeTimeAvg=False`): sqrt(mean_t mean_ij w_i (f − o)²).
- ACC is computed per forecast time on anomalies against a climatology, then averaged over time:
  ACC_t = Σ w f'o' / sqrt(Σ w f'² · Σ w o'²), with f' = f − c and o' = o − c.

Fields are tensors (..., lat, lon); leading dims are time/sample (and anything else, which is averaged
the same way).
"""
from __future__ import annotations

import numpy as np
import torch


def lat_weights(lat_deg: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cell-area weights for a regular latitude grid (any order), mean 1."""
    lat = torch.as_tensor(np.asarray(lat_deg, dtype=np.float64))
    if len(lat) < 2:
        return torch.ones_like(lat)
    half = torch.abs(lat[1] - lat[0]) / 2
    upper = torch.clamp(lat + half, max=90.0)
    lower = torch.clamp(lat - half, min=-90.0)
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
