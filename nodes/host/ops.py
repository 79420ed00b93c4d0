"""The host's layer classes and dtypes for our models: which ``comfy.ops`` a weight file is built with (so the
host's casting, offloading and weight patches apply), the compute dtype of a weight_dtype choice, and GGUF layers
the host's ModelPatcher can patch (LoRA on quantized weights)."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher

from ...models import FLOAT8_DTYPES, GGUFOps, QuantizedTensor, open_checkpoint
from .quant import safetensors_ops

# The fixed choices of the loaders' weight_dtype input (nodes/common.py WEIGHT_DTYPES); "auto" depends on the device.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(choice: str, device: torch.device, fp16_safe: bool = False) -> torch.dtype:
    """The dtype a loader computes in: the chosen one, or for "auto" bf16 where the device supports it; without
    bf16, fp16 for a model that is safe in it (``fp16_safe``: the DiT keeps its residual streams in fp32) where
    the device computes fp16 well, else fp32."""
    if choice in DTYPES:
        return DTYPES[choice]
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if fp16_safe and mm.should_use_fp16(device) else torch.float32


def host_ops(path: str, compute: torch.dtype) -> tuple[type, torch.dtype | None]:
    """The layer classes for a file, so the host's casting, offloading, weight patches (LoRA) and fp8 matmul
    apply (chosen by the host's ``pick_operations`` as for its own models, see :mod:`.quant`), and the dtype the
    weights are stored in (``compute`` for weights the loaders convert; None for GGUF)."""
    if path.lower().endswith(".gguf"):
        return HostGGUFOps, None  # quantized layers the host's ModelPatcher can patch
    checkpoint = open_checkpoint(path)  # header only
    stored = next((checkpoint.dtype(n) for n in checkpoint if n.endswith(("attn.to_q.weight", "q_proj.weight"))),
                  compute)
    return safetensors_ops(checkpoint, stored, compute), stored if stored in FLOAT8_DTYPES else compute


try:  # the host's weight adapters (ComfyUI >= 0.3.27); older hosts keep LoRAs as tuples (the general path)
    from comfy.weight_adapter import LoKrAdapter, LoRAAdapter, WeightAdapterBase
except ImportError:  # pragma: no cover
    LoKrAdapter = LoRAAdapter = WeightAdapterBase = None
LowVramPatch = getattr(comfy.model_patcher, "LowVramPatch", None)  # the host's per-call patch of offloaded layers


def _map_tensors(value, fn):
    """A host patch value with ``fn`` applied to its tensors (in tuples and adapters' ``weights``; adapters are
    copied, never changed).  Lists (another model's weights, for merging) and everything else stay as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(item, fn) for item in value)
    if WeightAdapterBase is not None and isinstance(value, WeightAdapterBase):
        adapter = copy.copy(value)
        adapter.weights = _map_tensors(value.weights, fn)
        return adapter
    return value


def _tensors(value) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(value, found.append)
    return found


def patch_bytes(patches: list, dtype: torch.dtype) -> int:
    """What :class:`DequantPatch` keeps on the device for the host's ``patches`` of one weight: their tensors in the
    compute ``dtype`` (the LoRA's own size; nothing of the weight's size unless the patch is a full diff)."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for patch in patches for t in _tensors(patch[1]))


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype)  # a no-op for kept tensors


class _LowRank(NamedTuple):
    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in]
    scale: float


def _low_rank(patch: tuple, shape: torch.Size) -> _LowRank | None:
    """``(up, down, scale)`` of a plain LoRA / LoCon patch (core's rule: ``weight += strength * alpha / rank *
    up @ down``) with factors that fit ``shape``; None for anything else (DoRA, mid weights, offsets, functions)."""
    strength, value, strength_model, offset, function = patch[:5]
    if LoRAAdapter is None or type(value) is not LoRAAdapter or len(value.weights) != 6:
        return None
    up, down, alpha, mid, dora_scale, reshape = value.weights
    if offset is not None or function is not None or strength_model != 1.0 or \
            mid is not None or dora_scale is not None or reshape is not None:
        return None
    up, down = up.flatten(1), down.flatten(1)
    if up.shape[0] != shape[0] or up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != shape.numel():
        return None  # the host's path logs the mismatch and leaves the weight as it is
    return _LowRank(up, down, strength * (alpha / down.shape[0] if alpha is not None else 1.0))


class _Kron(NamedTuple):
    w1: tuple[torch.Tensor, ...]  # the [a1, a2] block, or its two low-rank factors
    w2: tuple[torch.Tensor, ...]  # the [b1, b2] block, or its two low-rank factors
    scale: float


def _kron(patch: tuple, shape: torch.Size) -> _Kron | None:
    """A LyCORIS LoKr patch of a matrix (core's rule: ``weight += strength * alpha / dim * kron(w1, w2)``, ``dim``
    the rank of the last factored block, scale 1 without alpha or factors); None for anything else (Tucker ``t2``,
    DoRA, convolutions, offsets, functions)."""
    strength, value, strength_model, offset, function = patch[:5]
    if LoKrAdapter is None or type(value) is not LoKrAdapter or len(value.weights) != 9 or len(shape) != 2:
        return None
    w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale = value.weights
    if offset is not None or function is not None or strength_model != 1.0 or t2 is not None or \
            dora_scale is not None:
        return None
    dim = None
    if w1 is None:
        dim = w1_b.shape[0]
    if w2 is None:
        dim = w2_b.shape[0]
    first, second = (w1,) if w1 is not None else (w1_a, w1_b), (w2,) if w2 is not None else (w2_a, w2_b)
    if any(t.ndim != 2 for t in first + second) or \
            (first[0].shape[0] * second[0].shape[0], first[-1].shape[1] * second[-1].shape[1]) != tuple(shape):
        return None
    return _Kron(first, second, strength * (alpha / dim if alpha is not None and dim is not None else 1.0))


def _block(factors: tuple[torch.Tensor, ...], like: torch.Tensor) -> torch.Tensor:
    """A LoKr block from its factors, in ``like``'s dtype on its device."""
    block = _like(factors[0], like)
    return block if len(factors) == 1 else block @ _like(factors[1], like)


class DequantPatch:
    """The host's patches of one weight (the ModelPatcher's own list for the key: it stays the single source of
    truth), applied at each call instead of being merged into a kept dense copy.

    * Merged at dequantization (:meth:`__call__`): plain LoRA factors go into the just-dequantized weight with one
      in-place rank-r matmul (``dense += scale * up @ down``), LoKr blocks with one fused pass (``dense +=
      scale * kron(w1, w2)`` through a 4-D view): no temporary of the weight's size; every other patch (LoHa, full
      diffs, DoRA, Tucker LoKr, merges, ...) through the host's own ``comfy.lora.calculate_weight``, in the compute
      dtype like the host's low-VRAM path.
    * Bypassed (:meth:`add_low_rank`, Linear layers whose patches are all plain LoRAs, when it is cheaper: fewer
      input rows than ``in * out / (in + out)``, e.g. text tokens or one-vector layers):
      ``out += scale * (x @ down.T) @ up.T`` after the unpatched matmul, rank-r work per row instead of per weight.

    ``keep``: the patch tensors are moved to the device and compute dtype on first use and kept there (layers the
    host loaded; counted by :func:`patch_bytes`); otherwise they are cast at each call (layers the host leaves
    offloaded, as it does).
    """

    def __init__(self, key: str, patches: list, keep: bool = True):
        self.key, self.patches, self.keep = key, patches, keep
        self._steps: tuple[tuple, list] | None = None  # ((device, dtype), steps): one attribute, replaced atomically

    def _prepared(self, like: torch.Tensor, shape: torch.Size) -> list:
        """Per patch a :class:`_LowRank` or the host's patch tuple, for a weight of ``shape`` computing like
        ``like``; the tensors moved once when ``keep``."""
        where = (like.device, like.dtype)
        held = self._steps
        if held is not None and held[0] == where:
            return held[1]

        def move(t: torch.Tensor) -> torch.Tensor:
            if not self.keep:
                return t
            return t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)

        steps = []
        for patch in self.patches:
            low_rank, kron = _low_rank(patch, shape), _kron(patch, shape)
            if low_rank is not None:
                steps.append(_LowRank(move(low_rank.up), move(low_rank.down), low_rank.scale))
            elif kron is not None:
                steps.append(_Kron(tuple(map(move, kron.w1)), tuple(map(move, kron.w2)), kron.scale))
            else:
                steps.append((patch[0], _map_tensors(patch[1], move), *patch[2:]))
        self._steps = (where, steps)
        return steps

    def __call__(self, dense: torch.Tensor) -> torch.Tensor:
        dense = dense.contiguous()  # a no-op for dequantized weights; the low-rank step writes through a view
        for step in self._prepared(dense, dense.shape):
            if isinstance(step, _LowRank):
                dense.view(dense.shape[0], -1).addmm_(_like(step.up, dense), _like(step.down, dense),
                                                      alpha=step.scale)
            elif isinstance(step, _Kron):  # kron(w1, w2)[i b1 + k, j b2 + l] = w1[i, j] w2[k, l]
                w1, w2 = _block(step.w1, dense), _block(step.w2, dense)
                dense.view(w1.shape[0], w2.shape[0], w1.shape[1], w2.shape[1]).addcmul_(
                    w1[:, None, :, None], w2[None, :, None, :], value=step.scale)
            else:
                dense = comfy.lora.calculate_weight([step], dense, self.key, intermediate_dtype=dense.dtype)
        return dense

    def bypasses(self, x: torch.Tensor, shape: torch.Size) -> bool:
        """Whether :meth:`add_low_rank` applies to ``x`` for a ``[out, in]`` weight and costs less than merging."""
        rows = x.numel() // shape[1]
        return rows * (shape[0] + shape[1]) < shape.numel() and \
            all(isinstance(step, _LowRank) for step in self._prepared(x, shape))

    def add_low_rank(self, x: torch.Tensor, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``out`` (the unpatched Linear's output for ``x``, written in place) plus every LoRA's
        ``scale * (x @ down.T) @ up.T``."""
        rows, flat = x.reshape(-1, shape[1]), out.view(-1, shape[0])
        for step in self._prepared(x, shape):
            # F.linear, not rows @ down.t(): on CPUs the transposed-view matmul can take a slow kernel (10-100x)
            flat.addmm_(F.linear(rows, _like(step.down, x)), _like(step.up, x).t(), alpha=step.scale)
        return out

    def held_bytes(self) -> int:
        """Memory of the patch tensors moved to the device so far (0 when they are the host's own)."""
        held = self._steps
        if held is None or not self.keep:
            return 0
        own = {t.data_ptr() for patch in self.patches for t in _tensors(patch[1])}
        return sum(t.numel() * t.element_size() for step in held[1] for t in _tensors(tuple(step))
                   if t.data_ptr() not in own)


class HostPatchable:
    """Lets the host's weight patches (LoRA loaders, model merging) reach GGUF weights without a dense copy.

    * Our ModelPatcher (:class:`.model.QwenImageModelPatcher`) hands the host's patch list of a weight to
      :meth:`set_patches` when the host would merge it: the layer applies it at each call (:class:`DequantPatch`:
      merged into the just-dequantized weight, or for plain LoRAs on Linears with few input rows bypassed; a layer
      with the dequant-once cache keeps its patched weight there instead, counted like the cache).  It is dropped
      when the host unpatches or restores its backup (a new Parameter object).
    * Low-VRAM (partial) loads: like the host's own layers we carry ``comfy_cast_weights`` and ``weight_function``
      / ``bias_function``; the host's per-call patch of the weight (its ``LowVramPatch``) is applied the same way,
      at dequantization, its tensors cast per call as the host does; any other function runs after.
    * Other ModelPatchers (the text encoder's) find ``convert_weight`` / ``set_weight``, their hook for weights
      that are not plain tensors: they dequantize, patch in fp32 and hand us the result, which we hold densely
      (bf16 on GPUs, fp32 on CPU) until they unpatch.
    """

    comfy_cast_weights = False  # set by the host for layers it leaves offloaded; we cast per call in any case
    weight_function: list = []
    bias_function: list = []

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        if isinstance(weight, QuantizedTensor):
            return weight.dequantize(torch.float32)
        return weight if inplace else weight.clone()  # the caller patches the result in place

    def set_weight(self, patched: torch.Tensor, inplace_update: bool = False, seed: int = 0,
                   return_weight: bool = False, **kwargs):
        if return_weight:  # low-VRAM path: the patched weight is used for this call only
            return patched
        if inplace_update:
            raise RuntimeError("Hooked (scheduled) LoRAs are not supported on GGUF weights; load the LoRA with a "
                               "plain LoRA loader instead.")
        stored = torch.bfloat16 if patched.device.type == "cuda" else torch.float32
        self.__dict__["_patched"] = (self.weight, patched.to(stored))  # plain attribute, not a parameter
        return None

    def set_patches(self, key: str, patches: list) -> None:
        """Apply the host's ``patches`` (its list for ``key``, this layer's weight) at each dequantization."""
        self.clear_patch()
        self.__dict__["_host_patch"] = (self.weight, DequantPatch(key, patches))

    def clear_patch(self) -> None:
        held = [self.__dict__.pop(name, None) for name in ("_patched", "_host_patch", "_lowvram_memo")]
        if any(value is not None for value in held):
            self._cache = None  # it may hold the patched weight

    def _held(self, name: str):
        """The ``(weight, value)`` attribute's value while the weight is the one it was made for; dropped once
        the host has restored its backup (a new Parameter object)."""
        held = self.__dict__.get(name)
        if held is not None and held[0] is not self.weight:
            self.clear_patch()
            return None
        return None if held is None else held[1]

    def _lowvram_patch(self) -> DequantPatch | None:
        """The host's low-VRAM patch of the weight (its first weight function) as a :class:`DequantPatch` that
        keeps nothing on the device; None when there is none or this host's patch object is not understood."""
        functions = self.weight_function
        function = functions[0] if functions else None
        if LowVramPatch is None or not isinstance(function, LowVramPatch) or \
                self.__dict__.get("_host_patch") is not None:
            return None
        key, patches = getattr(function, "key", None), getattr(function, "patches", None)
        if not isinstance(patches, dict) or key not in patches:
            return None
        memo = self.__dict__.get("_lowvram_memo")
        if memo is None or memo[0] is not function:  # one per host function, so the dequant cache can key on it
            memo = self.__dict__["_lowvram_memo"] = (function, DequantPatch(key, patches[key], keep=False))
        return memo[1]

    def _weight_patch(self) -> DequantPatch | None:
        patch = self._held("_host_patch")
        return patch if patch is not None else self._lowvram_patch()

    def patch_held_bytes(self) -> int:
        """Memory the layer's patch keeps on the device now (its tensors moved there; see :class:`DequantPatch`)."""
        patch = self._held("_host_patch")
        return 0 if patch is None else patch.held_bytes()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._held("_host_patch")  # the host moves a layer after restoring its backup: drop the patch's tensors now
        return result

    def _functions(self) -> list:
        """The host's weight functions still to run on the dense weight (its low-VRAM patch is applied as ours)."""
        functions = self.weight_function
        return functions[1:] if self._lowvram_patch() is not None else functions

    def _weight(self, like: torch.Tensor, patched: bool = True):
        dense = self._held("_patched")
        weight = super()._weight(like, patched) if dense is None else dense.to(device=like.device, dtype=like.dtype)
        for function in self._functions():
            weight = function(weight).to(like.dtype)
        return weight

    def _bias(self, like: torch.Tensor):
        bias = super()._bias(like)
        if self.bias_function and bias is self.bias:
            bias = bias.clone()  # the host's patch functions add to their input in place: never to the parameter
        for function in self.bias_function:
            bias = function(bias).to(like.dtype)
        return bias


def set_gguf_dequant_cache(model: torch.nn.Module, enabled: bool) -> None:
    """The diffusion-model loader's dequant_cache switch.  On: GGUF layers keep the weights their file marks (those
    of the layers that see one vector per step, within a budget) dequantized after first use, counted in the model
    size the host plans with (:meth:`.model.QwenImageModelPatcher.gguf_cache_bytes`).  Off: every weight is
    dequantized at each use (the least memory)."""
    for module in model.modules():
        if isinstance(module, HostPatchable):
            module.set_dequant_cache(None if enabled else False)


class HostGGUFOps(GGUFOps):
    """GGUF layers the host's ModelPatcher can patch (see :class:`HostPatchable`)."""

    class Linear(HostPatchable, GGUFOps.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patch, weight = self._weight_patch(), self.weight
            if patch is None or self._functions() or (self.keeps_dequantized() and weight.device == x.device):
                return super().forward(x)  # nothing to bypass, or the patched weight is cached
            shape = weight.logical_shape if isinstance(weight, QuantizedTensor) else weight.shape
            if not patch.bypasses(x, shape):
                return super().forward(x)
            return patch.add_low_rank(x, F.linear(x, self._weight(x, patched=False), self._bias(x)), shape)

    class Conv2d(HostPatchable, GGUFOps.Conv2d):
        pass

    class Conv3d(HostPatchable, GGUFOps.Conv3d):
        pass

    class LayerNorm(HostPatchable, GGUFOps.LayerNorm):
        pass

    class GroupNorm(HostPatchable, GGUFOps.GroupNorm):
        pass

    class RMSNorm(HostPatchable, GGUFOps.RMSNorm):
        pass

    class Embedding(HostPatchable, GGUFOps.Embedding):
        pass
