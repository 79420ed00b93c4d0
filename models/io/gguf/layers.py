"""Layers whose weights stay quantized in memory: :class:`QuantizedTensor` and the :class:`GGUFOps` namespace.

A :class:`QuantizedTensor` is a ``uint8`` tensor of packed ggml blocks that also knows its ggml type and logical
(torch-order) shape, the :class:`DequantContext` of the checkpoint it came from and whether it is kept dequantized
by default.  Moving it (``.to(device)``, ``.cuda()``, ``module.to()``), detaching, cloning, pinning,
``copy.deepcopy`` and ``state_dict()`` all keep it a QuantizedTensor; a ``.to(float dtype)`` only moves the
device (the bytes are not numbers).  Every other torch operation sees plain bytes.

:class:`GGUFOps` has the class names and constructor signatures of :class:`models.common.ops.CastOps`.  A layer whose
weight is a QuantizedTensor moves the packed bytes to the input's device and dequantizes them there, in the
input's dtype, at each call ("just in time"), into its context's scratch for the calling thread; F32/F16/BF16
weights behave exactly like CastOps.  On the CPU, small weights are dequantized in groups, a few kernel calls per
step instead of one per layer (:meth:`DequantContext.jit`: per-op costs, not arithmetic, are most of the time of
small weights).  Two caches trade memory for time and are visible in :func:`memory_report`:

* the dequant-once cache, for layers that see one vector per step: on by default for the weights a checkpoint marks
  ``keep_dense`` (the DiT's :data:`ONE_VECTOR_LAYERS`: modulations and timestep MLP, a third of all parameters,
  within a budget: :func:`models.io.gguf.open_dit_gguf`), switched per layer with :func:`enable_dequant_cache`;
  the dense weight is kept in the compute dtype on the device of its packed weight, dropped when the layer moves;
* LoRA: ``layer.set_lora([(up, down, scale), ...])`` or a dense delta is merged once into a cached dense weight
  instead of being re-applied at every call.

Subclasses may patch the weight at dequantization time instead (the host adapter applies the host's LoRA patches
this way, keeping no dense copy): :meth:`_GGUFLayer._weight_patch` returns a callable applied to each freshly
dequantized weight (to the dense copy once, where the dequant-once cache keeps one).

Thread safety: layers may run in several threads at once (one model or several): scratch is per thread and per
context, and the caches are replaced atomically (a thread that finds none builds its own).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...common.ops import CastOps, cast_bias, cast_weight
from .dequant import CPU_KERNEL_TYPES, FusedDequant, Workspace, dequantize, dequantize_group
from .reader import GGMLType, quantized_nbytes

__all__ = ["QuantizedTensor", "DequantContext", "GGUFOps", "enable_dequant_cache", "memory_report", "MemoryReport",
           "ONE_VECTOR_LAYERS", "LoraDelta"]

# The DiT's Linears that see one vector per step: the modulations and the timestep MLP (img_mod / txt_mod alone are
# a third of all parameters; 2.1 shares one ``modulation.1``).  Dequantizing them at every step costs far more than
# their matmuls.
ONE_VECTOR_LAYERS = ("img_mod.1", "txt_mod.1", "modulation.1", "norm_out.linear",
                     "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")

# (up [out, r], down [r, in...], scale) - the merged delta is scale * up @ down - or a dense delta tensor.
LoraDelta = tuple[torch.Tensor, torch.Tensor, float]

_KEEP_QUANTIZED = {
    "to", "cpu", "cuda", "clone", "detach", "detach_", "contiguous", "pin_memory", "requires_grad_",
    "share_memory_", "_to_copy",
}


# Grouped just-in-time dequantization on the CPU (see DequantContext.jit): weights of at most this many elements
# are dequantized in groups, of at most _GROUP_ELEMENTS elements in all (the size of the "weight" buffer it needs
# at most, in the compute dtype; bigger weights are dequantized one at a time, as their arithmetic dwarfs the
# per-op costs anyway).
_GROUP_WEIGHT_ELEMENTS = 1 << 20
_GROUP_ELEMENTS = 1 << 22


class _Group:
    """Weights dequantized together ahead of their use: ``weights[i]`` (weak) gets ``views[i]``, in order."""

    __slots__ = ("weights", "views", "dtype", "next", "epoch")

    def __init__(self, weights: list, views: list[torch.Tensor], dtype: torch.dtype, epoch: int):
        self.weights, self.views, self.dtype, self.next, self.epoch = weights, views, dtype, 1, epoch


class _ThreadScratch:
    """One thread's scratch in one context (CPU): the kernels' workspace, output buffers per role, and what grouped
    just-in-time dequantization learns (which weight followed which) and holds (the group being used)."""

    def __init__(self):
        self.workspace = Workspace()
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.follows: dict[tuple[int, torch.dtype], weakref.ref] = {}  # (id, dtype) -> the weight asked for next
        self.last: tuple[int, torch.dtype] | None = None
        self.group: _Group | None = None


class DequantContext:
    """What the quantized weights of one checkpoint (one model) share at run time: each thread's CPU scratch - the
    dequantization workspace and the buffers just-in-time weights are written to (fresh memory costs page faults
    that take longer than dequantizing; GPU allocators cache their blocks already) - and ``fused``, the compiled
    kernels used for CUDA tensors (None: off).

    Its weights hold it: deleting the model frees every thread's scratch, and a thread's scratch also goes when
    the thread ends.  Two threads never share a buffer, so models can run concurrently.
    """

    def __init__(self, fused: bool = True):
        self._threads = threading.local()
        self.fused = FusedDequant() if fused else None
        self.epoch = 0  # bumped when weights move or change: groups dequantized before are dropped

    def __reduce__(self):  # pickled weights get a fresh context (scratch is never saved)
        return DequantContext, (self.fused is not None,)

    def _scratch(self) -> _ThreadScratch:
        scratch = getattr(self._threads, "scratch", None)
        if scratch is None:
            scratch = self._threads.scratch = _ThreadScratch()
        return scratch

    def workspace(self) -> Workspace:
        """The calling thread's CPU dequantization workspace."""
        return self._scratch().workspace

    def buffer(self, role: str, numel: int, like: torch.Tensor) -> torch.Tensor | None:
        """The calling thread's reused ``role`` buffer of ``numel`` elements like ``like`` (CPU only, else None)."""
        if like.device.type != "cpu":
            return None
        buffers = self._scratch().buffers
        key = (role, like.dtype)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffers[key] = None  # free the old buffer before allocating the new one
            buffer = buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buffer[:numel]

    def invalidate(self) -> None:
        """Drop (in every thread) what was dequantized ahead of use: a weight moved or changed."""
        self.epoch += 1

    def jit(self, weight: "QuantizedTensor", like: torch.Tensor) -> torch.Tensor:
        """``weight`` dequantized for one use, right away, by a CPU input ``like`` (its dtype; no autograd): in the
        calling thread's reused "weight" buffer, valid until this thread's next request.

        Small weights are dequantized in groups.  Each thread remembers which weight was asked for after which;
        a request that is not the next one of the current group starts a new group along that chain (weights of
        up to ``_GROUP_WEIGHT_ELEMENTS`` elements, ``_GROUP_ELEMENTS`` in all, none twice), dequantized with one
        kernel call per type into consecutive parts of the buffer, and the following requests that match the
        chain get their part without any work.  A denoising step asks for the same weights in the same order every
        time, so from the second step on a tiny model's step costs a few kernel calls instead of one per Linear
        (per-op costs, not arithmetic, are most of the time of small weights).  Any other request is a miss that
        drops the group: never a wrong weight, only wasted work."""
        scratch = self._scratch()
        dtype = like.dtype
        key = (id(weight), dtype)
        if scratch.last is not None:
            scratch.follows[scratch.last] = weakref.ref(weight)
        scratch.last = key
        group = scratch.group
        if group is not None:
            index = group.next
            if (index < len(group.views) and group.weights[index]() is weight and group.dtype == dtype
                    and group.epoch == self.epoch):
                group.next = index + 1
                return group.views[index]
            scratch.group = None
        chain = self._chain(scratch, weight, dtype)
        if len(chain) < 2:
            return _dense(weight, like, role="weight")
        sizes = [w.logical_shape.numel() for w in chain]
        out = self.buffer("weight", sum(sizes), like)
        views: list[torch.Tensor | None] = [None] * len(chain)
        by_type: dict[GGMLType, list[int]] = {}
        for i, w in enumerate(chain):
            by_type.setdefault(w.qtype, []).append(i)
        start = 0
        for qtype, members in by_type.items():
            stop = start + sum(sizes[i] for i in members)
            dequantize_group([chain[i].as_subclass(torch.Tensor) for i in members], qtype, out[start:stop],
                             scratch.workspace)
            for i in members:
                views[i] = out[start:start + sizes[i]].view(chain[i].logical_shape)
                start += sizes[i]
        scratch.group = _Group([weakref.ref(w) for w in chain], views, dtype, self.epoch)
        return views[0]

    @staticmethod
    def _chain(scratch: _ThreadScratch, weight: "QuantizedTensor", dtype: torch.dtype) -> list["QuantizedTensor"]:
        """``weight`` and the weights that followed it last time, as far as they can be grouped with it."""
        chain: list[QuantizedTensor] = []
        seen: set[int] = set()
        total = 0
        while weight is not None and id(weight) not in seen and weight.qtype in CPU_KERNEL_TYPES:
            size = weight.logical_shape.numel()
            if size > _GROUP_WEIGHT_ELEMENTS or total + size > _GROUP_ELEMENTS or weight.device.type != "cpu":
                break
            chain.append(weight)
            seen.add(id(weight))
            total += size
            follower = scratch.follows.get((id(weight), dtype))
            weight = None if follower is None else follower()
        return chain

    def scratch_bytes(self) -> int:
        """Memory of the calling thread's scratch in this context."""
        scratch = self._scratch()
        return sum(b.numel() * b.element_size() for b in scratch.buffers.values()) + scratch.workspace.nbytes


