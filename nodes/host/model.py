"""Our DiT as the host's MODEL: a BaseModel-compatible wrapper inside a ModelPatcher.

The host then samples it with its own samplers (KSampler, SamplerCustom...), loads / offloads / partially loads it
(our layers are built from the host's ``comfy.ops`` so its per-layer casting applies), applies LoRA patches from
its loaders to our weights (parameter names are the diffusers names, which the host maps for Qwen-Image LoRAs),
and interrupts it between steps.

Inside the host the DiT behaves like core's own Qwen model: its forward runs under the host's DIFFUSION_MODEL
wrappers (EasyCache, LazyCache, ...), every attention goes through the host's attention function with the
current ``transformer_options`` (backend flags, ``optimized_attention_override``), and block patches apply as core
applies them: ``patches_replace["dit"][("double_block", i)]`` replaces block ``i`` (its ``original_block`` runs
ours) and ``patches["double_block"]`` run after each block, with ``block_index`` / ``total_blocks`` /
``block_type`` set in the options.

Surfaces used, all present for years: ``comfy.model_base.BaseModel`` (its ``diffusion_model(x, t, context=...,
control=..., transformer_options=..., **extra_conds)`` call), ``comfy.supported_models_base.BASE``,
``comfy.model_patcher.ModelPatcher``, ``comfy.conds``, ``comfy.latent_formats``, ``comfy.model_management``,
``comfy.patcher_extension`` (guarded: without it the forward runs unwrapped).
``comfy.model_base.QwenImage`` (host >= 0.3.48) is used as the base class when present, only so the host's LoRA
key mapping for Qwen-Image files applies.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

from ...models import BLOCK_HOOK, QWEN_IMAGE_LATENT, BlockCall, QwenImageDiT, resolution_shift
from .attention import with_host_attention
from .ops import HostPatchable, patch_bytes

try:  # the host's wrapper machinery (ComfyUI >= 0.3.10)
    from comfy.patcher_extension import WrapperExecutor, WrappersMP, get_all_wrappers
except ImportError:  # pragma: no cover - older hosts run the forward unwrapped
    WrapperExecutor = None

logger = logging.getLogger("qwen_image")

# transformer_options["patches"] entry under which DiffSynth blockwise controls reach the DiT (nodes/control.py).
BLOCKWISE_PATCHES = "qip_blockwise"
# CONDITIONING option with the file name of the text encoder that made it (see HostTextEncoder.conditioning).
TEXT_ENCODER_KEY = "qip_text_encoder"
# CONDITIONING option with EliGen entities (models.Entities, set by nodes/eligen.py), passed to the DiT as they are.
ENTITIES_KEY = "qip_entities"


def _shift_for(width: int, height: int) -> float:
    latent_width, latent_height = QWEN_IMAGE_LATENT.latent_size(width, height)
    return resolution_shift(QWEN_IMAGE_LATENT.image_tokens(latent_height, latent_width))


# The model's default sampling: the reference's exponential shift for the 1328x1328 preset.
# Resolution-exact schedules come from the Qwen-Image Scheduler / Sampling Shift nodes.
DEFAULT_SHIFT = _shift_for(1328, 1328)


class QwenImageLatentFormat(getattr(comfy.latent_formats, QWEN_IMAGE_LATENT.host_format)):
    """The host's latent format with Qwen-Image's statistics, for 4-D ``[B,C,H,W]`` and 5-D ``[B,C,1,H,W]`` latents.

    Subclasses the host's own format of these statistics (so previews and host nodes that check for it keep
    working); the normalisation is the library's, which follows the latent's rank.
    """

    latent_channels = QWEN_IMAGE_LATENT.channels

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return QWEN_IMAGE_LATENT.normalize(latent)

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return QWEN_IMAGE_LATENT.denormalize(latent)


_warned: set[str] = set()
# What the DiT honours of the host's transformer_options: patches[kind] and patches_replace[kind].
_PATCH_KINDS = {"double_block", BLOCKWISE_PATCHES}
_REPLACE_KINDS = {"dit"}


def _warn_unhandled(kinds: set[str]) -> None:
    """Say once per kind that a host model patch this DiT has no place for is ignored."""
    for kind in sorted(kinds - _warned):
        _warned.add(kind)
        logger.warning("Qwen-Image: the '%s' model patch has no counterpart in the Qwen-Image DiT and is ignored "
                       "(supported: patches_replace['dit'] double_block, patches double_block).", kind)


def under_host_wrappers(model: torch.nn.Module, forward: Callable, args: tuple, options: dict,
                        kwargs: dict) -> torch.Tensor:
    """``forward(*args, options, **kwargs)`` under the host's DIFFUSION_MODEL wrappers (EasyCache ...), which find
    the ``transformer_options`` as the last positional argument, as with core's models."""
    if WrapperExecutor is None:
        return forward(*args, options, **kwargs)
    wrappers = get_all_wrappers(WrappersMP.DIFFUSION_MODEL, options)
    return WrapperExecutor.new_class_executor(forward, model, wrappers).execute(*args, options, **kwargs)


