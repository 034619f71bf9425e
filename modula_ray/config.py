"""Dataclass configs: YAML load/save, dotted CLI overrides, validation in ``__post_init__``.

Every bad value raises ``ConfigError`` naming the dotted field (``stages.router.lr``) and
the YAML file it came from. Saved YAML starts with the command that runs it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .experts.inject import DEFAULT_TARGETS
from .experts.registry import METHODS


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, where: str):
    """Check ``value`` against a type hint (recursing into dataclasses, lists and dicts)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(where, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(where, f"expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data, *, prefix: str = "", source: str | None = None):
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    try:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(prefix or cls.__name__, f"expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in data:
            if key not in names:
                raise ConfigError(f"{prefix}.{key}" if prefix else str(key), f"unknown field; known: {names}")
        kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if prefix and not exc.field.startswith(prefix):
                raise ConfigError(f"{prefix}.{exc.field}", exc.message) from None
            raise
    except ConfigError as exc:
        if source and not exc.source:
            raise ConfigError(exc.field, exc.message, source=source) from None
        raise


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["stages.router.lr=1e-3", "experts.top_k=2"]`` -> nested updates (values parsed as YAML)."""
    import yaml

    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "override must look like dotted.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls, path, overrides: list[str] | None = None):
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("config", "file not found", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"not valid YAML ({exc})", source=str(path)) from None
    return from_dict(cls, apply_overrides(data, overrides or []), source=str(path))


def dump_config(obj, command: str) -> str:
    """YAML text of ``obj`` whose first line is the command that runs it."""
    import yaml

    return f"# {command}\n" + yaml.safe_dump(to_dict(obj), sort_keys=False)


def require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(field_name, message)


@dataclass
class ExpertsConfig:
    """Expert layers; the paper leaves these open, so they are ours to configure (DESIGN §1)."""

    method: str = "modula_res"               # lora | molora | modula_flan | modula_res
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    universal_rank: int = 16                 # r_u
    domain_rank: int = 8                     # r_d
    universal_alpha: float = 32.0            # s* = universal_alpha / r_u
    domain_alpha: float = 16.0               # s  = domain_alpha / r_d
    dropout: float = 0.0                     # on each A's input
    top_k: int | None = None                 # None = dense softmax, as in the paper
    temperature: float = 1.0                 # tau in softmax(W_R x / tau)
    router_bias: bool = False

    def __post_init__(self):
        require(self.method in METHODS, "method", f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        require(bool(self.target_modules), "target_modules", "must name at least one module")
        for name in ("universal_rank", "domain_rank"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("universal_alpha", "domain_alpha", "temperature"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or null, got {self.top_k}")

    def layer_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("universal_rank", "domain_rank", "universal_alpha", "domain_alpha",
                                              "dropout", "top_k", "temperature", "router_bias")}