class QuantizedTensor(torch.Tensor):
    """Packed ggml blocks (``uint8 [*shape[:-1], row_bytes]``) with ``qtype`` and ``logical_shape``; ``context``:
    the :class:`DequantContext` its layer dequantizes with (None: fresh memory per call); ``keep_dense``: whether
    its layer keeps it dequantized by default."""

    qtype: GGMLType
    logical_shape: torch.Size
    context: DequantContext | None = None
    keep_dense: bool = False

    @staticmethod
    def wrap(raw: torch.Tensor, qtype: GGMLType | int, shape: Sequence[int], context: DequantContext | None = None,
             keep_dense: bool = False) -> "QuantizedTensor":
        """View ``raw`` bytes as a QuantizedTensor (no copy)."""
        shape = torch.Size(int(d) for d in shape)
        if raw.dtype != torch.uint8 or raw.numel() != quantized_nbytes(GGMLType(qtype), shape):
            raise ValueError(f"{raw.numel()} {raw.dtype} values cannot hold a {GGMLType(qtype).name} tensor of "
                             f"shape {list(shape)}.")
        tensor = raw.as_subclass(QuantizedTensor)
        tensor.qtype, tensor.logical_shape = GGMLType(qtype), shape
        tensor.context, tensor.keep_dense = context, keep_dense
        return tensor

    def _adopt(self, result: torch.Tensor) -> "QuantizedTensor":
        """``result`` (the same bytes, moved or copied) as a QuantizedTensor with this tensor's attributes."""
        if not isinstance(result, QuantizedTensor) or result is not self:
            result = result.as_subclass(QuantizedTensor)
        result.qtype, result.logical_shape = self.qtype, self.logical_shape
        result.context, result.keep_dense = self.context, self.keep_dense
        return result

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "to":
            # Only the device can change: a float dtype would reinterpret packed bytes as numbers.
            copy = bool(kwargs.pop("copy", False))
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            kwargs = {"device": device, "non_blocking": non_blocking} if device is not None else {}
            kwargs["copy"] = copy
            args = args[:1]
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        source = args[0] if args else None
        if (name in _KEEP_QUANTIZED and isinstance(source, QuantizedTensor) and isinstance(result, torch.Tensor)
                and result.dtype == torch.uint8 and result.shape == source.shape):
            result = source._adopt(result)
        return result

    def __deepcopy__(self, memo: dict) -> "QuantizedTensor":
        if id(self) not in memo:
            copied = self._adopt(self.as_subclass(torch.Tensor).clone())
            if getattr(self, "_is_param", False):
                copied._is_param = True  # stays an nn.Parameter (custom-tensor parameters carry this flag)
            memo[id(self)] = copied
        return memo[id(self)]

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as an ordinary tensor of ``dtype`` on this tensor's device (written into ``out`` if given),
        with its context's workspace for the calling thread on the CPU and compiled kernels on CUDA."""
        raw = self.as_subclass(torch.Tensor)
        context = self.context
        if context is None:
            return dequantize(raw, self.qtype, self.logical_shape, dtype, out=out)
        device = raw.device.type
        return dequantize(raw, self.qtype, self.logical_shape, dtype, out=out,
                          workspace=context.workspace() if device == "cpu" else None,
                          fused=context.fused if device == "cuda" else None)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"QuantizedTensor({self.qtype.name}, shape={list(self.logical_shape)}, "
                f"{self.numel()} bytes, device={self.device})")


