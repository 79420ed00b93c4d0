"""Qwen-Image in pure PyTorch: the DiT, the VAE, the Qwen2.5-VL condition encoder, GGUF reading.

This package never imports ComfyUI; layers are built from an injectable operations namespace
(:mod:`models.ops`) so a host can supply its own casting / offloading / quantized layers.

Public entry points (imported lazily, so ``import models`` is cheap)::

    from models import load_diffusion_model, load_vae, load_text_encoder
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_diffusion_model": ".qwen_image.dit_loader",
    "load_vae": ".qwen_image.vae",
    "load_text_encoder": ".encoders.qwen25vl.encoder",
    "WeightFileError": ".io.weights",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
