"""Training configs: frozen dataclasses filled from ``configs/train_*.yaml`` plus dotted overrides.

``load_config(Stage2TrainConfig, "configs/train_stage2.yaml", ["batch_size=4", "model.control=pose_only"])``:
the YAML gives the recipe, each override ``a.b=value`` replaces one field (the value is parsed as YAML,
so numbers, booleans and lists work). Unknown keys are errors, so a typo never silently trains the
default.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from models.errors import AnitalkerError


class ConfigError(AnitalkerError):
    pass


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; "
                          f"known: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        typ = hints[k]
        if dataclasses.is_dataclass(typ):
            v = _build(typ, v, f"{where}{k}.")
        elif typ in (int, float) and isinstance(v, (int, float, str)) and not isinstance(v, bool):
            try:  # YAML reads 1e-4 (no dot) as a string; a float may be written 1, an int 1e5
                v = float(v) if typ is float else int(float(v)) if float(v).is_integer() else v
            except ValueError:
                raise ConfigError(f"{where}{k} must be a number, got {v!r}") from None
        elif typ is str and not isinstance(v, str):   # `key=` parses as None, `data=2024` as an int
            v = "" if v is None else str(v)
        if typ in (int, float, str, bool) and not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ConfigError(f"{where}{k} must be {typ.__name__}, got {v!r}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config {where or cls.__name__}: {e}") from None


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    d[last] = value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(cls, path=None, overrides=()):
    """Defaults of ``cls`` <- YAML file <- ``key.sub=value`` overrides -> a frozen ``cls``."""
    data = to_dict(cls())
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        for k, v in _flatten(loaded):
            _set(data, k, v)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. batch_size=4)")
        k, v = item.split("=", 1)
        _set(data, k.strip(), yaml.safe_load(v))
    return _build(cls, data, "")


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