def _dense(tensor: torch.Tensor | None, like: torch.Tensor, role: str | None = None) -> torch.Tensor | None:
    """A QuantizedTensor dequantized on ``like``'s device in its dtype (into the calling thread's reused ``role``
    buffer of its context when given: only for a weight used once, right away, and never for autograd, which would
    keep it); anything else unchanged."""
    if not isinstance(tensor, QuantizedTensor):
        return tensor
    moved = tensor if tensor.device == like.device else tensor.to(like.device)
    context = tensor.context
    out = None
    if context is not None and role is not None and not (like.requires_grad and torch.is_grad_enabled()):
        out = context.buffer(role, tensor.logical_shape.numel(), like)
    return moved.dequantize(like.dtype, out=out)


def _lora_delta(deltas: Sequence[LoraDelta] | torch.Tensor, shape: torch.Size, device) -> torch.Tensor:
    """Sum of the LoRA deltas in fp32, shaped like the weight."""
    if isinstance(deltas, torch.Tensor):
        return deltas.to(device=device, dtype=torch.float32).reshape(shape)
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    for up, down, scale in deltas:
        up = up.to(device=device, dtype=torch.float32).flatten(1)
        down = down.to(device=device, dtype=torch.float32).flatten(1)
        total += (scale * (up @ down)).reshape(shape)
    return total


