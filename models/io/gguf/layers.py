"""Layers whose weights stay quantized in memory: :class:`QuantizedTensor` and the :class:`GGUFOps` namespace.

A :class:`QuantizedTensor` is a ``uint8`` tensor of packed ggml blocks that also knows its ggml type and logical
(torch-order) shape.  Moving it (``.to(device)``, ``.cuda()``, ``module.to()``), detaching, cloning, pinning,
``copy.deepcopy`` and ``state_dict()`` all keep it a QuantizedTensor; a ``.to(float dtype)`` only moves the
device (the bytes are not numbers).  Every other torch operation sees plain bytes.

:class:`GGUFOps` has the class names and constructor signatures of :class:`models.common.ops.CastOps`.  A layer whose
weight is a QuantizedTensor moves the packed bytes to the input's device and dequantizes them there, in the
input's dtype, at each call ("just in time"); F32/F16/BF16 weights behave exactly like CastOps.  Two caches
trade memory for time and are visible in :func:`memory_report`:

* the dequant-once cache (:func:`enable_dequant_cache`; by default the DiT's ``img_mod.1`` / ``txt_mod.1``
  modulation Linears, a third of all parameters, which see one vector per step), and
* LoRA: ``layer.set_lora([(up, down, scale), ...])`` or a dense delta is merged once into a cached dense weight
  instead of being re-applied at every call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...common.ops import CastOps, cast_bias, cast_weight
from .dequant import dequantize
from .reader import GGMLType, quantized_nbytes

__all__ = ["QuantizedTensor", "GGUFOps", "enable_dequant_cache", "memory_report", "MemoryReport",
           "MODULATION_LAYERS", "LoraDelta"]

MODULATION_LAYERS = ("img_mod.1", "txt_mod.1")

# (up [out, r], down [r, in...], scale) - the merged delta is scale * up @ down - or a dense delta tensor.
LoraDelta = tuple[torch.Tensor, torch.Tensor, float]

_KEEP_QUANTIZED = {
    "to", "cpu", "cuda", "clone", "detach", "detach_", "contiguous", "pin_memory", "requires_grad_",
    "share_memory_", "_to_copy",
}


class QuantizedTensor(torch.Tensor):
    """Packed ggml blocks (``uint8 [*shape[:-1], row_bytes]``) with ``qtype`` and ``logical_shape``."""

    qtype: GGMLType
    logical_shape: torch.Size

    @staticmethod
    def wrap(raw: torch.Tensor, qtype: GGMLType | int, shape: Sequence[int]) -> "QuantizedTensor":
        """View ``raw`` bytes as a QuantizedTensor (no copy)."""
        shape = torch.Size(int(d) for d in shape)
        if raw.dtype != torch.uint8 or raw.numel() != quantized_nbytes(GGMLType(qtype), shape):
            raise ValueError(f"{raw.numel()} {raw.dtype} values cannot hold a {GGMLType(qtype).name} tensor of "
                             f"shape {list(shape)}.")
        tensor = raw.as_subclass(QuantizedTensor)
        tensor.qtype = GGMLType(qtype)
        tensor.logical_shape = shape
        return tensor

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
            if not isinstance(result, QuantizedTensor) or result is not source:
                result = result.as_subclass(QuantizedTensor)
            result.qtype, result.logical_shape = source.qtype, source.logical_shape
        return result

    def __deepcopy__(self, memo: dict) -> "QuantizedTensor":
        if id(self) not in memo:
            copied = QuantizedTensor.wrap(self.as_subclass(torch.Tensor).clone(), self.qtype, self.logical_shape)
            if getattr(self, "_is_param", False):
                copied._is_param = True  # stays an nn.Parameter (custom-tensor parameters carry this flag)
            memo[id(self)] = copied
        return memo[id(self)]

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as an ordinary tensor of ``dtype`` on this tensor's device (written into ``out`` if given)."""
        return dequantize(self.as_subclass(torch.Tensor), self.qtype, self.logical_shape, dtype, out=out)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"QuantizedTensor({self.qtype.name}, shape={list(self.logical_shape)}, "
                f"{self.numel()} bytes, device={self.device})")


# Reused CPU buffers for just-in-time weights, one per role: fresh memory costs page faults that take longer than
# dequantizing (GPU allocators cache their blocks already).  A weight from here lives only for its own op.
_scratch: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def _scratch_for(role: str, numel: int, like: torch.Tensor) -> torch.Tensor | None:
    if like.device.type != "cpu":
        return None
    key = (role, like.device, like.dtype)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer[:numel]


