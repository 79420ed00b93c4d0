"""Loaders: the diffusion model (MODEL), the Qwen2.5-VL text encoder and the VAE, from the host's model folders.

Each lists only what it can load (single files incl. ``.gguf``, and diffusers/HF folders), logs the variant it
detected, and fails with the loader's own message (what was found, what was expected) on a wrong file.
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management as mm
import comfy.ops

from ..models import FLOAT8_DTYPES, load_diffusion_model, load_text_encoder, load_vae
from .common import (LOADERS, Node, TextEncoder, badge_ui, dequant_cache_input, io, loader_inputs, mappings, output,
                     schema)
from .host.components import HostTextEncoder, HostVAE, host_tokenizer_dir
from .host.files import SAFETENSORS_EXTENSIONS, WEIGHT_EXTENSIONS, chosen_file, list_models
from .host.model import HostQwenImageDiT, wrap_diffusion_model
from .host.ops import compute_dtype, host_ops, set_gguf_dequant_cache

logger = logging.getLogger("qwen_image")
ZERO_COND = {"auto (from the file)": None, "on (Edit-2511)": True, "off": False}
# These nodes wrap 1.x models: the library's loaders then refuse a 2.1 file, naming both families (the DiT loader is
# pinned by its model_class).
FAMILY = "qwen_image"


class DiffusionModelLoader(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "DiffusionModelLoader", "Load Qwen-Image Diffusion Model", LOADERS,
            "Loads a Qwen-Image / Qwen-Image-Edit (2509, 2511) diffusion model: Comfy-Org single files (bf16, fp16, "
            "fp8, scaled fp8), diffusers transformer folders, or GGUF.",
            inputs=[
                *loader_inputs("model_name", list_models("diffusion_models", "transformer", WEIGHT_EXTENSIONS),
                               "A file or diffusers folder in models/diffusion_models (or models/unet)."),
                io.Combo.Input("edit_2511", options=list(ZERO_COND), tooltip=(
                    "Edit-2511 modulates the reference images with t = 0 (zero_cond_t). Detected from the file "
                    "(Comfy-Org marker or diffusers config); force it for files that lack the marker.")),
                dequant_cache_input(),
            ],
            outputs=[output(io.Model, None, "The Qwen-Image DiT, managed by ComfyUI like its own models.")])

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str, edit_2511: str, dequant_cache: bool = True) -> io.NodeOutput:
        compute = compute_dtype(weight_dtype, mm.get_torch_device(), fp16_safe=True)
        with chosen_file("diffusion_models", "model_name", model_name) as path:
            ops, stored = host_ops(path, compute)
            dit = load_diffusion_model(path, dtype=compute, device=mm.unet_offload_device(), ops=ops,
                                       model_class=HostQwenImageDiT)
        dit.source = model_name  # named when a wrong text encoder's conditioning reaches it
        set_gguf_dequant_cache(dit, dequant_cache)
        if ZERO_COND[edit_2511] is not None and ZERO_COND[edit_2511] != dit.config.zero_cond_t:
            dit.config = dataclasses.replace(dit.config, zero_cond_t=ZERO_COND[edit_2511])
            logger.info("Qwen-Image DiT: Edit-2511 zero_cond_t set %s by the loader", "on" if dit.config.zero_cond_t
                        else "off")
        storage = stored if stored in FLOAT8_DTYPES else compute
        return io.NodeOutput(wrap_diffusion_model(dit, storage, compute if storage != compute else None),
                             ui=badge_ui(dit_variant(dit.config, model_name), dit, path))


class TextEncoderLoader(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "TextEncoderLoader", "Load Qwen-Image Text Encoder", LOADERS,
            "Loads the Qwen2.5-VL-7B condition encoder: Comfy single files (bf16, scaled fp8), HF folders, or a "
            "llama.cpp GGUF; editing also needs its mmproj-*.gguf next to it.",
            inputs=loader_inputs("text_encoder_name", list_models("text_encoders", "text_encoder", WEIGHT_EXTENSIONS),
                                 "A file or HF folder in models/text_encoders (or models/clip), e.g. "
                                 "qwen_2.5_vl_7b.safetensors."),
            outputs=[output(TextEncoder, None, "The Qwen2.5-VL condition encoder with its tokenizer.")])

    @classmethod
    def execute(cls, text_encoder_name: str, weight_dtype: str) -> io.NodeOutput:
        load_device = mm.text_encoder_device()
        compute = compute_dtype(weight_dtype, load_device)
        with chosen_file("text_encoders", "text_encoder_name", text_encoder_name) as path:
            encoder = load_text_encoder(path, dtype=compute, device=mm.text_encoder_offload_device(),
                                        ops=host_ops(path, compute)[0], host_tokenizer_dirs=[host_tokenizer_dir()],
                                        family=FAMILY)
        logger.info("Qwen-Image text encoder: %s (%s, vision tower: %s)", text_encoder_name, compute,
                    "yes" if encoder.has_vision else "no")
        variant = "Qwen2.5-VL" if encoder.has_vision else "Qwen2.5-VL (no vision tower)"
        return io.NodeOutput(HostTextEncoder(encoder, load_device, mm.text_encoder_offload_device(), text_encoder_name),
                             ui=badge_ui(variant, encoder.model, path))


class VAELoader(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "VAELoader", "Load Qwen-Image VAE", LOADERS,
            "Loads the Qwen-Image VAE (qwen_image_vae.safetensors, or a diffusers vae folder).",
            inputs=loader_inputs("vae_name", list_models("vae", "vae", SAFETENSORS_EXTENSIONS),
                                 "A file or diffusers folder in models/vae, e.g. qwen_image_vae.safetensors."),
            outputs=[output(io.Vae, None, "The Qwen-Image VAE; works with the core VAE Decode / VAE Encode nodes "
                                          "too.")])

    @classmethod
    def execute(cls, vae_name: str, weight_dtype: str) -> io.NodeOutput:
        compute = compute_dtype(weight_dtype, mm.vae_device())
        with chosen_file("vae", "vae_name", vae_name) as path:
            vae = load_vae(path, dtype=compute, device=mm.vae_offload_device(), ops=comfy.ops.disable_weight_init,
                           family=FAMILY)
        return io.NodeOutput(HostVAE(vae), ui=badge_ui("Qwen-Image VAE", vae, path))


def dit_variant(config, name: str) -> str:
    """The Qwen-Image 1.x variant of a loaded DiT: Layered and Edit-2511 from its config; T2I, 2512, Edit and
    Edit-2509 share one architecture, so the file name tells those apart (T2I when it names none)."""
    lower = name.lower()
    if getattr(config, "layer3d_rope", False):
        return "Layered"
    if getattr(config, "zero_cond_t", False):
        return "Edit-2511"
    if "2509" in lower:
        return "Edit-2509"
    if "edit" in lower:
        return "Edit"
    if "2512" in lower:
        return "2512"
    return "T2I"



NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(DiffusionModelLoader, TextEncoderLoader, VAELoader)
