"""Synthetic ERA5: fields with ERA5's names, units and layout from a small, learnable dynamical model.

Each field is a climatological background (a function of latitude and pressure, roughly matching ERA5's
zonal means) plus anomalies. The anomalies come from a few latent fields per pressure level, each
evolved hourly by

    a(t+1) = (1 - r) · D(A(a(t))) + sqrt(1 - (1 - r)²) · ε(t)

where A shifts every latitude row east by a persistent zonal wind (exactly, in Fourier space, wrapping
around in longitude), D is a weak diffusion (zonal in Fourier space, meridional by finite differences),
r = 1/90 days⁻¹ relaxes towards a stationary state and ε is smooth, unit-variance noise. So the future is
mostly a deterministic function of the present (a model that learns the advection beats persistence),
with a little unpredictable forcing.

Per pressure level p there are a "stream" field ψ and a "thermal" field θ; the surface has its own θs:
  z   = z̄(φ, p) + Z(p) ψ                      t = t̄(φ, p) + 2.5 θ + 1.5 ψ
  u   = U(φ, p) - S ∂ψ/∂φ                      v = S ∂ψ/∂λ   (stream-function-like, not exact geostrophy)
  q   = q̄(φ, p) exp(0.25 θ)
  t2m = t̄2m(φ) + diurnal + 2 θs + 0.8 ψ_low
  msl = msl̄(φ) + 1.2 Z(p_low) ψ_low             sp = msl (no orography)
  u10, v10 = 0.7 × (u, v) at the lowest level
with the diurnal cycle A(φ) cos(2π (LST - 15 h) / 24), LST = UTC hour + longitude / 15 (peak at 15 h
local solar time). Backgrounds: t̄ follows a 6.5 K/km lapse rate from a surface temperature of
~305 K at the equator to ~258 K at the poles, z̄ is the matching hypsometric height (z500 ≈ 4.9-5.8e4,
z850 ≈ 1.3-1.5e4 m² s⁻²), U is a mid-latitude jet (10 m/s at 850 hPa to 32 m/s at 250 hPa) over weak
tropical easterlies.

Grid: cell centres, latitude 90 - d/2 → -90 + d/2 (descending, as ERA5), longitude 0 → 360 - d; at
5.625° that is WeatherBench's 32 × 64 grid, and block-averaging 2 × 2 cells gives the 11.25° 16 × 32 grid.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..kinds.forecast.schema import VARIABLES
from ..platform.common import StageError

EARTH_RADIUS = 6.371e6          # m
G = 9.80665                     # m s⁻²
P0 = 1013.25                    # hPa
LAPSE = 0.0065                  # K m⁻¹
KAPPA = 287.05 * LAPSE / G      # exponent of T ∝ p^κ for a constant lapse rate (≈ 0.19)
RELAX_PER_HOUR = 1.0 / (90 * 24)
MERIDIONAL_DIFFUSION = 0.02     # per hour, of the 1-2-1 Laplacian (stable below 0.5)
ZONAL_DAMPING_HOURS = 24.0      # e-folding time of the shortest zonal wave
NOISE_MAX_WAVENUMBER = 6        # the forcing is large-scale
SURFACE_WIND_FACTOR = 0.7
WIND_SCALE = 1.5                # S: m s⁻¹ per unit ψ gradient (per radian)


def grid(grid_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre latitudes (descending) and longitudes (ascending from 0) for a d-degree grid."""
    n_lat, n_lon = 180 / grid_deg, 360 / grid_deg
    if abs(n_lat - round(n_lat)) > 1e-9 or abs(n_lon - round(n_lon)) > 1e-9:
        raise StageError("params.yaml", f"era5.synthetic.grid_deg={grid_deg} does not divide 180 and 360")
    lat = 90 - grid_deg / 2 - grid_deg * np.arange(round(n_lat))
    lon = grid_deg * np.arange(round(n_lon))
    return lat, lon


# ---------------------------------------------------------------------------------------------------
# climatological backgrounds (φ latitude in degrees, p pressure in hPa)

