"""The run's model, built from the config and the data index: `model.kwargs` plus the index's class count."""
from __future__ import annotations

from torch import nn

from distributed.config import Config, ConfigError
from models import get_model


def model_kwargs(cfg: Config, num_classes: int, data_url: str) -> dict:
    """get_model's keyword arguments: model.kwargs plus num_classes from the data index, which must agree."""
    given = cfg.model.kwargs.get("num_classes")
    if given is not None and given != num_classes:
        raise ConfigError(f"model.kwargs.num_classes={given} but the data index {data_url} has {num_classes} "
                          "classes; remove model.kwargs.num_classes (it is taken from the index) or fix data.url")
    return {**cfg.model.kwargs, "num_classes": num_classes}


def build_model(cfg: Config, num_classes: int, data_url: str | None = None) -> nn.Module:
    """The registered model `model.name` with `model_kwargs`; a bad name or argument raises ConfigError."""
    kwargs = model_kwargs(cfg, num_classes, data_url or cfg.data.url)
    try:
        return get_model(cfg.model.name, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model.name={cfg.model.name!r} with model.kwargs={cfg.model.kwargs}: {e}") from e
