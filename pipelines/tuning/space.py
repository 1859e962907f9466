"""A search space spelled in YAML over a stage's config fields, turned into Ray Tune's sampling objects.

```yaml
train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
train.schedule.warmup_fraction: {uniform: [0.0, 0.1]}
train.batch.global_batch_tokens: {choice: [512, 1024, 2048]}
model_overrides.n_layers: {grid: [2, 4]}
train.optimizer.weight_decay: 0.05          # a constant for every trial
```

Keys are config fields with dots (nested mappings are flattened the same way). A value is a constant or
a mapping with exactly one of ``loguniform``/``uniform`` ([low, high]), ``randint`` ([low, high), integers),
``choice`` or ``grid`` (a list). Mistakes raise :class:`ConfigError` naming the file and the field.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, read_yaml

CONTINUOUS = ("loguniform", "uniform", "randint")
DISCRETE = ("choice", "grid")
KINDS = CONTINUOUS + DISCRETE


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config field
    kind: str  # one of KINDS, or "constant"
    args: tuple[Any, ...]

    def representatives(self) -> list[Any]:
        """Values that bound what a trial may get: the ends of a range, every value of a list."""
        if self.kind == "constant":
            return [self.args[0]]
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def tune_domain(self):
        from ray import tune

        if self.kind == "constant":
            return self.args[0]
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def describe(self) -> str:
        if self.kind == "constant":
            return f"{self.key} = {self.args[0]!r}"
        if self.kind in DISCRETE:
            return f"{self.key} {self.kind} {list(self.args)}"
        return f"{self.key} {self.kind}[{self.args[0]}, {self.args[1]}]"


def _is_distribution(value: dict[str, Any]) -> bool:
    """``{kind: args}``: a known kind, or any single key holding a list (an unknown kind, reported)."""
    if len(value) != 1:
        return False
    kind, args = next(iter(value.items()))
    return kind in KINDS or isinstance(args, list)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_distribution(value):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: numbers written so are numbers here."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _dimension(source: str, key: str, value: Any) -> Dimension:
    where = f"space file {source} field '{key}'"
    if not isinstance(value, dict):
        return Dimension(key, "constant", (_number(value),))
    ((kind, args),) = value.items()
    if isinstance(args, list):
        args = [_number(a) for a in args]
    if kind in CONTINUOUS:
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
            raise ConfigError(f"{where}: {kind} takes [low, high] (got {args!r})")
        low, high = args
        if not low < high:
            raise ConfigError(f"{where}: {kind} needs low < high (got {args!r})")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {low!r})")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint takes integers (got {args!r})")
        return Dimension(key, kind, (low, high))
    if not (isinstance(args, list) and args):
        raise ConfigError(f"{where}: {kind} takes a non-empty list (got {args!r})")
    return Dimension(key, kind, tuple(args))


def read_space(path: str | Path) -> list[Dimension]:
    source = str(path)
    try:
        tree = read_yaml(path)
    except ConfigError as err:  # "config file X: ..." -> "space file X: ..."
        raise ConfigError(str(err).replace("config file", "space file", 1)) from None
    dims = []
    for key, value in _flatten(tree).items():
        if isinstance(value, dict) and len(value) == 1:
            kind = next(iter(value))
            if kind not in KINDS:
                raise ConfigError(f"space file {source} field '{key}': unknown distribution {kind!r} "
                                  f"(choose {', '.join(KINDS)})")
        dims.append(_dimension(source, key, value))
    if not any(d.kind != "constant" for d in dims):
        raise ConfigError(f"space file {source}: no field to search (give e.g. "
                          "'train.optimizer.lr: {loguniform: [1e-4, 1e-2]}')")
    return dims


def set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a config as a nested dict) with the dotted ``params`` set in a deep copy."""
    import copy

    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_path(tree, key, value)
    return tree


def corners(dims: list[Dimension], limit: int = 64) -> list[dict[str, Any]]:
    """Combinations of every dimension's representatives (at most ``limit``, spread over the product):
    the configs a trial's validity and size are checked on before anything runs."""
    values = [d.representatives() for d in dims]
    total = math.prod(len(v) for v in values)
    combos = itertools.product(*values)
    step = max(1, total // limit)
    picked = [combo for i, combo in enumerate(combos) if i % step == 0][:limit]
    return [{d.key: v for d, v in zip(dims, combo)} for combo in picked]


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    return {d.key: d.tune_domain() for d in dims}


def grid_size(dims: list[Dimension]) -> int:
    return math.prod(len(d.args) for d in dims if d.kind == "grid")
