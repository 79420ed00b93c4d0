"""The prefix KV cache of the Qwen-Image 2.1 DiT.

The *prefix* is everything before the target image in the joint sequence: the text tokens and the condition
images.  With ``causal_condition`` its tokens are modulated from ``t = 0`` and, the attention being block-causal,
they never attend to the target: their keys and values in every block are the same at every denoising step.
The first forward of a generation computes them; later forwards take them from a :class:`PrefixCache` and run
only the target image's tokens (their queries over the keys ``[cached prefix, target]``).

One cache serves a whole sampling run.  Entries are keyed by the exact prefix inputs (context, mask, image
slots, condition latents) and the layout (batch, compute dtype), so the positive and negative conditioning of CFG
each get an entry whether a host batches them or not, and a changed input makes a new entry instead of a wrong
answer.  The cached values also depend on the weights: a cache lives for one generation (:meth:`PrefixCache.clear`
or a new cache when the model or its patches change).

``storage_device`` keeps the keys and values where they are computed (``None``) or offloads them (e.g. ``"cpu"``,
pinned when they come from CUDA): each block's pair is moved there as soon as it is computed, so the compute device
never holds all blocks at once, and copied back block by block at every later step.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

__all__ = ["PrefixKey", "PrefixEntry", "PrefixCache"]

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class PrefixKey:
    """What a prefix's keys and values depend on: a hashable ``layout`` (token runs, batch, compute dtype ...)
    and the input ``tensors``, compared exactly."""

    layout: Hashable
    tensors: tuple[torch.Tensor | None, ...]

    def matches(self, other: PrefixKey) -> bool:
        return (self.layout == other.layout and len(self.tensors) == len(other.tensors)
                and all(_equal(a, b) for a, b in zip(self.tensors, other.tensors)))

    def detached(self) -> PrefixKey:
        """A copy that owns its tensors (a caller may reuse its buffers in place)."""
        return PrefixKey(self.layout, tuple(None if t is None else t.detach().clone() for t in self.tensors))


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def _stash(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``tensor`` on the storage ``device`` (pinned host memory for CUDA tensors, so reloading is asynchronous)."""
    if device is None or tensor.device == device:
        return tensor
    if device.type == "cpu" and tensor.is_cuda:
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return pinned.copy_(tensor)
    return tensor.to(device)


class PrefixEntry:
    """The prefix keys and values ``[B, heads, P, head_dim]`` of every block for one :class:`PrefixKey`."""

    def __init__(self, key: PrefixKey, storage_device: torch.device | None):
        self.key = key
        self.storage_device = storage_device
        self.layers: list[KV] = []

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the next block's pair (moved to the storage device)."""
        self.layers.append((_stash(k, self.storage_device), _stash(v, self.storage_device)))

    def kv(self, index: int, device: torch.device) -> KV:
        """Block ``index``'s pair on ``device``."""
        k, v = self.layers[index]
        return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    def move(self, device: torch.device | None) -> None:
        self.storage_device = device
        self.layers = [(_stash(k, device), _stash(v, device)) for k, v in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers for t in pair)


class PrefixCache:
    """Prefix keys and values of up to ``max_entries`` conditionings (least recently used dropped first); pass it
    as ``kv_cache`` to :class:`models.qwen_image_2_1.dit.QwenImage21DiT` at every step of a generation."""

    def __init__(self, storage_device: torch.device | str | None = None, max_entries: int = 2):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self.max_entries = max_entries
        self._entries: list[PrefixEntry] = []  # most recently used last

    def lookup(self, key: PrefixKey) -> PrefixEntry | None:
        """The complete entry for ``key``, or ``None``."""
        for index, entry in enumerate(self._entries):
            if entry.key.matches(key):
                self._entries.append(self._entries.pop(index))
                return entry
        return None

    def new_entry(self, key: PrefixKey) -> PrefixEntry:
        """An empty entry for ``key`` to fill block by block; it joins the cache through :meth:`add` once complete
        (a forward that fails half-way leaves nothing behind)."""
        return PrefixEntry(key.detached(), self.storage_device)

    def add(self, entry: PrefixEntry) -> None:
        self._entries = [e for e in self._entries if not e.key.matches(entry.key)] + [entry]
        del self._entries[:-self.max_entries]

    def to(self, device: torch.device | str | None) -> PrefixCache:
        """Keep the keys and values on ``device`` from now on (``None``: where they are computed) and move the
        stored ones there; returns the cache."""
        self.storage_device = None if device is None else torch.device(device)
        for entry in self._entries:
            entry.move(self.storage_device)
        return self

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[PrefixEntry, ...]:
        """The stored entries, least recently used first."""
        return tuple(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys and values."""
        return sum(entry.nbytes for entry in self._entries)