def _version(tensor: torch.Tensor) -> int | None:
    """In-place change counter; inference-mode tensors have none (and cannot be changed in place)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class _GGUFLayer:
    """Weight handling shared by every GGUFOps layer: just-in-time dequantization, caches, LoRA merging."""

    cache_dequantized: bool | None = None  # None: the weight's ``keep_dense``
    _lora: Sequence[LoraDelta] | torch.Tensor | None = None
    _cache: tuple[tuple, torch.Tensor] | None = None  # (key, dense weight): one attribute, replaced atomically

    def set_lora(self, deltas: Sequence[LoraDelta] | torch.Tensor | None) -> None:
        """Use ``weight + sum(scale * up @ down)`` (or ``weight + delta``); merged once, on the next call."""
        self._lora = deltas if deltas is None or isinstance(deltas, torch.Tensor) else list(deltas)
        self._cache = None

    def set_dequant_cache(self, enabled: bool | None) -> None:
        """Keep the dequantized weight between calls (for layers that see one vector per step); None: the
        weight's default (``keep_dense``)."""
        self.cache_dequantized = enabled
        self._cache = None

    def keeps_dequantized(self) -> bool:
        """Whether a quantized weight is dequantized once and kept (without LoRA: with one, the merge is kept)."""
        weight = getattr(self, "weight", None)
        if not isinstance(weight, QuantizedTensor):
            return False
        return weight.keep_dense if self.cache_dequantized is None else self.cache_dequantized

    @property
    def cached_weight(self) -> torch.Tensor | None:
        """The dense weight held now (dequant-once or LoRA cache), if any."""
        cache = self._cache
        return None if cache is None else cache[1]

    def cached_bytes(self) -> int:
        """Memory of the dense weight held now."""
        cached = self.cached_weight
        return 0 if cached is None else cached.numel() * cached.element_size()

    def planned_cache_bytes(self, dtype: torch.dtype) -> int:
        """What the dequant-once cache holds in ``dtype`` once the layer has run (0 when it is off or LoRA-merged)."""
        if self._lora is not None or not self.keeps_dequantized():
            return 0
        return self.weight.logical_shape.numel() * dtype.itemsize

    def _apply(self, fn, recurse=True):
        self._cache = None  # moved or converted: the dense copy is stale (and may pin memory on another device)
        weight = getattr(self, "weight", None)
        if isinstance(weight, QuantizedTensor) and weight.context is not None:
            weight.context.invalidate()  # and so is what its context dequantized ahead of use
        return super()._apply(fn, recurse)

    def _weight_patch(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A change applied to the weight each time it is dequantized (None here): called with a dense weight this
        layer owns (it may write to it, e.g. the calling thread's scratch) and returns the patched weight."""
        return None

    def _weight(self, like: torch.Tensor, patched: bool = True) -> torch.Tensor | None:
        """The dense weight for an input like ``like``; ``patched=False``: without the dequant-time patch (for a
        caller that applies it another way)."""
        weight = self.weight
        if weight is None:
            return None
        quantized = isinstance(weight, QuantizedTensor)
        patch = self._weight_patch() if patched else None
        if self._lora is None and not (quantized and self.keeps_dequantized() and weight.device == like.device):
            if quantized:
                context = weight.context
                if (context is not None and like.device.type == "cpu"
                        and not (like.requires_grad and torch.is_grad_enabled())):
                    dense = context.jit(weight, like)
                else:
                    dense = _dense(weight, like, role="weight")
            else:
                dense = cast_weight(self, like)
            if patch is None:
                return dense
            return patch(dense if quantized or dense is not weight else dense.clone())  # never the parameter
        key = (id(weight), _version(weight), like.dtype, like.device, patch)
        cache = self._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        self._cache = None  # free the old copy before building the new one
        if self._lora is None:
            dense = _dense(weight, like)
        else:
            base = _dense(weight, torch.empty(0, device=like.device)) if quantized else \
                cast_weight(self, torch.empty(0, dtype=torch.float32, device=like.device))
            dense = (base + _lora_delta(self._lora, base.shape, like.device)).to(like.dtype)
        if patch is not None:
            dense = patch(dense)
        self._cache = (key, dense)
        return dense

    def _bias(self, like: torch.Tensor) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)
        return _dense(bias, like, role="bias") if isinstance(bias, QuantizedTensor) else cast_bias(self, like)


class GGUFOps:
    """Operations namespace (same names and signatures as :class:`models.common.ops.CastOps`) for GGUF weights."""

    class Linear(_GGUFLayer, CastOps.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self._weight(x), self._bias(x))

    class Conv2d(_GGUFLayer, CastOps.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self._weight(x), self._bias(x))

    class Conv3d(_GGUFLayer, CastOps.Conv3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self._weight(x), self._bias(x))

    class LayerNorm(_GGUFLayer, CastOps.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, self._weight(x), self._bias(x), self.eps)

    class GroupNorm(_GGUFLayer, CastOps.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x, self.num_groups, self._weight(x), self._bias(x), self.eps)

    class RMSNorm(_GGUFLayer, CastOps.RMSNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, self.normalized_shape, self._weight(x), self.eps)

    class Embedding(_GGUFLayer, CastOps.Embedding):
        def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
            weight = self.weight
            patched = self._lora is not None or self._weight_patch() is not None
            if not isinstance(weight, QuantizedTensor) or patched or self.keeps_dequantized():
                if isinstance(weight, QuantizedTensor) or patched:
                    like = torch.empty(0, dtype=out_dtype or torch.float32, device=ids.device)
                    return F.embedding(ids, self._weight(like), self.padding_idx)
                return super().forward(ids, out_dtype)
            # Rows of packed blocks are independent: gather only the rows asked for, then dequantize them.
            rows = weight.as_subclass(torch.Tensor)[ids.to(weight.device).reshape(-1)]
            dim = weight.logical_shape[-1]
            packed = QuantizedTensor.wrap(rows, weight.qtype, (rows.shape[0], dim), weight.context)
            return packed.dequantize(out_dtype or torch.float32).reshape(*ids.shape, dim).to(ids.device)


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _gguf_layers(model: nn.Module) -> Iterable[tuple[str, _GGUFLayer]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, _GGUFLayer))


