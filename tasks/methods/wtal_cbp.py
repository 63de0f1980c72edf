"""The WTAL paper's CBP baseline (Zhou et al. 2023, CVPR): a MIL localizer on classification-pretrained
features alone, whose segments the paper observes to be incomplete."""
import models.localization  # noqa: F401  (registers its models)
from ..kinds.localization.methods import single_branch
from . import register_method

register_method(single_branch(
    "wtal_cbp", "A MIL localizer (CAS + foreground attention, top-k pooling) on the classification-"
                "pretrained snippet features; claim: the segments that find an action are shorter than it.",
    teacher="wtal_mil_cbp", over_complete=False))
