"""Qwen-Image for ComfyUI: text-to-image, instruction editing and ControlNet guidance, from safetensors or GGUF.

ComfyUI imports this file when the pack sits in custom_nodes/.  The nodes live in ``nodes/`` (the only place that
imports ComfyUI); the models are a pure-torch library in ``models/``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