def surface_temperature(lat: np.ndarray) -> np.ndarray:
    """Surface air temperature of the lapse-rate profile: t850 is 295 K at the equator, 250 K at the poles."""
    t850 = 295.0 - 45.0 * np.sin(np.radians(lat)) ** 2
    return t850 * (P0 / 850.0) ** KAPPA


def temperature(lat: np.ndarray, level: float) -> np.ndarray:
    """Constant lapse rate up to a 200 K floor (a crude stratosphere)."""
    return np.maximum(surface_temperature(lat) * (level / P0) ** KAPPA, 200.0)


def geopotential(lat: np.ndarray, level: float) -> np.ndarray:
    """Hypsometric geopotential of the lapse-rate atmosphere over a 1013.25 hPa surface."""
    return G * surface_temperature(lat) / LAPSE * (1 - (level / P0) ** KAPPA)


def zonal_wind(lat: np.ndarray, level: float) -> np.ndarray:
    """Mid-latitude jets strengthening with height, weak easterlies in the tropics (m s⁻¹)."""
    jet = 10 + 22 * np.clip(np.log(850 / level) / np.log(850 / 250), 0, 1.3)
    return jet * np.exp(-(((np.abs(lat) - 40) / 15) ** 2)) - 6 * np.exp(-((lat / 15) ** 2)) * level / 1000


def humidity(lat: np.ndarray, level: float) -> np.ndarray:
    return 0.02 * (level / 1000) ** 2.5 * (0.08 + 0.92 * np.exp(-((lat / 35) ** 2)))


def t2m_background(lat: np.ndarray) -> np.ndarray:
    s = np.sin(np.radians(lat))
    return 300 - 50 * s**2 - 12 * s**4 * (lat < 0)  # Antarctica colder than the Arctic


def msl_background(lat: np.ndarray) -> np.ndarray:
    """Equatorial trough, subtropical highs, subpolar lows, polar highs."""
    return 101325 - 800 * np.cos(np.radians(6 * lat))


def z_amplitude(level: float) -> float:
    """Geopotential anomaly per unit ψ (m² s⁻²): larger aloft."""
    return 300 + 1500 * (1 - np.sqrt(level / P0))


def diurnal_cycle(lat: np.ndarray, lon: np.ndarray, times: pd.DatetimeIndex) -> np.ndarray:
    """(T, lat, lon) t2m anomaly peaking at 15 h local solar time, a few K, largest in the tropics."""
    utc = np.asarray(times.hour + times.minute / 60, dtype=float)
    lst = (utc[:, None, None] + lon[None, None, :] / 15.0) % 24
    amplitude = 1 + 3 * np.cos(np.radians(lat))[None, :, None]
    return amplitude * np.cos(2 * np.pi * (lst - 15) / 24)


# ---------------------------------------------------------------------------------------------------
# the dynamics

def advect(field: np.ndarray, lat: np.ndarray, u: np.ndarray, hours: float) -> np.ndarray:
    """Shifts each latitude row of `field` (..., lat, lon) east by u·hours (u: (..., lat) m s⁻¹), exactly
    and periodically, by a phase shift of its zonal Fourier modes."""
    n_lon = field.shape[-1]
    k = np.fft.rfftfreq(n_lon, d=1.0 / n_lon)                    # zonal wavenumbers 0..n/2
    shift = u * hours * 3600 / (EARTH_RADIUS * np.cos(np.radians(lat)))  # radians of longitude
    phase = np.exp(-1j * k * shift[..., None])
    return np.fft.irfft(np.fft.rfft(field, axis=-1) * phase, n=n_lon, axis=-1)


