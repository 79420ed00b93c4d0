"""What every feature module shares: the host's node API (imported here only), menu categories, the node-id
prefix, custom type names and the inputs several nodes declare.  Nothing from a feature module, so no feature
depends on another."""

from __future__ import annotations

try:  # the numbered node API this pack is written against (ComfyUI 0.3.75 has it)
    from comfy_api.v0_0_2 import io
except ImportError:  # a host that has dropped that version: its current API
    from comfy_api.latest import io

# The menu: "Qwen-Image" and one sub-category per kind of node.
CATEGORY = "Qwen-Image"
LOADERS = f"{CATEGORY}/loaders"
CONDITIONING = f"{CATEGORY}/conditioning"
SAMPLING = f"{CATEGORY}/sampling"
EDIT = f"{CATEGORY}/edit"
CONTROL = f"{CATEGORY}/control"
LAYERED = f"{CATEGORY}/layered"
QWEN_IMAGE_2_1 = f"{CATEGORY}/2.1"
# Core ComfyUI already has ids such as TextEncodeQwenImageEdit; ours all carry this prefix so they never clash.
ID_PREFIX = "QIP_"

# Types that only our nodes produce and consume (the names are saved in workflows: never rename them).
TEXT_ENCODER_TYPE = "QWEN_IMAGE_TEXT_ENCODER"
BLOCKWISE_TYPE = "QWEN_IMAGE_BLOCKWISE_CONTROL"
IMAGE_LIST_TYPE = "QIP_IMAGE_LIST"
TextEncoder = io.Custom(TEXT_ENCODER_TYPE)
BlockwiseControl = io.Custom(BLOCKWISE_TYPE)
ImageList = io.Custom(IMAGE_LIST_TYPE)

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


class Node(io.ComfyNode):
    """Our nodes' base: a widget value outside its choices or range is refused before the graph runs, naming the
    node and the input (0.3.75 checks those of V1 inputs only; a V3 value would reach ``execute``)."""

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        node = cls.define_schema()  # (GET_SCHEMA caches on the class, which the host locks here)
        for spec in node.inputs:
            if spec.id not in values:
                continue
            value = values[spec.id]
            if isinstance(spec, io.Combo.Input) and value not in spec.options:
                choices = ", ".join(map(str, spec.options[:12])) + (" ..." if len(spec.options) > 12 else "")
                return f"{node.display_name}: {value!r} is not a choice of '{spec.id}' (choices: {choices})"
            if isinstance(spec, (io.Int.Input, io.Float.Input)):
                low, high = getattr(spec, "min", None), getattr(spec, "max", None)
                if (low is not None and value < low) or (high is not None and value > high):
                    return f"{node.display_name}: '{spec.id}' must be within {low}..{high}, got {value!r}"
        return True


def schema(node_id: str, display_name: str, category: str, description: str, inputs: list, outputs: list,
           **options) -> io.Schema:
    """A node's schema under our id prefix (``node_id`` without it: the ids saved workflows use are
    ``QIP_<node_id>``)."""
    return io.Schema(node_id=ID_PREFIX + node_id, display_name=display_name, category=category,
                     description=description, inputs=inputs, outputs=outputs, **options)


def output(kind: type, name: str | None, tooltip: str) -> io.Output:
    """An output of ``kind`` (e.g. ``io.Conditioning``); ``name`` is the label on the node (None: the type's name).
    The id is left to the host: a schema's output ids must differ from its input ids (``model`` in, ``model`` out)."""
    return kind.Output(display_name=name, tooltip=tooltip)


def prompt_input(name: str, tooltip: str, default: str = "") -> io.String.Input:
    """A multiline prompt box with the host's dynamic prompts ({a|b} choices)."""
    return io.String.Input(name, multiline=True, dynamic_prompts=True, default=default, tooltip=tooltip)


def denoise_input() -> io.Float.Input:
    """The schedulers' denoise input."""
    return io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                          tooltip="Below 1, only the last part of a longer schedule is run (image-to-image).")


def weight_dtype_input() -> io.Combo.Input:
    """The weight_dtype input of the loaders."""
    return io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default=AUTO_DTYPE,
                          tooltip=WEIGHT_DTYPE_TOOLTIP)


def loader_inputs(name: str, choices: list[str], tooltip: str) -> list[io.Input]:
    """A loader's file choice (``choices`` from the host's model folder) and its weight_dtype."""
    return [io.Combo.Input(name, options=choices, tooltip=tooltip), weight_dtype_input()]


def mappings(*node_classes: type[io.ComfyNode]) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS of a feature's nodes, from their schemas."""
    schemas = [(cls, cls.GET_SCHEMA()) for cls in node_classes]
    return ({s.node_id: cls for cls, s in schemas}, {s.node_id: s.display_name for _, s in schemas})