def enable_dequant_cache(model: nn.Module, enabled: bool | None = True,
                         layers: Sequence[str] = ONE_VECTOR_LAYERS) -> int:
    """Switch the dequant-once cache on layers whose name ends with one of ``layers``; returns how many.

    ``enabled=None`` returns them to their weights' default (``keep_dense``).  The cost is the dense weights held
    (in the compute dtype) once the layers have run: see :func:`memory_report`.
    """
    count = 0
    for name, layer in _gguf_layers(model):
        if _matches(name, layers):
            layer.set_dequant_cache(enabled)
            count += 1
    return count


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a model's GGUF layers: packed weights, and what each cache choice costs on top."""

    quantized_bytes: int
    dequant_cache_bytes: int
    lora_cache_bytes: int
    one_vector_cache_cost: int
    dequant_cache_planned: int

    @property
    def extra_bytes(self) -> int:
        """Everything held on top of the packed and plain weights (the caches)."""
        return self.dequant_cache_bytes + self.lora_cache_bytes


def memory_report(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> MemoryReport:
    """What the quantized weights and the caches hold now; ``one_vector_cache_cost`` is what caching every
    quantized :data:`ONE_VECTOR_LAYERS` weight costs in ``dtype``, ``dequant_cache_planned`` what the dequant-once
    caches that are on hold in ``dtype`` once every layer has run."""
    quantized = sum(p.numel() for p in model.parameters() if isinstance(p, QuantizedTensor))
    dequant_cache = lora_cache = one_vector = planned = 0
    for name, layer in _gguf_layers(model):
        if layer._lora is not None:
            lora_cache += layer.cached_bytes()
        else:
            dequant_cache += layer.cached_bytes()
        planned += layer.planned_cache_bytes(dtype)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, QuantizedTensor) and _matches(name, ONE_VECTOR_LAYERS):
            one_vector += weight.logical_shape.numel() * dtype.itemsize
    return MemoryReport(quantized, dequant_cache, lora_cache, one_vector, planned)
