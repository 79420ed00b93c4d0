"""The pack's nodes, gathered from one module per feature (see registry.py for the fail-soft loading)."""

from __future__ import annotations

from .registry import load_feature_modules

# Feature modules, in the order their nodes appear in the menu.
FEATURE_MODULES: tuple[str, ...] = ("loaders", "conditioning", "latent", "sampling", "edit", "control")

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, FAILED_MODULES = load_feature_modules(FEATURE_MODULES, __name__)
