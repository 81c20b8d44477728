"""Dataclass configs: YAML presets plus `key=value` overrides, resolved and saved with each run.

A stage's config is a dataclass whose fields carry a one-line `help` in their metadata. A preset
YAML may set any of them; `key=value` overrides come last and win. A relative input path in a
preset is looked up beside the preset first; on the command line, in the current directory. Unknown keys are errors naming
the file (or the override) and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from corral.errors import ConfigError
from corral.fileio import atomic_write_text

ConfigT = TypeVar("ConfigT")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (`lr=2e-4` -> float, `targets=[q_proj,v_proj]` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads `2e-4` as a string; a learning rate written that way is still a number.
        try:
            value = float(value) if _NUMBER.fullmatch(value.strip()) else value
        except ValueError:
            pass
    return key, value


def _coerce(value: Any, annotation: Any, source: str, key: str) -> Any:
    """Check (and gently convert) a value against a field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if errors else f"{source}: key '{key}': invalid value {value!r}"
        )
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: key '{key}': {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, source, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}': expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: key '{key}': expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: key '{key}': expected a string, got {value!r}")
    return value


def _apply(
    values: dict[str, Any],
    cls: type,
    source: str,
    hints: dict[str, Any],
    out: dict[str, Any],
    sources: dict[str, str],
) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.7)
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        out[key] = _coerce(value, hints[key], source, key)
        sources[key] = source


def _blamed_source(message: str, sources: dict[str, str], fallback: str) -> str:
    """Where the keys a validation message names were set (an override, the command line, the
    preset), so the error points at what the user typed; `fallback` when it names none."""
    named = [
        sources[key]
        for key in sorted(sources, key=message.find)
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)
    ]
    return ", ".join(dict.fromkeys(named)) or fallback


def _beside_preset(data: dict[str, Any], cls: type, folder: Path) -> dict[str, Any]:
    """A preset's relative input paths (fields marked `input_path`) are found beside the preset
    when they exist there, so a preset and its data travel together; otherwise they stay as
    written (relative to the current directory, or a hub id)."""
    inputs = {f.name for f in dataclasses.fields(cls) if f.metadata.get("input_path")}
    resolved = dict(data)
    for key in inputs & set(data):
        value = data[key]
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = folder / value
            if candidate.exists():
                resolved[key] = str(candidate)
    return resolved


def load_config(
    cls: type[ConfigT],
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **explicit: Any,
) -> ConfigT:
    """Build `cls` from defaults, then the YAML file, then `explicit` values, then `key=value` overrides."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # key -> where its value came from (the last one wins)
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value")
        _apply(_beside_preset(data, cls, path.parent), cls, str(path), hints, values, sources)
    given = {k: v for k, v in explicit.items() if v is not None}
    _apply(given, cls, "command line", hints, values, sources)
    for text in overrides:
        key, value = parse_override(text)
        _apply({key: value}, cls, f"override {text!r}", hints, values, sources)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        source = _blamed_source(str(exc), sources, str(path or "config"))
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for printing and saving)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, config_to_yaml(config))


def config_help(cls: type) -> str:
    """One line per field: name, default and help text (for `--help` epilogs)."""
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"  {f.name}={default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
