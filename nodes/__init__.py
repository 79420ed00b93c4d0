"""The pack's nodes, gathered from one module per feature (see registry.py for the fail-soft loading).

A feature module imports only common.py (what all features share), the host adapters in host/ and the library's
public API (``from ..models import``), never another feature: one broken feature takes only its own nodes with it.
"""

from __future__ import annotations

from .registry import load_feature_modules

# Feature modules, in the order their nodes appear in the menu.
FEATURE_MODULES: tuple[str, ...] = ("loaders", "lora", "conditioning", "latent", "sampling", "edit", "control",
                                   "eligen", "layered", "qwen_image_2_1")

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, FAILED_MODULES = load_feature_modules(FEATURE_MODULES, __name__)
