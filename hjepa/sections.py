"""The config sections as the typed configs the library's builders take: the one place where settings
become ModelConfig, MaskConfig, OptimConfig and DataConfig.

Kept apart from hjepa.config, which only declares and loads settings and stays free of torch and
FFCV imports: tools that read no model or data (writers' --help, eval/export.py) start without them.
"""
import dataclasses

from hjepa.loaders import DataConfig
from hjepa.masks import MaskConfig
from hjepa.model import ModelConfig
from hjepa.schedules import OptimConfig


def section_dataclass(cfg, section, cls, **values):
    """An instance of dataclass `cls` whose fields take the values of the same-named params of `section`
    (fields given in `values`, e.g. ones another section holds, take those). The one place where
    settings become typed arguments: a new hyperparameter is a param declared in hjepa.config and a field."""
    for field in dataclasses.fields(cls):
        if field.name not in values:
            values[field.name] = cfg[f"{section}.{field.name}"]
    return cls(**values)


def model_config(cfg):
    """hjepa.model.ModelConfig from the model section (and data.image_size)."""
    return section_dataclass(cfg, "model", ModelConfig, image_size=cfg["data.image_size"])


def mask_config(cfg):
    """hjepa.masks.MaskConfig from the masking section."""
    return section_dataclass(cfg, "masking", MaskConfig)


def optim_config(cfg):
    """hjepa.schedules.OptimConfig from the optim section."""
    return section_dataclass(cfg, "optim", OptimConfig)


def data_config(cfg):
    """hjepa.loaders.DataConfig from the data section."""
    return section_dataclass(cfg, "data", DataConfig)
