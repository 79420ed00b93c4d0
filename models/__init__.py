"""The Qwen-Image family in pure PyTorch: DiTs, VAEs, condition encoders, ControlNets, GGUF reading.

This package never imports ComfyUI; layers are built from an injectable operations namespace
(:mod:`models.common.ops`) so a host can supply its own casting / offloading / quantized layers, and every
attention call goes through :func:`models.common.attention.attention` so a host can supply its own kernel.

Layout: ``io/`` (checkpoints: safetensors, GGUF), ``common/`` (ops, attention, latent specs, schedules,
guidance, tiling, image sizing), ``encoders/`` (tokenizer, vision preprocessing, Qwen2.5-VL, Qwen3-VL), one folder
per model family (``qwen_image/``, ``qwen_image_2_1/``), and :mod:`models.registry`, which identifies any file.

The public API (imported lazily, so ``import models`` is cheap)::

    from models import identify, load, load_diffusion_model, load_vae, load_text_encoder
    identify("qwen_image_vae.safetensors")   # FileIdentity(family='qwen_image', role='vae', layout='comfy', ...)
    dit = load_diffusion_model(path, dtype=torch.bfloat16)   # a QwenImageDiT or a QwenImage21DiT, by the file
    vae = load_vae(path, family="qwen_image")                # pinned: a 2.1 VAE is refused, naming both families
    vae = load("qwen_image_vae.safetensors")  # any supported file, by what it is
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # identifying and loading files
    "identify": ".registry",
    "load": ".registry",
    "FileIdentity": ".registry",
    "WeightFileError": ".io.weights",
    "FLOAT8_DTYPES": ".io.weights",
    "open_checkpoint": ".io.weights",
    "load_progress": ".io.loading",
    # per-layer quantization markers of mixed-precision ("comfy_quant") checkpoints
    "SafetensorsCheckpoint": ".io.weights",
    "FLOAT8_FORMATS": ".io.weights",
    "QUANT_MARKER": ".io.weights",
    "quant_config": ".io.weights",
    "quant_marker": ".io.weights",
    "COMFY_DIT_PREFIX": ".registry",
    "CastOps": ".common.ops",
    # either family, by the file (family= pins one)
    "load_diffusion_model": ".registry",
    "load_vae": ".registry",
    "load_text_encoder": ".registry",
    "FAMILIES": ".registry",
    # one family's loaders (the 2.1 ones are what the generic ones above dispatch to)
    "load_controlnet": ".qwen_image.controlnet",
    "load_blockwise_control": ".qwen_image.blockwise_control",
    "load_diffusion_model_2_1": ".qwen_image_2_1.dit_loader",
    "load_vae_2_1": ".qwen_image_2_1.vae",
    "load_text_encoder_2_1": ".qwen_image_2_1.text_encoder",
    # LoRA files in any trainer's layout, normalised to a model's module names
    "normalize_lora": ".io.lora",
    "NormalizedLora": ".io.lora",
    "LoraReport": ".io.lora",
    # model classes
    "QwenImageDiT": ".qwen_image.dit",
    "DiTConfig": ".qwen_image.dit",
    "QwenImageVAE": ".qwen_image.vae",
    "TextEncoder": ".encoders.qwen25vl.encoder",
    "QwenImageControlNet": ".qwen_image.controlnet",
    "BlockwiseControl": ".qwen_image.blockwise_control",
    "Entities": ".qwen_image.eligen",
    "QwenImage21DiT": ".qwen_image_2_1.dit",
    "QwenImage21VAE": ".qwen_image_2_1.vae",
    "PrefixCache": ".qwen_image_2_1.prefix_cache",
    "GGUFOps": ".io.gguf.layers",
    "QuantizedTensor": ".io.gguf.layers",
    "GGUFError": ".io.gguf.reader",
    # run options: the seams a host plugs its attention and block hooks into
    "attention": ".common.attention",
    "ATTENTION_KERNEL": ".common.attention",
    "BLOCK_HOOK": ".qwen_image.dit",
    "BlockCall": ".qwen_image.dit",
    # latents, sampling and images
    "LatentSpec": ".common.latent_spec",
    "QWEN_IMAGE_LATENT": ".qwen_image.latent",
    "QWEN_IMAGE_2_1_LATENT": ".qwen_image_2_1.latent",
    "ASPECT_PRESETS": ".qwen_image.latent",
    "QWEN_IMAGE_TEMPLATES": ".qwen_image.templates",
    "flow_sigmas": ".common.schedule",
    "finish_schedule": ".common.schedule",
    "linear_timesteps": ".common.schedule",
    "resolution_shift": ".common.schedule",
    "TERMINAL_SIGMA": ".common.schedule",
    "norm_preserving_cfg": ".common.guidance",
    "resize_images": ".common.image_sizing",
    "resize_mask": ".common.image_sizing",
    "policy_size": ".qwen_image.edit_geometry",
    "REFERENCE_AREA": ".qwen_image.edit_geometry",
    "EDIT_PLUS_VL_AREA": ".qwen_image.edit_geometry",
    "lanczos_resize": ".qwen_image.edit_geometry",
    "LAYERED_RESOLUTIONS": ".qwen_image.layered",
    "DEFAULT_LAYERS": ".qwen_image.layered",
    "layered_size": ".qwen_image.layered",
    "layered_shift": ".qwen_image.layered",
    "controlnet_inpaint_latent": ".qwen_image.controlnet",
    "blockwise_inpaint_latent": ".qwen_image.blockwise_control",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