def _host_block_hook(options: dict, x: torch.Tensor):
    """Our DiT's block hook (:class:`BlockCall`) carrying out the host's block patches as core's Qwen model does."""
    replace = (options.get("patches_replace") or {}).get("dit") or {}
    after = (options.get("patches") or {}).get("double_block") or []

    def hook(call: BlockCall) -> tuple[torch.Tensor, torch.Tensor]:
        options["block_index"] = call.index
        patch = replace.get(("double_block", call.index))
        if patch is None:
            img, txt = call.run(call.img, call.txt, call.temb, call.rope)
        else:
            def original_block(args: dict) -> dict:
                # our blocks update their inputs in place: a patch may still read args["img"] afterwards
                temb = call.temb if args["vec"] is call.vec else F.silu(args["vec"])
                img_out, txt_out = call.run(args["img"].clone(), args["txt"].clone(), temb, args["pe"])
                return {"img": img_out, "txt": txt_out}

            out = patch({"img": call.img, "txt": call.txt, "vec": call.vec, "pe": call.rope,
                         "transformer_options": options}, {"original_block": original_block})
            img, txt = out["img"], out["txt"]
        for patch_after in after:
            out = patch_after({"img": img, "txt": txt, "x": x, "block_index": call.index,
                               "transformer_options": options})
            img, txt = out["img"], out["txt"]
        return img, txt

    return hook


def _pad_to_patches(latent: torch.Tensor) -> torch.Tensor:
    """Pad latent sides to whole DiT patches by edge replication (never wrap-around copies of the far edge)."""
    patch = QWEN_IMAGE_LATENT.patch_size
    pad_h, pad_w = -latent.shape[-2] % patch, -latent.shape[-1] % patch
    if not (pad_h or pad_w):
        return latent
    # replicate padding pads every axis after batch and channels: none along a layered latent's frames
    return F.pad(latent, (0, pad_w, 0, pad_h) + (0, 0) * (latent.ndim - 4), mode="replicate")


