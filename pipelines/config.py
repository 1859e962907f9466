"""Typed stage configs: defaults in code, YAML recipes, ``key=value`` overrides.

Every stage config derives from :class:`StageConfig`. :func:`load_config` merges a YAML file and
command-line overrides and validates once; any mistake becomes a :class:`ConfigError` whose message
is one line naming the field, which the CLI prints before exiting with status 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A user mistake in a config, a flag or an input path. Its message is one line."""


class StrictModel(BaseModel):
    """Base for every typed config: unknown fields are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class StageConfig(StrictModel):
    run: str = Field("runs/default", description="run directory: local path or s3://, gs:// URI")
    seed: int = Field(0, description="seed for every random choice the stage makes")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (["a", "b"], 1). Values are parsed as YAML scalars/lists (``[1,2]``, ``true``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip() not in ("null", "~", "None"):
        value = raw
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of field: value")
    return data


def describe_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line naming the first offending field, e.g. ``config field 'model.n_layers': ...``."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(root)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    value = first.get("input")
    shown = f" (got {value!r})" if first["type"] != "extra_forbidden" and not isinstance(value, dict) else ""
    return f"{source} field '{field}': {message}{shown}{extra}"


def build_config(
    cls: type[ConfigT],
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> ConfigT:
    """Defaults <- YAML file <- explicit ``values`` (CLI flags) <- ``key=value`` overrides."""
    tree: dict[str, Any] = read_yaml(yaml_path) if yaml_path else {}
    for key, value in (values or {}).items():
        _set_path(tree, key.split("."), value)
    for item in overrides or []:
        path, value = parse_override(item)
        _set_path(tree, path, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None