def _dense(tensor: torch.Tensor | None, like: torch.Tensor, scratch: str | None = None) -> torch.Tensor | None:
    """A QuantizedTensor dequantized on ``like``'s device in its dtype (into the ``scratch`` role's reused buffer
    when given: only for a weight used once, right away); anything else unchanged."""
    if isinstance(tensor, QuantizedTensor):
        out = _scratch_for(scratch, tensor.logical_shape.numel(), like) if scratch else None
        return tensor.to(like.device).dequantize(like.dtype, out=out)
    return tensor


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

    cache_dequantized: bool = False
    _lora: Sequence[LoraDelta] | torch.Tensor | None = None
    _cached: torch.Tensor | None = None
    _cache_key: tuple | None = None

    def set_lora(self, deltas: Sequence[LoraDelta] | torch.Tensor | None) -> None:
        """Use ``weight + sum(scale * up @ down)`` (or ``weight + delta``); merged once, on the next call."""
        self._lora = deltas if deltas is None or isinstance(deltas, torch.Tensor) else list(deltas)
        self._drop_cache()

    def set_dequant_cache(self, enabled: bool) -> None:
        """Keep the dequantized weight between calls (for layers that see one vector per step)."""
        self.cache_dequantized = bool(enabled)
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._cached, self._cache_key = None, None

    def cached_bytes(self) -> int:
        return 0 if self._cached is None else self._cached.numel() * self._cached.element_size()

    def _weight(self, like: torch.Tensor) -> torch.Tensor | None:
        weight = self.weight
        if weight is None:
            return None
        quantized = isinstance(weight, QuantizedTensor)
        if self._lora is None and not (quantized and self.cache_dequantized):
            return _dense(weight, like, scratch="weight") if quantized else cast_weight(self, like)
        key = (id(weight), _version(weight), like.dtype, like.device)
        if self._cache_key != key:
            self._cached = None  # free the old cache before building the new one
            if self._lora is None:
                dense = _dense(weight, like)
            else:
                base = weight.to(like.device).dequantize(torch.float32) if quantized else \
                    cast_weight(self, torch.empty(0, dtype=torch.float32, device=like.device))
                dense = (base + _lora_delta(self._lora, base.shape, like.device)).to(like.dtype)
            self._cached, self._cache_key = dense, key
        return self._cached

    def _bias(self, like: torch.Tensor) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)
        return _dense(bias, like, scratch="bias") if isinstance(bias, QuantizedTensor) else cast_bias(self, like)


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
            if not isinstance(weight, QuantizedTensor) or self._lora is not None or self.cache_dequantized:
                if isinstance(weight, QuantizedTensor) or self._lora is not None:
                    like = torch.empty(0, dtype=out_dtype or torch.float32, device=ids.device)
                    return F.embedding(ids, self._weight(like), self.padding_idx)
                return super().forward(ids, out_dtype)
            # Rows of packed blocks are independent: gather only the rows asked for, then dequantize them.
            rows = weight.as_subclass(torch.Tensor)[ids.to(weight.device).reshape(-1)]
            dim = weight.logical_shape[-1]
            values = dequantize(rows, weight.qtype, (rows.shape[0], dim), out_dtype or torch.float32)
            return values.reshape(*ids.shape, dim).to(ids.device)


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _gguf_layers(model: nn.Module) -> Iterable[tuple[str, _GGUFLayer]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, _GGUFLayer))


def enable_dequant_cache(model: nn.Module, enabled: bool = True,
                         layers: Sequence[str] = MODULATION_LAYERS) -> int:
    """Switch the dequant-once cache on layers whose name ends with one of ``layers``; returns how many.

    The cost is the dense weights held (in the compute dtype) once the layers have run: see :func:`memory_report`.
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
    modulation_cache_cost: int

    @property
    def extra_bytes(self) -> int:
        """Everything held on top of the packed and plain weights (the caches)."""
        return self.dequant_cache_bytes + self.lora_cache_bytes


def memory_report(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> MemoryReport:
    """What the quantized weights and the caches hold now; ``modulation_cache_cost`` is what enabling the
    modulation cache costs in ``dtype`` (dense ``img_mod.1`` / ``txt_mod.1`` weights with packed ones)."""
    quantized = sum(p.numel() for p in model.parameters() if isinstance(p, QuantizedTensor))
    dequant_cache = lora_cache = modulation = 0
    element = torch.empty(0, dtype=dtype).element_size()
    for name, layer in _gguf_layers(model):
        if layer._lora is not None:
            lora_cache += layer.cached_bytes()
        else:
            dequant_cache += layer.cached_bytes()
        weight = getattr(layer, "weight", None)
        if isinstance(weight, QuantizedTensor) and _matches(name, MODULATION_LAYERS):
            modulation += weight.logical_shape.numel() * element
    return MemoryReport(quantized, dequant_cache, lora_cache, modulation)
