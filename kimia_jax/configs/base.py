"""The one way a config is read: a frozen dataclass filled from a released config file's keys.

`ReleasedConfig.from_dict` keeps the keys that are fields, turns JSON/YAML lists into tuples,
applies overrides, and raises `CheckpointError` naming the source (file) and the missing or bad
key(s);
`from_file` reads JSON or YAML first. Also the two small enums every floor shares: `DType` and
`OutputType`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from kimia_jax.errors import CheckpointError


class DType(enum.StrEnum):
    """Parameter / compute dtypes the models run in (a `str` enum: `DType.FLOAT32 == "float32"`)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @classmethod
    def parse(cls, value: Any, name: str = "dtype") -> DType:
        """Accepts a name ("bfloat16"), a `DType`, or a numpy/jax dtype (`jnp.bfloat16`)."""
        if isinstance(value, cls):
            return value
        try:
            import numpy as np

            key = value if isinstance(value, str) else np.dtype(value).name
            return cls(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be one of {[m.value for m in cls]}, got {value!r}"
            ) from None

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.value]


class OutputType(enum.StrEnum):
    """What generation returns: "text" (audio stream forced blank) or "both" (text + audio codes).

    A `str` enum, so `OutputType.BOTH == "both"`; `OutputType.parse` is the one validation point.
    """

    TEXT = "text"
    BOTH = "both"

    @classmethod
    def parse(cls, value: str | OutputType, name: str = "output_type") -> OutputType:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{name} must be one of {[m.value for m in cls]}, got {value!r}"
            ) from None


def _freeze(v: Any) -> Any:
    """JSON/YAML lists -> tuples (frozen, hashable configs); nested lists too."""
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file as a dict (`.yaml`/`.yml` as YAML, else JSON); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path} is not valid YAML ({e})") from e
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a mapping of config keys, got {type(d).__name__}")
    return d


def from_dict(cls: type, d: Mapping[str, Any], source: str, **overrides: Any) -> Any:
    """`cls(**known keys of d, **overrides)`; every failure is a CheckpointError naming `source`."""
    if not isinstance(d, Mapping):
        raise CheckpointError(
            f"{source}: expected a mapping of config keys, got {type(d).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise TypeError(f"{cls.__name__} has no field(s) {bad}")
    kwargs = {k: _freeze(v) for k, v in d.items() if k in fields}
    kwargs.update({k: _freeze(v) for k, v in overrides.items()})
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise CheckpointError(f"{source}: missing required config key(s) {missing}")
    try:
        return cls(**kwargs)
    except CheckpointError as e:
        if str(e).startswith(source):
            raise
        raise CheckpointError(f"{source}: {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


class ReleasedConfig:
    """Mixin of the frozen model configs: `from_dict`, `from_file`, `replace`.

    A subclass may define `_normalize(d) -> d` to map nested release keys onto flat fields (the
    DiT's `rope_params`); `source` names the file (or section) in every error.
    """

    @classmethod
    def _normalize(cls, d: Mapping[str, Any]) -> Mapping[str, Any]:
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None, **overrides: Any) -> Self:
        source = source or f"{cls.__name__} dict"
        if isinstance(d, Mapping):
            d = cls._normalize(d)
        return from_dict(cls, d, source, **overrides)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, section: tuple[str, ...] = (), **overrides: Any
    ) -> Self:
        """Reads a JSON/YAML file (a directory means its `config.json`); `section` selects a
        nested mapping (`("model", "dit")` of the detokenizer's config.yaml)."""
        from kimia_jax.configs import layout

        path = Path(path)
        if path.is_dir():
            path = path / layout.CONFIG_JSON
        d: Any = read_file(path)
        for key in section:
            if not isinstance(d, Mapping) or key not in d:
                raise CheckpointError(f"{path}: no {'.'.join(section)} section")
            d = d[key]
        return cls.from_dict(d, str(path), **overrides)

    def replace(self, **kw: Any) -> Self:
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]
