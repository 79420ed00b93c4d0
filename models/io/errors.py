"""The library's error for files it cannot use (its own module so every reader can raise it without a cycle)."""

from __future__ import annotations

__all__ = ["WeightFileError"]


class WeightFileError(ValueError):
    """A checkpoint that cannot be used by the loader it was given to (wrong model, truncated, corrupt)."""
