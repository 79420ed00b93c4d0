"""``config.json`` of a diffusers / HF model folder, read so that no value of the wrong kind reaches a loader.

transformers and diffusers write ``null`` for an option that is not set, so null values are dropped (the loader's
default applies).  ``get(key, default)`` returns the stored value only when it is of the default's kind, otherwise
it raises :class:`WeightFileError` naming the file and the key:

* a bool default takes only true / false; an int default only integers, a float default any number (never a
  bool), and a non-negative default only non-negative values (sizes, counts, rates);
* a tuple default takes a list of the same length whose items are each of the first item's kind (a list default:
  any length); a dict default takes an object; a str default a string; a ``None`` default anything.

Nested objects are :class:`ModelConfig` too, so ``config.get("text_config", {}).get("head_dim", 0)`` is checked all
the way down.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import WeightFileError

__all__ = ["ModelConfig", "read_config"]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` is of the kind ``default`` stands for (see the module docstring)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        number = (int,) if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return False
        return (isinstance(value, int) or math.isfinite(value)) and (default < 0 or value >= 0)
    if isinstance(default, (tuple, list)):
        return (isinstance(value, list) and (isinstance(default, list) or len(value) == len(default))
                and (not default or all(_fits(item, default[0]) for item in value)))
    return isinstance(value, type(default))


class ModelConfig(dict):
    """A parsed ``config.json`` (a ``dict``) whose ``get(key, default)`` is checked against the default's kind."""

    def __init__(self, values: dict, source: str, path: str = ""):
        super().__init__({k: ModelConfig(v, source, f"{path}{k}.") if isinstance(v, dict) else v
                          for k, v in values.items()})
        self.source, self._path = source, path

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self:
            return default
        value = self[key]
        if not _fits(value, default):
            raise WeightFileError(f"{self.source}: '{self._path}{key}' is {json.dumps(value)[:80]}, which is not a "
                                  f"valid value (expected something like {json.dumps(default)}). Fix the value or "
                                  "take config.json from the model's original release.")
        return value


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Parse a ``config.json``; a file that is not a JSON object is a :class:`WeightFileError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return ModelConfig(_without_nulls(data), str(path))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightFileError(f"{path}: not valid JSON ({type(e).__name__}: {e}).") from None
    raise WeightFileError(f"{path}: a model's config.json must be a JSON object, not a {type(data).__name__}. "
                          "Take config.json from the model's original release.")
