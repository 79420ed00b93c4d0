"""What every feature module shares: menu category, node-id prefix, custom type names and the inputs several
nodes declare.  Standard library only, and nothing from a feature module, so no feature depends on another."""

from __future__ import annotations

CATEGORY = "Qwen-Image"
# Core ComfyUI already has ids such as TextEncodeQwenImageEdit; ours all carry this prefix so they never clash.
ID_PREFIX = "QIP_"
DISPLAY_SUFFIX = " (Qwen-Image)"

# Types that only our nodes produce and consume (the names are saved in workflows: never rename them).
TEXT_ENCODER_TYPE = "QWEN_IMAGE_TEXT_ENCODER"
BLOCKWISE_TYPE = "QWEN_IMAGE_BLOCKWISE_CONTROL"
IMAGE_LIST_TYPE = "QIP_IMAGE_LIST"

# The reference pipeline's default negative prompt: a single space, not an empty string.
DEFAULT_NEGATIVE = " "

# Choices of every loader's weight_dtype input; nodes/host/ops.py turns them into torch dtypes.
AUTO_DTYPE = "auto"
WEIGHT_DTYPES = (AUTO_DTYPE, "bf16", "fp16", "fp32")
WEIGHT_DTYPE_TOOLTIP = ("Compute / storage precision. auto: bf16 on GPUs that support it. On GPUs without bf16 "
                        "(Pascal, Turing, older Macs) the diffusion model runs in fp16 with its residual streams in "
                        "fp32 (Qwen's activations reach 2e7, beyond fp16's range: exact, no black images) and the "
                        "other models in fp32; fp32 on CPU. fp8 and GGUF weights stay as stored and are upcast per "
                        "layer.")


def mappings(*node_classes: type) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS for classes that define NODE_ID and DISPLAY_NAME."""
    classes = {ID_PREFIX + cls.NODE_ID: cls for cls in node_classes}
    display = {ID_PREFIX + cls.NODE_ID: cls.DISPLAY_NAME + DISPLAY_SUFFIX for cls in node_classes}
    return classes, display


def weight_dtype_input() -> tuple:
    """The weight_dtype input of the loaders."""
    return (list(WEIGHT_DTYPES), {"default": AUTO_DTYPE, "tooltip": WEIGHT_DTYPE_TOOLTIP})