class Dynamics:
    """Advection-diffusion-relaxation of the latent fields (F, lat, lon), one hour per step."""

    def __init__(self, lat: np.ndarray, n_lon: int, winds: np.ndarray, rng: np.random.Generator) -> None:
        self.lat, self.n_lon, self.rng = lat, n_lon, rng
        k = np.fft.rfftfreq(n_lon, d=1.0 / n_lon)
        shift = winds * 3600 / (EARTH_RADIUS * np.cos(np.radians(lat)))          # (F, lat) per hour
        damping = np.exp(-(k / k.max()) ** 2 / ZONAL_DAMPING_HOURS)             # shortest wave: e⁻¹/day
        self.propagator = np.exp(-1j * k * shift[..., None]) * damping          # (F, lat, k)
        self.keep = (1 - RELAX_PER_HOUR)
        self.kick = np.sqrt(1 - self.keep**2)

    def smooth_noise(self, n_fields: int) -> np.ndarray:
        """Unit-variance random fields with zonal wavenumbers ≤ 6, smoothed in latitude."""
        n_lat, n_k = len(self.lat), self.n_lon // 2 + 1
        spec = np.zeros((n_fields, n_lat, n_k), complex)
        kmax = min(NOISE_MAX_WAVENUMBER, n_k - 1) + 1
        spec[..., :kmax] = self.rng.standard_normal((n_fields, n_lat, kmax, 2)) @ np.array([1, 1j])
        field = np.fft.irfft(spec, n=self.n_lon, axis=-1)
        for _ in range(3):
            field = _meridional_smooth(field, 0.25)
        field -= field.mean(axis=(-2, -1), keepdims=True)
        return field / field.std(axis=(-2, -1), keepdims=True)

    def step(self, state: np.ndarray) -> np.ndarray:
        advected = np.fft.irfft(np.fft.rfft(state, axis=-1) * self.propagator, n=self.n_lon, axis=-1)
        diffused = _meridional_smooth(advected, MERIDIONAL_DIFFUSION)
        return self.keep * diffused + self.kick * self.smooth_noise(len(state))


def _meridional_smooth(field: np.ndarray, weight: float) -> np.ndarray:
    """field + weight · (1-2-1 Laplacian in latitude); the pole rows reflect (no flux across the poles)."""
    padded = np.concatenate([field[..., :1, :], field, field[..., -1:, :]], axis=-2)
    return field + weight * (padded[..., 2:, :] - 2 * field + padded[..., :-2, :])


