"""Typed run configuration: dataclasses (schema) loaded strictly from YAML (loader)."""

from megafusion.config.loader import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_cli_overrides,
)
from megafusion.config.schema import (
    DataConfig,
    DiffusionConfig,
    ImageConfig,
    MegaFusionConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    UNetConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ImageConfig",
    "MegaFusionConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "UNetConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_cli_overrides",
]
