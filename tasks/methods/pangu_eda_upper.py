"""The pangu method on the real ERA5 ensemble-of-data-assimilations sample (upper air only)."""
import models.weather  # noqa: F401  (registers its models)
from ..kinds.forecast.methods import beats_baselines
from . import register_method

register_method(beats_baselines(
    "pangu_eda_upper",
    "The pangu method on the real ERA5 ensemble-of-data-assimilations sample: z and t at 500/850 hPa, "
    "10 members x 4 analyses 12 h apart (3°, prepared at 6°), an upper-air-only Pangu-lite with one "
    "12 h model; members are trajectories of their own, and the time split shares its boundary steps "
    "(embargo 0) because 4 steps cannot spare a gap.",
    leads=(12,), variables=("z500", "t850")))
