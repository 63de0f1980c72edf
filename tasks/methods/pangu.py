"""Bi et al. 2023, "Accurate medium-range global weather forecasting with 3D neural networks"."""
import models.weather  # noqa: F401  (registers its models)
from ..kinds.forecast.methods import HEADLINE, beats_baselines
from . import register_method

register_method(beats_baselines(
    "pangu", "Pangu-Weather (Bi et al. 2023): 3D Earth-specific transformer; the 6 h and 24 h models "
             "composed by hierarchical temporal aggregation, against persistence and climatology.",
    leads=(6, 24), variables=HEADLINE))