def simulate(lat: np.ndarray, n_lon: int, winds: np.ndarray, n_hours: int, every: int,
             rng: np.random.Generator, shared: np.ndarray) -> np.ndarray:
    """Latent fields (T, F, lat, lon) every `every` hours for T = n_hours / every outputs. `shared` (F,) is
    the weight of a common initial pattern, so that levels start vertically correlated."""
    dyn = Dynamics(lat, n_lon, winds, rng)
    common = dyn.smooth_noise(1)
    own = dyn.smooth_noise(len(winds))
    state = shared[:, None, None] * common + np.sqrt(1 - shared**2)[:, None, None] * own
    out = np.empty((n_hours // every, len(winds), len(lat), n_lon), np.float32)
    for hour in range(n_hours):
        if hour % every == 0:
            out[hour // every] = state
        state = dyn.step(state)
    return out


# ---------------------------------------------------------------------------------------------------
# the ERA5-schema dataset

def generate(times: pd.DatetimeIndex, grid_deg: float = 5.625, levels: list[float] = (850, 500, 250),
             variables: list[str] = ("z", "t", "u", "v", "t2m", "msl", "u10", "v10"),
             seed: int = 0) -> xr.Dataset:
    """The dataset for `times` (a regular, whole-hour step): ERA5 short names, float32, ERA5 attributes."""
    step = _step_hours(times)
    lat, lon = grid(grid_deg)
    upper = [v for v in variables if VARIABLES[v].upper]
    if upper and not levels:
        raise StageError("params.yaml", "era5.levels: upper-air variables need pressure levels")
    # latent fields: ψ and θ per level, then θs; the lowest level drives the surface (850 hPa if none)
    plevs = [float(p) for p in (levels or [850])]
    low = int(np.argmax(plevs))
    winds_u = np.stack([zonal_wind(lat, p) for p in plevs])                        # (L, lat)
    winds = np.concatenate([winds_u, winds_u, SURFACE_WIND_FACTOR * winds_u[low:low + 1]])
    shared = np.concatenate([np.full(len(plevs), 0.8), np.full(len(plevs), 0.6), [0.5]])
    rng = np.random.default_rng(seed)
    latent = simulate(lat, len(lon), winds, len(times) * step, step, rng, shared)  # (T, 2L+1, lat, lon)
    L = len(plevs)
    psi, theta, theta_s = latent[:, :L], latent[:, L:2 * L], latent[:, 2 * L]

    fields = _upper_fields(psi, theta, lat, plevs)
    fields.update(_surface_fields(psi[:, low], theta_s, fields, lat, lon, times, plevs[low], low))
    coords = {
        "time": times.values.astype("datetime64[ns]"),
        "level": ("level", np.asarray(levels or [], dtype=np.int64),
                  {"units": "millibars", "long_name": "pressure_level"}),
        "latitude": ("latitude", lat, {"units": "degrees_north", "long_name": "latitude"}),
        "longitude": ("longitude", lon, {"units": "degrees_east", "long_name": "longitude"}),
    }
    data_vars = {}
    for name in variables:
        upper_var = VARIABLES[name].upper
        dims = ("time", "level", "latitude", "longitude") if upper_var else ("time", "latitude", "longitude")
        attrs = {"units": VARIABLES[name].units, "long_name": VARIABLES[name].title}
        data_vars[name] = (dims, fields[name].astype(np.float32), attrs)
    ds = xr.Dataset(data_vars, coords)
    if not upper:
        ds = ds.drop_vars("level")
    return ds.assign_attrs(title="synthetic ERA5 (advection-diffusion model)", seed=seed, grid_deg=grid_deg)


def _step_hours(times: pd.DatetimeIndex) -> int:
    if len(times) < 2:
        return 1
    steps = np.diff(times.values) / np.timedelta64(1, "h")
    if not np.all(steps == steps[0]) or steps[0] != int(steps[0]) or steps[0] < 1:
        raise StageError("params.yaml", "era5: synthetic data needs a regular step of whole hours")
    return int(steps[0])


def _upper_fields(psi: np.ndarray, theta: np.ndarray, lat: np.ndarray,
                  plevs: list[float]) -> dict[str, np.ndarray]:
    """(T, L, lat, lon) z, t, u, v, q from the latent fields (T, L, lat, lon)."""
    def per_level(fn):  # background (L, lat, 1) to broadcast over time and longitude
        return np.stack([fn(lat, p) for p in plevs])[None, :, :, None]
    z_amp = np.array([z_amplitude(p) for p in plevs])[None, :, None, None]
    dpsi_dlat = np.gradient(psi, np.radians(lat), axis=-2)
    dlon = 2 * np.pi / psi.shape[-1]
    dpsi_dlon = (np.roll(psi, -1, axis=-1) - np.roll(psi, 1, axis=-1)) / (2 * dlon)  # periodic
    return {
        "z": per_level(geopotential) + z_amp * psi,
        "t": per_level(temperature) + 2.5 * theta + 1.5 * psi,
        "u": per_level(zonal_wind) - WIND_SCALE * dpsi_dlat,
        "v": WIND_SCALE * dpsi_dlon,
        "q": np.clip(per_level(humidity) * np.exp(0.25 * theta), 0, 0.02),
    }


def _surface_fields(psi_low, theta_s, upper, lat, lon, times, p_low, low) -> dict[str, np.ndarray]:
    lat3 = lat[None, :, None]
    t2m = t2m_background(lat3) + diurnal_cycle(lat, lon, times) + 2 * theta_s + 0.8 * psi_low
    msl = msl_background(lat3) + 1.2 * z_amplitude(p_low) * psi_low
    # the rare 4-sigma excursions are clipped to stay within ERA5's observed ranges
    t2m, msl = np.clip(t2m, 220, 310), np.clip(msl, 96000, 105000)
    return {
        "t2m": t2m, "msl": msl, "sp": msl,
        "u10": SURFACE_WIND_FACTOR * upper["u"][:, low], "v10": SURFACE_WIND_FACTOR * upper["v"][:, low],
    }
