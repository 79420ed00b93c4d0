"""The one load sequence every model loader shares: find the weights, view them under the model's names, build
the model on the meta device and fill it one tensor at a time.

::

    weights = open_weights(path, part="transformer")      # lazy mapping: safetensors file / folder, or GGUF
    identity = registry.expect(weights.tensors, ...)      # the loader's check (what the file is)
    model = materialize(Model(config, ops=ops or weights.ops, device="meta", dtype=dtype), weights.tensors,
                        dtype=dtype, device=device, prefix=identity.prefix, what="...")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .weights import FLOAT8_DTYPES, assign_weights, open_checkpoint, tensor_dtype, tensor_shape

__all__ = ["Weights", "open_weights", "TensorView", "materialize", "load_progress"]

# ``progress(done, total)`` in tensors read, for every model loaded in this context (see :func:`load_progress`).
_LOAD_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar("qip_load_progress", default=None)
_PROGRESS_STEPS = 100  # calls per load at most: a host may send a message per call


@contextlib.contextmanager
def load_progress(progress: Callable[[int, int], None]) -> Iterator[None]:
    """Report the loading of every model materialized inside the ``with`` block to ``progress(done, total)``
    (tensors); an exception it raises (a host's interrupt) stops the load.  Loaders need no extra argument."""
    token = _LOAD_PROGRESS.set(progress)
    try:
        yield
    finally:
        _LOAD_PROGRESS.reset(token)


@dataclass
class Weights:
    """An opened checkpoint: the lazy ``tensors`` mapping, the parsed ``config.json`` (or ``None``), the ``ops``
    namespace its tensors need (``GGUFOps`` for GGUF, ``None`` for plain tensors) and the ``source`` path."""

    tensors: Mapping
    config: dict | None
    ops: type | None
    source: str


def open_weights(path: str | os.PathLike, part: str | None = None,
                 gguf_opener: Callable[[Path], tuple[Mapping, type | None]] | None = None) -> Weights:
    """Open a ``.safetensors`` file, a diffusers/HF folder (or a pipeline folder holding ``part``, e.g.
    ``transformer``) or, with ``gguf_opener``, a ``.gguf`` file; reads headers only."""
    path = Path(path)
    if part and path.is_dir() and not any(path.glob("*.safetensors")) and (path / part).is_dir():
        path = path / part  # a whole diffusers pipeline folder
    if gguf_opener is not None and path.suffix.lower() == ".gguf":
        tensors, ops = gguf_opener(path)
        return Weights(tensors, getattr(tensors, "config", None), ops, str(path))
    checkpoint = open_checkpoint(path)
    return Weights(checkpoint, checkpoint.config, None, str(checkpoint.source))


class TensorView(Mapping):
    """A checkpoint seen without a key ``prefix`` and without the ``drop`` names (marker tensors), with tensors
    moved to ``device`` as they are read; keeps the lazy ``shape`` / ``dtype`` queries."""

    def __init__(self, tensors: Mapping, prefix: str = "", drop: frozenset[str] = frozenset(),
                 device: torch.device | None = None, progress: Callable[[int, int], None] | None = None):
        self._tensors, self._device = tensors, device
        self._keys = {k[len(prefix):]: k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in drop}
        self._progress, self._read = progress, 0

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[self._keys[name]]
        if self._progress is not None:
            self._read += 1
            total = len(self._keys)
            if self._read >= total or self._read % max(1, total // _PROGRESS_STEPS) == 0:
                self._progress(min(self._read, total), total)
        return tensor if self._device is None else tensor.to(self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self._tensors, self._keys[name])

    def dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self._tensors, self._keys[name])


def materialize(model: nn.Module, tensors: Mapping, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                prefix: str = "", drop: frozenset[str] = frozenset(),
                rename: Callable[[str], str | None] | None = None, what: str = "model") -> nn.Module:
    """Fill a meta-built ``model`` from ``tensors`` (see :func:`models.io.weights.assign_weights`); float weights
    become ``dtype`` except fp8, which stays fp8; progress goes to the :func:`load_progress` of the context.
    Returns the model in eval mode."""
    target = torch.device(device)
    view = TensorView(tensors, prefix, drop, None if target.type == "cpu" else target, _LOAD_PROGRESS.get())
    assign_weights(model, view, dtype=dtype, rename=rename, keep_dtypes=FLOAT8_DTYPES, what=what)
    return model.eval().requires_grad_(False)
