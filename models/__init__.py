"""Plain-PyTorch models, one family per file (`vision`, `weather`), registered by name when the family
is imported: a method imports only its own family, so editing one family leaves the others' methods
untouched (tasks/platform/lineage.py).

    >>> import models.vision
    >>> models.create_model("digits_cnn")
"""
from .registry import create_model, import_families, is_model, list_models, model_family, register_model  # noqa: F401