def as_image_latent(latent: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` from the host's 4-D or single-frame 5-D latent."""
    if latent.ndim == 5:
        if latent.shape[2] != 1:
            raise ValueError(f"Qwen-Image works on single images, got a latent with {latent.shape[2]} frames")
        latent = latent[:, :, 0]
    return latent


def _check_conditioning_width(context: torch.Tensor | None, width: int, model: str, encoder: str | None) -> None:
    """Conditioning from a text encoder of another width (e.g. Qwen2.5-VL-3B) is refused naming both files,
    not left to fail as a matrix-shape error deep in the DiT."""
    if context is None or context.shape[-1] == width:
        return
    made_by = f" (made by the text encoder {encoder})" if encoder else ""
    raise ValueError(
        f"The prompt conditioning is {context.shape[-1]} wide{made_by}, but the diffusion model {model} reads "
        f"{width}-wide conditioning: they do not belong together. Load the text encoder made for this model in "
        "Load Qwen-Image Text Encoder (Qwen2.5-VL-7B for the released Qwen-Image models).")


class HostQwenImageDiT(QwenImageDiT):
    """The DiT with the host's calling convention; parameters and maths are those of :class:`QwenImageDiT`."""

    source = "(loaded by the library)"  # the file it came from, for messages; the loader node sets it

    @property
    def dtype(self) -> torch.dtype:  # the host reads diffusion_model.dtype to cast inputs
        return self.compute_dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, ref_latents: list[torch.Tensor] | None = None,
                control=None, transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        """The host's call: :meth:`_forward` under the host's DIFFUSION_MODEL wrappers."""
        options = {} if transformer_options is None else transformer_options
        return under_host_wrappers(self, self._forward, (x, timesteps, context, attention_mask, ref_latents, control),
                                   options, kwargs)

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, ref_latents: list[torch.Tensor] | None, control,
                 transformer_options: dict, **kwargs) -> torch.Tensor:
        _check_conditioning_width(context, self.config.joint_dim, self.source, kwargs.get(TEXT_ENCODER_KEY))
        frames = x.ndim == 5
        layered = frames and x.shape[2] > 1  # Qwen-Image-Layered: the whole image and its layers
        latent = x if layered else as_image_latent(x)
        height, width = latent.shape[-2:]
        refs = [_pad_to_patches(as_image_latent(r)) for r in ref_latents] if ref_latents else None
        # ControlNet residuals (the host's control dict, summed over chained controls) and blockwise patches.
        residuals = control.get("input") if isinstance(control, dict) else None
        options = transformer_options
        _warn_unhandled(set(options.get("patches") or {}) - _PATCH_KINDS
                        | set(options.get("patches_replace") or {}) - _REPLACE_KINDS)
        patches = (options.get("patches") or {}).get(BLOCKWISE_PATCHES, [])
        block_patches = [patch.for_latent(latent) for patch in patches] or None
        patch_size = QWEN_IMAGE_LATENT.patch_size
        if (residuals or block_patches) and (height % patch_size or width % patch_size):
            raise ValueError(f"control needs whole DiT patches (image sides multiples of "
                             f"{QWEN_IMAGE_LATENT.pixel_multiple}), got a {width}x{height} latent")
        options["total_blocks"], options["block_type"] = len(self.transformer_blocks), "double"  # as core sets them
        run_options = with_host_attention(options)
        run_options[BLOCK_HOOK] = _host_block_hook(run_options, x)
        out = super().forward(_pad_to_patches(latent), timesteps, context, context_mask=attention_mask,
                              ref_latents=refs, control=residuals or None, block_patches=block_patches,
                              options=run_options, entities=kwargs.get(ENTITIES_KEY))
        out = out[..., :height, :width]
        return out.unsqueeze(2) if frames and not layered else out


class QwenImageModelConfig(comfy.supported_models_base.BASE):
    """What the host needs to know about the model; the network itself is built by our loader."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    sampling_settings = {"shift": DEFAULT_SHIFT}
    latent_format = QwenImageLatentFormat
    memory_usage_factor = 1.8
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


_HostBase = getattr(comfy.model_base, "QwenImage", comfy.model_base.BaseModel)


class QwenImageHostModel(_HostBase):
    """BaseModel around an already-built :class:`HostQwenImageDiT` (flow matching, Flux-style exponential shift)."""

    def __init__(self, dit: HostQwenImageDiT, config: QwenImageModelConfig, device: torch.device | None = None):
        comfy.model_base.BaseModel.__init__(self, config, comfy.model_base.ModelType.FLUX, device=device)
        self.diffusion_model = dit
        self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs) -> dict:
        out = comfy.model_base.BaseModel.extra_conds(self, **kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        references = kwargs.get("reference_latents")
        if references:
            out["ref_latents"] = comfy.conds.CONDList([self.process_latent_in(r) for r in references])
        for key in (TEXT_ENCODER_KEY, ENTITIES_KEY):  # constants: conditionings batch only when they share them
            if kwargs.get(key) is not None:
                out[key] = comfy.conds.CONDConstant(kwargs[key])
        return out

    def extra_conds_shapes(self, **kwargs) -> dict:
        references = kwargs.get("reference_latents")
        if not references:
            return {}
        channels = QWEN_IMAGE_LATENT.channels
        return {"ref_latents": [1, channels, sum(math.prod(r.shape) for r in references) // channels]}


class QwenImageModelPatcher(comfy.model_patcher.ModelPatcher):
    """The host's ModelPatcher, patching GGUF layers per call: where the host would merge its patches (LoRA,
    merges) into a GGUF layer's weight, the layer gets the host's patch list and applies it each time it dequantizes
    the weight (:class:`.ops.DequantPatch`) - no dense patched copy.  What that keeps (the patch tensors, moved to
    the device once) and the dense weights of the dequant-once cache count in the model's size (the host makes room
    for them before loading) and, in partial loads, come out of the host's budget."""

    _Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # the host's record of a weight

    def model_size(self) -> int:
        if getattr(self, "_weights_size", None) is None:  # the packed weights themselves, measured once
            self._weights_size = comfy.model_management.module_size(self.model)
        return self._weights_size + self.patched_gguf_bytes() + self.gguf_cache_bytes()

    def _gguf_layer(self, key: str) -> HostPatchable | None:
        """The GGUF layer whose weight ``key`` names, if it is one."""
        owner_name, _, leaf = key.rpartition(".")
        if leaf != "weight" or not owner_name:
            return None
        try:
            module = self.model.get_submodule(owner_name)
        except AttributeError:
            return None
        return module if isinstance(module, HostPatchable) else None

    def patched_gguf_bytes(self) -> int:
        """Memory the patches of GGUF layers keep on the device: their tensors (LoRA factors) in the compute dtype."""
        dtype = self.model.diffusion_model.dtype
        return sum(patch_bytes(patches, dtype) for key, patches in self.patches.items()
                   if self._gguf_layer(key) is not None)

    def gguf_cache_bytes(self) -> int:
        """Memory of the dense weights GGUF layers keep dequantized (the one-vector cache; patched, for a patched
        layer) in the compute dtype."""
        dtype = self.model.diffusion_model.dtype
        return sum(module.planned_cache_bytes(dtype) for module in self.model.modules()
                   if isinstance(module, HostPatchable))

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        # newer hosts may ask for the patched weight itself (return_weight, after inplace_update): theirs to compute
        return_weight = kwargs.get("return_weight", len(args) > 1 and args[1])
        layer = self._gguf_layer(key) if key in self.patches and not return_weight else None
        if layer is None:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        if key not in self.backup:  # as the host records one: restoring it (a new Parameter) drops the patch
            self.backup[key] = self._Backup(layer.weight, False)
        layer.set_patches(key, self.patches[key])
        return None

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        # A full load counts model_size(); a partial one counts module sizes only: reserve our extras from its budget.
        extra = 0 if full_load else min(lowvram_model_memory, self.patched_gguf_bytes() + self.gguf_cache_bytes())
        result = super().load(device_to, lowvram_model_memory=lowvram_model_memory - extra,
                              force_patch_weights=force_patch_weights, full_load=full_load, **kwargs)
        self.model.model_loaded_weight_memory += extra
        return result

    def unpatch_model(self, device_to=None, unpatch_weights=True, *args, **kwargs):
        result = super().unpatch_model(device_to, unpatch_weights, *args, **kwargs)
        if unpatch_weights:
            for module in self.model.modules():
                if isinstance(module, HostPatchable):
                    module.clear_patch()
        return result


def wrap_diffusion_model(dit: HostQwenImageDiT, weight_dtype: torch.dtype,
                         manual_cast_dtype: torch.dtype | None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher (the host's MODEL) around a loaded DiT that sits on the offload device."""
    config = QwenImageModelConfig(QwenImageModelConfig.unet_config)
    config.set_inference_dtype(weight_dtype, manual_cast_dtype)
    model = QwenImageHostModel(dit, config, device=comfy.model_management.unet_offload_device())
    return QwenImageModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                 offload_device=comfy.model_management.unet_offload_device())
