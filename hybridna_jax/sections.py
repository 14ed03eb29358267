"""Typed config sections: one frozen dataclass per section of the job config.

A section's dataclass is the one definition of its fields, their defaults
and their comments. `config_dict()` turns the defaults into the ConfigDict
that config files and `--config.<section>.<field>=...` overrides edit;
`from_config(cfg.<section>)` reads that back as a checked, typed view, in
which an unknown field or a value of the wrong form fails with one line
that names the field and the form it expects:

    config.train.stages[0] = 256: expected a tuple of (seq_len, steps,
    global_batch_size) triples like ((8192, 1000, 64),), got (256, 6, 4)

Sections of run directories written by older code (fields or whole sections
missing) read with `of(config, strict=False)`: missing fields take their
defaults and unknown ones are ignored.

This module imports nothing from hybridna_jax, so every package can define
its section with it (hybridna_jax/data/config.py, hybridna_jax/config.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np


class ConfigError(ValueError):
  """An unknown or malformed config field; the message is one line."""


def field(
  default=dataclasses.MISSING,
  *,
  expected: str | None = None,
  choices: tuple | None = None,
  default_factory=dataclasses.MISSING,
) -> Any:
  """A section field whose error messages describe its form as `expected`
  (e.g. "a tuple of (seq_len, steps, batch) triples like ...") instead of
  the description derived from its type; with `choices`, any other value is
  a ConfigError when the section is read (`Section.from_config`), before a
  job starts."""
  metadata = {"expected": expected} if expected else {}
  if choices is not None:
    metadata["choices"] = tuple(choices)
  return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


class _Mismatch(Exception):
  """A value that does not fit a type; `where` is its index path."""

  def __init__(self, where: str = "", value: Any = None):
    super().__init__(where)
    self.where, self.value = where, value


_NAMES = {
  int: ("an integer", "integers"),
  float: ("a number", "numbers"),
  bool: ("True or False", "booleans"),
  str: ("a string", "strings"),
  dict: ("a dict", "dicts"),
}


def describe(tp) -> str:
  """A type in words, for error messages."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp in _NAMES:
    return _NAMES[tp][0]
  if origin in (typing.Union, types.UnionType):
    return " or ".join("None" if a is type(None) else describe(a) for a in args)
  if origin is tuple:
    if len(args) == 2 and args[1] is Ellipsis:
      if args[0] is str:
        return "a tuple of strings like ('a', 'b') (one string: ('a',))"
      if args[0] in _NAMES:
        return f"a tuple of {_NAMES[args[0]][1]}"
      return f"a tuple of ({describe(args[0])})"
    return f"a tuple of {len(args)} values ({', '.join(describe(a) for a in args)})"
  if isinstance(tp, type) and issubclass(tp, Section):
    return f"a section with the fields of {tp.__name__}"
  return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp) -> Any:
  """`value` as type `tp` (lists become tuples, ints floats); raises
  _Mismatch where it does not fit."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is not type(None):
        try:
          return _coerce(value, arg)
        except _Mismatch:
          pass
    raise _Mismatch()
  if tp is bool:  # numpy booleans too, as numpy numbers below
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
    raise _Mismatch()
  if tp is int:  # numpy integers too (sizes computed by code)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
      return int(value)
    raise _Mismatch()
  if tp is float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
      return float(value)
    raise _Mismatch()
  if tp is str:
    if isinstance(value, str):
      return value
    raise _Mismatch()
  if tp is dict or origin is dict:
    if hasattr(value, "to_dict"):
      return value.to_dict()
    if isinstance(value, Mapping):
      return dict(value)
    raise _Mismatch()
  if origin is tuple:
    if args == (str, Ellipsis) and isinstance(value, str):
      return (value,)  # a single pattern or name, as the readers accept
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
      raise _Mismatch()
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not variadic and len(value) != len(args):
      raise _Mismatch()
    out = []
    for i, item in enumerate(value):
      try:
        out.append(_coerce(item, args[0] if variadic else args[i]))
      except _Mismatch as e:
        # Report the outermost element that does not fit.
        raise _Mismatch(f"[{i}]", item) from e
    return tuple(out)
  if isinstance(tp, type) and issubclass(tp, Section):
    return value  # nested sections are read by Section.from_config
  if tp is Any or tp is object:
    return value
  raise TypeError(f"sections: no reader for type {tp!r}")


class Section:
  """Base of the typed config sections (frozen dataclasses).

  Subclasses set SECTION, the section's path in the job config ("train",
  "data.split"), used in messages as config.<SECTION>.<field>.
  """

  SECTION = ""

  @classmethod
  @functools.cache
  def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """{field: default}; nested sections as their own defaults dicts."""
    out = {}
    for f in dataclasses.fields(cls):
      tp = cls._hints()[f.name]
      if isinstance(tp, type) and issubclass(tp, Section):
        out[f.name] = tp.defaults()
      else:
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out

  @classmethod
  def config_dict(cls, **overrides) -> ml_collections.ConfigDict:
    """The ConfigDict of this section's defaults, with `overrides` applied."""
    values = cls.defaults()
    cls._check_names(overrides, f"config.{cls.SECTION}")
    values.update(overrides)
    cfg = ml_collections.ConfigDict(values)
    for name, value in values.items():
      # A None default keeps its type, so that overrides can set it.
      if value is None:
        tp = cls._hints()[name]
        kinds = [a for a in typing.get_args(tp) if a is not type(None)]
        kind = (typing.get_origin(kinds[0]) or kinds[0]) if kinds else object
        cfg[name] = ml_collections.FieldReference(None, field_type=kind)
    return cfg

  @classmethod
  def _check_names(cls, values: Mapping[str, Any], path: str) -> None:
    unknown = sorted(set(values) - set(cls.field_names()))
    if unknown:
      hints = [m for u in unknown for m in difflib.get_close_matches(u, cls.field_names(), 1)]
      did_you_mean = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
      raise ConfigError(
        f"{path} has unknown fields {unknown}{did_you_mean}; valid fields: "
        f"{', '.join(cls.field_names())}."
      )

  @classmethod
  def from_config(cls, cfg: Any = None, *, strict: bool = True, path: str | None = None):
    """The typed view of a section (a ConfigDict, dict, instance or None
    for all defaults). strict: unknown fields are an error (else ignored,
    for run directories of other versions). Missing fields take defaults."""
    if isinstance(cfg, cls):
      return cfg
    path = path or f"config.{cls.SECTION}"
    if cfg is None:
      values = {}
    elif hasattr(cfg, "to_dict"):
      values = cfg.to_dict()
    elif isinstance(cfg, Mapping):
      values = dict(cfg)
    else:
      raise ConfigError(
        f"{path}: expected a section (ConfigDict) of fields "
        f"{', '.join(cls.field_names())}, got {cfg!r}."
      )
    if strict:
      cls._check_names(values, path)
    kwargs = {}
    for name in cls.field_names():
      if name not in values:
        continue
      tp, value = cls._hints()[name], values[name]
      if isinstance(tp, type) and issubclass(tp, Section):
        kwargs[name] = tp.from_config(value, strict=strict, path=f"{path}.{name}")
        continue
      try:
        kwargs[name] = _coerce(value, tp)
      except _Mismatch as e:
        expected = cls._expected(name) or describe(tp)
        where = f"{path}.{name}{e.where} = {e.value!r}" if e.where else f"{path}.{name}"
        raise ConfigError(f"{where}: expected {expected}, got {value!r}.") from None
      choices = cls._metadata(name).get("choices")
      if choices is not None and kwargs[name] not in choices:
        raise ConfigError(
          f"{path}.{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}."
        )
    return cls(**kwargs)

  @classmethod
  def _metadata(cls, name: str) -> Mapping[str, Any]:
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)

  @classmethod
  def _expected(cls, name: str) -> str | None:
    return cls._metadata(name).get("expected")

  @classmethod
  def of(cls, config: Any, *, strict: bool = False):
    """The typed `config.<SECTION>` of a whole job or run config; all
    defaults when the config has no such section (a run written before it
    existed)."""
    section = config
    for part in cls.SECTION.split("."):
      section = section[part] if section is not None and part in section else None
    return cls.from_config(section, strict=strict)

  def replace(self, **changes):
    """A copy with `changes`; None values keep the field (unset flags)."""
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def set_fields(
  cfg: ml_collections.ConfigDict, values: Mapping[str, Any], path: str = "config"
) -> None:
  """Sets `values` (nested dicts for nested sections) on `cfg`; a name
  `cfg` does not have is a ConfigError (a typo must not add a field)."""
  for key, value in values.items():
    if key not in cfg:
      known = ", ".join(sorted(cfg.keys()))
      raise ConfigError(f"{path}.{key} is not a field ({path} has {known}).")
    if isinstance(value, Mapping) and isinstance(cfg[key], ml_collections.ConfigDict):
      set_fields(cfg[key], value, f"{path}.{key}")
    else:
      cfg[key] = value
