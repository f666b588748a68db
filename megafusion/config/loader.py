"""Strict YAML -> dataclass loading with dotted overrides.

Hand-written rather than OmegaConf/dacite: neither reports the YAML file together with the dotted key,
nor accepts YAML 1.1's `1e-4` (a string to PyYAML) for float fields, and both are needed here."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, Union

import yaml

from megafusion.config.schema import MegaFusionConfig

T = TypeVar("T")

# The repository's configs/ folder, installed as package data (pyproject.toml maps it to this package).
PACKAGED_CONFIGS = "megafusion.configs"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """A configuration problem; the message names the file (or command line) and the dotted key."""


def packaged_config_dir() -> Path:
    """Where the shipped configs are: `configs/` of a checkout (editable install) or of the installed wheel."""
    root = resources.files(PACKAGED_CONFIGS)
    # Both installs keep them as plain files; callers (DeepSpeed, subprocesses) need a real path, not a stream.
    if not isinstance(root, Path):
        raise ConfigError(f"{PACKAGED_CONFIGS}: packaged configs are not plain files here ({root!r})")
    return root


def packaged_configs() -> list[str]:
    """The names `--config NAME` accepts: every shipped run YAML without `.yaml` (e.g. `demo-digits`)."""
    return sorted(p.stem for p in packaged_config_dir().glob("*.yaml"))


def packaged_deepspeed_configs() -> list[str]:
    """The shipped DeepSpeed templates as `train.deepspeed_config` accepts them (e.g. `deepspeed/zero3.json`)."""
    root = packaged_config_dir()
    return sorted(p.relative_to(root).as_posix() for p in (root / "deepspeed").glob("*.json"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """The config file `name_or_path` names: the file itself when it exists, else a packaged config.

    Packaged ones are found by name (`demo-digits`, `demo-digits.yaml`, `deepspeed/zero3.json`) or by their
    path in a checkout (`configs/tiny-cpu.yaml`, `configs/deepspeed/zero3.json`), so the commands in the README
    work from any directory with an installed wheel. A file in the working directory wins over a packaged one.
    Raises ConfigError listing the packaged names."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    rel = PurePosixPath(os.fspath(name_or_path).replace(os.sep, "/"))
    if rel.parts[:1] == ("configs",):
        rel = PurePosixPath(*rel.parts[1:])
    if rel.parts and not rel.is_absolute() and ".." not in rel.parts:
        root = packaged_config_dir()
        candidates = [rel] if rel.suffix in CONFIG_SUFFIXES else [rel, rel.with_name(rel.name + ".yaml")]
        for candidate in candidates:
            if (root / candidate).is_file():
                return root / candidate
    raise ConfigError(
        f"{os.fspath(name_or_path)}: no such config file, and not a packaged config; packaged: "
        f"{', '.join(packaged_configs())} (run configs), {', '.join(packaged_deepspeed_configs())} (DeepSpeed)"
    )


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key, source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}': expected one of {list(args)}, got {_describe(value)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {_describe(value)}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}': expected true/false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}': expected an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}': expected a number, got {_describe(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected a number, got {_describe(value)}")
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}': expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{source}: key '{key}': unsupported field type {annotation!r}")


def _build(cls: type[T], data: Any, prefix: str, source: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: key '{prefix or '<root>'}': expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            dotted = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(
                f"{source}: unknown key '{dotted}' (known keys{' under ' + repr(prefix) if prefix else ''}: "
                f"{', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted, source)
    try:
        return cls(**kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        name, _, reason = str(err).partition(": ")
        raise ConfigError(f"{source}: key '{prefix + '.' if prefix else ''}{name}': {reason}") from err


def parse_cli_overrides(args: list[str]) -> dict[str, Any]:
    """`--optim.lr_image=2e-4` / `optim.lr_image=2e-4` -> {"optim.lr_image": 2e-4} (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    for arg in args:
        text = arg[2:] if arg.startswith("--") else arg
        if "=" not in text:
            raise ConfigError(f"command line: override '{arg}' must look like --section.key=value")
        key, raw = text.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
    return overrides


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], root: type = MegaFusionConfig) -> dict:
    """Set dotted keys in a raw config mapping; the key must exist in the schema."""
    for dotted, value in overrides.items():
        cls: Any = root
        node = data
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            known = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
            if part not in known:
                raise ConfigError(
                    f"command line: unknown key '{dotted}' ('{'.'.join(parts[: depth + 1])}' is not in the schema)"
                )
            if depth == len(parts) - 1:
                node[part] = value
            else:
                cls = typing.get_type_hints(cls)[part]
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                node = child
    return data


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    root: type[T] = MegaFusionConfig,
) -> T:
    """Load and validate a config (a YAML path or a packaged name, see resolve_config_path); raises ConfigError
    naming the file and dotted key on any problem."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config file: {err.strerror}") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: invalid YAML: {err}") from err
    if isinstance(overrides, list):
        overrides = parse_cli_overrides(overrides)
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
        apply_overrides(data, overrides, root)
        source = f"{source} (with command-line overrides)"
    return _build(root, data, "", source)


def config_from_dict(data: dict[str, Any], source: str = "dict", root: type[T] = MegaFusionConfig) -> T:
    """The same strict validation as load_config, for a config stored elsewhere (e.g. in a checkpoint)."""
    return _build(root, data, "", source)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
