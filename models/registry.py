"""Model registry: a plain dict from snake_case factory name to factory (as torchvision's `_api.py`)."""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register `fn` under its own name; registering a name twice raises (it would silently shadow)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def get_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build the registered model `name`, freshly initialised (no pretrained weights exist offline)."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return factory(num_classes=num_classes, **kwargs)
