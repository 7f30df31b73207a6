"""Typed YAML for the configuration: nested dicts checked into frozen dataclasses and back, presets
read with their ``extends`` chains, and ``key.sub=value`` overrides. Knows no field of dearli's
configuration (config.py defines those), so every rule here holds for every section alike.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dearli.errors import ConfigError

PRESETS_PACKAGE = "dearli.configs"
PRESET_PARENT_KEY = "extends"  # a preset file may name the preset (or YAML file) it is merged over


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field type, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any spelling Python reads as a number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got str {value!r}") from None
    if annotation is type(None) and value is None:
        return None
    if isinstance(annotation, type) and not (isinstance(value, annotation) and
                                             not (annotation is int and isinstance(value, bool))):
        # YAML reads 1_8 (a partition name) as the number 18: say how to keep it a string.
        hint = " (quote it: YAML reads 1_8 as a number)" if annotation is str and isinstance(value, int) else ""
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}{hint}")
    return value


RETIRED_KEYS = frozenset({"model.backbone.input_size"})  # removed fields: ignored where old files hold them


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested dict, validating every field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # Fields that no longer exist are read past in files written before they went (checkpoints, saved runs).
    values = {k: v for k, v in values.items() if (f"{prefix}.{k}" if prefix else k) not in RETIRED_KEYS}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    instance = cls(**kwargs)
    if hasattr(instance, "validate"):
        instance.validate()
    return instance


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict (YAML-ready) form of a config dataclass."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mapping by mapping (a nested key replaces only itself); inputs unchanged."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: malformed key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    if isinstance(value, (int, float)) and "_" in raw:
        value = raw  # YAML 1.1 reads 1_8 as 18: a partition name such as 1_8 stays the text it is
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _preset_text(path_or_preset: str, relative_to: Path | None) -> tuple[str, str, Path | None]:
    """(YAML text, name for errors, directory of the file or None for a shipped preset)."""
    path = Path(path_or_preset)
    if relative_to is not None and not path.is_absolute() and path.suffix in (".yaml", ".yml"):
        path = relative_to / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path.read_text(), str(path), path.parent
    preset = resources.files(PRESETS_PACKAGE) / f"{path_or_preset}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset {path_or_preset!r}; shipped presets: {', '.join(list_presets())}")
    return preset.read_text(), f"preset {path_or_preset}", None


def read_yaml(path_or_preset: str, relative_to: Path | None = None, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of a preset or YAML file, merged over those of the preset it ``extends`` (if any)."""
    text, source, folder = _preset_text(path_or_preset, relative_to)
    if source in chain:
        raise ConfigError(f"{source}: '{PRESET_PARENT_KEY}' forms a cycle ({' -> '.join(chain + (source,))})")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    parent = values.pop(PRESET_PARENT_KEY, None)
    if parent is None:
        return values
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{source}: '{PRESET_PARENT_KEY}' must name a preset or a YAML file, got {parent!r}")
    return merge(read_yaml(parent, folder, chain + (source,)), values)


def flatten_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"optim.lr": "0.001"}: every leaf as a string (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def require(ok: bool, key: str, problem: str) -> None:
    """A configuration check: ConfigError naming the dotted ``key`` and the ``problem`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {problem}")
