"""Loaders: the diffusion model (MODEL), the Qwen2.5-VL text encoder and the VAE, from the host's model folders.

Each lists only what it can load (single files incl. ``.gguf``, and diffusers/HF folders), logs the variant it
detected, and fails with the loader's own message (what was found, what was expected) on a wrong file.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

import comfy.model_management as mm
import comfy.ops

from ..models import FLOAT8_DTYPES, load_diffusion_model, load_text_encoder, load_vae, open_checkpoint
from .common import CATEGORY, mappings
from .host_components import HostTextEncoder, HostVAE
from .host_model import HostGGUFOps, HostQwenImageDiT, wrap_diffusion_model
from .model_files import list_models, register_gguf_extension, resolve

logger = logging.getLogger("qwen_image")
register_gguf_extension()

WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_TOOLTIP = ("Compute / storage precision. auto: bf16 on GPUs that support it, fp32 otherwise (fp16 "
                 "overflows in Qwen-Image). fp8 and GGUF weights stay as stored and are upcast per layer.")
TEXT_ENCODER_TYPE = "QWEN_IMAGE_TEXT_ENCODER"
ZERO_COND = {"auto (from the file)": None, "on (Edit-2511)": True, "off": False}


def _host_tokenizer_dir() -> str:
    # Every ComfyUI that supports Qwen ships the tokenizer files here (tokenizer data is never bundled with us).
    return os.path.join(os.path.dirname(comfy.ops.__file__), "text_encoders", "qwen25_tokenizer")


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if DTYPES[choice] is not None:
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


class DiffusionModelLoader:
    NODE_ID = "DiffusionModelLoader"
    DISPLAY_NAME = "Load Qwen-Image Diffusion Model"
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Qwen-Image DiT, managed by ComfyUI like its own models.",)
    DESCRIPTION = ("Loads a Qwen-Image / Qwen-Image-Edit (2509, 2511) diffusion model: Comfy-Org single files "
                   "(bf16, fp16, fp8, scaled fp8), diffusers transformer folders, or GGUF.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (list_models("diffusion_models", "transformer", WEIGHT_EXTENSIONS), {
                "tooltip": "A file or diffusers folder in models/diffusion_models (or models/unet)."}),
            "weight_dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
            "edit_2511": (list(ZERO_COND), {
                "tooltip": "Edit-2511 modulates the reference images with t = 0 (zero_cond_t). Detected from the "
                           "file (Comfy-Org marker or diffusers config); force it for files that lack the marker."}),
        }}

    def load(self, model_name: str, weight_dtype: str, edit_2511: str):
        path = resolve("diffusion_models", model_name)
        load_device = mm.get_torch_device()
        compute = compute_dtype(weight_dtype, load_device)
        ops, stored = host_ops(path, compute)
        dit = load_diffusion_model(path, dtype=compute, device=mm.unet_offload_device(), ops=ops,
                                   model_class=HostQwenImageDiT)
        if ZERO_COND[edit_2511] is not None and ZERO_COND[edit_2511] != dit.config.zero_cond_t:
            dit.config = dataclasses.replace(dit.config, zero_cond_t=ZERO_COND[edit_2511])
            logger.info("Qwen-Image DiT: Edit-2511 zero_cond_t set %s by the loader", "on" if dit.config.zero_cond_t
                        else "off")
        storage = stored if stored in FLOAT8_DTYPES else compute
        return (wrap_diffusion_model(dit, storage, compute if storage != compute else None),)


class TextEncoderLoader:
    NODE_ID = "TextEncoderLoader"
    DISPLAY_NAME = "Load Qwen-Image Text Encoder"
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    OUTPUT_TOOLTIPS = ("The Qwen2.5-VL condition encoder with its tokenizer.",)
    DESCRIPTION = ("Loads the Qwen2.5-VL-7B condition encoder: Comfy single files (bf16, scaled fp8), HF folders, "
                   "or a llama.cpp GGUF with its mmproj-*.gguf next to it (needed for editing).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder_name": (list_models("text_encoders", "text_encoder", WEIGHT_EXTENSIONS), {
                "tooltip": "A file or HF folder in models/text_encoders (or models/clip), e.g. "
                           "qwen_2.5_vl_7b.safetensors."}),
            "weight_dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, text_encoder_name: str, weight_dtype: str):
        path = resolve("text_encoders", text_encoder_name)
        load_device = mm.text_encoder_device()
        compute = compute_dtype(weight_dtype, load_device)
        encoder = load_text_encoder(path, dtype=compute, device=mm.text_encoder_offload_device(),
                                    ops=host_ops(path, compute)[0], host_tokenizer_dirs=[_host_tokenizer_dir()])
        logger.info("Qwen-Image text encoder: %s (%s, vision tower: %s)", text_encoder_name, compute,
                    "yes" if encoder.has_vision else "no")
        return (HostTextEncoder(encoder, load_device, mm.text_encoder_offload_device()),)


class VAELoader:
    NODE_ID = "VAELoader"
    DISPLAY_NAME = "Load Qwen-Image VAE"
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The Qwen-Image VAE; works with the core VAE Decode / VAE Encode nodes too.",)
    DESCRIPTION = "Loads the Qwen-Image VAE (qwen_image_vae.safetensors, or a diffusers vae folder)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae_name": (list_models("vae", "vae", (".safetensors", ".sft")), {
                "tooltip": "A file or diffusers folder in models/vae, e.g. qwen_image_vae.safetensors."}),
            "weight_dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, vae_name: str, weight_dtype: str):
        path = resolve("vae", vae_name)
        compute = compute_dtype(weight_dtype, mm.vae_device())
        vae = load_vae(path, dtype=compute, device=mm.vae_offload_device(), ops=comfy.ops.disable_weight_init)
        return (HostVAE(vae),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(DiffusionModelLoader, TextEncoderLoader, VAELoader)
