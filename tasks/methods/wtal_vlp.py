"""The WTAL paper's VLP baseline (Zhou et al. 2023, CVPR): a MIL localizer on vision-language features
with the class prompts as its classifier, whose segments the paper observes to be over-complete."""
import models.localization  # noqa: F401  (registers its models)
from ..kinds.localization.methods import single_branch
from . import register_method

register_method(single_branch(
    "wtal_vlp", "A MIL localizer on the vision-language snippet features, classifying by cosine similarity "
                "to the class prompts' text embeddings; claim: the segments that find an action are longer "
                "than it.",
    teacher="wtal_mil_vlp", over_complete=True))
