"""What every node module shares: the menu category and the node-id prefix that keeps our ids unique."""

from __future__ import annotations

CATEGORY = "Qwen-Image"
# Core ComfyUI already has ids such as TextEncodeQwenImageEdit; ours all carry this prefix so they never clash.
ID_PREFIX = "QIP_"
DISPLAY_SUFFIX = " (Qwen-Image)"


def mappings(*node_classes: type) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS for classes that define NODE_ID and DISPLAY_NAME."""
    classes = {ID_PREFIX + cls.NODE_ID: cls for cls in node_classes}
    display = {ID_PREFIX + cls.NODE_ID: cls.DISPLAY_NAME + DISPLAY_SUFFIX for cls in node_classes}
    return classes, display
