"""The pangu method on the real UK 2 m temperature sample (surface only, regional grid)."""
import models.weather  # noqa: F401  (registers its models)
from ..kinds.forecast.methods import beats_baselines
from . import register_method

register_method(beats_baselines(
    "pangu_uk_t2m",
    "The pangu method on the real samples profile: the UK 2 m temperature month (ERA5, 0.25° "
    "prepared at 0.5°), a surface-only regional Pangu-lite (no longitude wrap).",
    leads=(6, 24), variables=("t2m",)))
