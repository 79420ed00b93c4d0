"""The host's layer classes and dtypes for our models: which ``comfy.ops`` a weight file is built with (so the
host's casting, offloading and weight patches apply), the compute dtype of a weight_dtype choice, and GGUF layers
the host's ModelPatcher can patch (LoRA on quantized weights)."""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.ops

from ...models import FLOAT8_DTYPES, GGUFOps, QuantizedTensor, open_checkpoint

logger = logging.getLogger("qwen_image")

# The fixed choices of the loaders' weight_dtype input (nodes/common.py WEIGHT_DTYPES); "auto" depends on the device.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype a loader computes in: the chosen one, or for "auto" bf16 where the device supports it, else fp32."""
    if choice in DTYPES:
        return DTYPES[choice]
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def host_ops(path: str, compute: torch.dtype):
    """The layer classes for a file, so the host's casting, offloading and weight patches (LoRA) apply, and the
    dtype the weights are stored in."""
    if path.lower().endswith(".gguf"):
        return HostGGUFOps, None  # quantized layers the host's ModelPatcher can patch
    checkpoint = open_checkpoint(path)  # header only
    stored = next((checkpoint.dtype(n) for n in checkpoint if n.endswith(("attn.to_q.weight", "q_proj.weight"))),
                  compute)
    if any(name.endswith(".scale_weight") for name in checkpoint):
        scaled_ops = getattr(comfy.ops, "scaled_fp8_ops", None)
        if scaled_ops is None:
            logger.warning("Qwen-Image: this ComfyUI has no scaled_fp8_ops; scaled fp8 runs without host casting")
            return None, stored
        return scaled_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=stored), stored
    if stored in FLOAT8_DTYPES:
        return comfy.ops.manual_cast, stored
    return comfy.ops.disable_weight_init, compute


class HostPatchable:
    """Lets the host's weight patches (LoRA loaders, model merging) reach GGUF weights.

    The ModelPatcher looks for ``convert_weight`` / ``set_weight`` on a layer (its hook for weights that are not
    plain tensors):

    * full load: it dequantizes through ``convert_weight``, applies its patches in fp32 and hands the result to
      ``set_weight``; we keep the packed weight and hold the patched dense weight (bf16 on GPUs, fp32 on CPU), used
      instead of dequantizing - the patch is merged once, not on every call.  It is dropped when the host unpatches
      (see :class:`.model.QwenImageModelPatcher`) or restores its backup (a new Parameter object);
    * low-VRAM (partial) load: like the host's own layers we carry ``comfy_cast_weights`` and ``weight_function``
      / ``bias_function``; the host attaches per-call patch functions, applied to the just-in-time dense weight.
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

    def clear_patch(self) -> None:
        self.__dict__.pop("_patched", None)

    def _weight(self, like: torch.Tensor):
        patched = self.__dict__.get("_patched")
        if patched is not None and patched[0] is not self.weight:  # the host restored its backup
            self.clear_patch()
            patched = None
        weight = super()._weight(like) if patched is None else patched[1].to(device=like.device, dtype=like.dtype)
        for function in self.weight_function:
            weight = function(weight).to(like.dtype)
        return weight

    def _bias(self, like: torch.Tensor):
        bias = super()._bias(like)
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
        pass

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
