"""Qwen-Image for ComfyUI: text-to-image, instruction editing and ControlNet guidance, from safetensors or GGUF.

ComfyUI imports this file when the pack sits in custom_nodes/.  The nodes live in ``nodes/`` (the only place that
imports ComfyUI); the models are a pure-torch library in ``models/``.
"""

import sys

WEB_DIRECTORY = "./web"

if "folder_paths" in sys.modules:  # inside a ComfyUI host, which imports folder_paths before any custom node
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain package (a test runner, the model library on its own): no host, no nodes
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
