"""Plain-PyTorch models. Importing a family module registers its models and methods."""
from .registry import (Claim, MethodSpec, create_model, get_method, is_model, list_methods,  # noqa: F401
                       list_models, register_method, register_model)
from . import vision, weather  # noqa: F401,E402  (register the digits and ERA5 models and methods)
