"""The model registry, in the manner of timm's `register_model` / `create_model`.

A *model* is an entrypoint function that returns an `nn.Module`; its name is the function's name and
its family is the module that defines it (`vision`, `weather`). Methods, which name their models here,
are declared in `tasks/methods/`.

    >>> from models import create_model
    >>> teacher = create_model("digits_cnn")
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch.nn as nn

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


# ---------------------------------------------------------------------------------------------------
# models

def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers `fn` under its own name as a model entrypoint."""
    name = fn.__name__
    if name in _model_entrypoints:
        warnings.warn(f"model entrypoint {name!r} registered twice; the later one wins", stacklevel=2)
    _model_entrypoints[name] = fn
    return fn


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model. A kwarg given as None means "use the entrypoint's default"."""
    if name not in _model_entrypoints:
        raise RuntimeError(f"unknown model {name!r}; registered: {sorted(_model_entrypoints)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _model_entrypoints[name](**kwargs)


def import_families() -> list[str]:
    """Imports every family module of this package (registering all its models); returns their names."""
    import importlib
    import pkgutil
    from pathlib import Path
    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if m.name not in ("registry", "distill")]
    for name in names:
        importlib.import_module(f"{__package__}.{name}")
    return names


def list_models(filter: str = "") -> list[str]:
    return sorted(n for n in _model_entrypoints if filter in n)


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def model_family(name: str) -> str:
    """The file of `models/` that defines entrypoint `name`, e.g. "vision" for models/vision.py."""
    if name not in _model_entrypoints:
        raise RuntimeError(f"unknown model {name!r}; registered: {sorted(_model_entrypoints)}")
    return _model_entrypoints[name].__module__.rpartition(".")[2]
