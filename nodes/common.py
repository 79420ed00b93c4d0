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
ELIGEN = f"{CATEGORY}/eligen"
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
    def title(cls) -> str:
        """The display name, for messages (the schema is rebuilt: the host locks the class's cached one)."""
        return cls.define_schema().display_name

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


def dequant_cache_input() -> io.Boolean.Input:
    """The diffusion-model loaders' switch of the GGUF dequant-once cache (nodes/host/ops.set_gguf_dequant_cache)."""
    return io.Boolean.Input("dequant_cache", default=True, optional=True, tooltip=(
        "GGUF only: keep the weights used for one vector per step (the modulations and the timestep layers) "
        "dequantized after the first step, at most 1 GiB in bf16 (2 GiB in fp32): faster steps, counted in the "
        "memory ComfyUI plans for. Turn off for the tightest memory."))


def loader_inputs(name: str, choices: list[str], tooltip: str) -> list[io.Input]:
    """A loader's file choice (``choices`` from the host's model folder) and its weight_dtype."""
    return [io.Combo.Input(name, options=choices, tooltip=tooltip), weight_dtype_input()]


def mappings(*node_classes: type[io.ComfyNode]) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS of a feature's nodes, from their schemas."""
    schemas = [(cls, cls.GET_SCHEMA()) for cls in node_classes]
    return ({s.node_id: cls for cls, s in schemas}, {s.node_id: s.display_name for _, s in schemas})


# -- loader badges (web/js/qwen_image.js draws them on the loader after a run) --------------------------------------
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                "float8_e4m3fn": "fp8 e4m3fn", "float8_e5m2": "fp8 e5m2"}
# llama.cpp's file-type labels as GGUF file names carry them (Q4_K_M, IQ4_XS, Q8_0, BF16 ...).
_GGUF_LABEL = r"(?<![A-Za-z0-9])(I?Q\d(?:_K)?(?:_[A-Z0-9]{1,2})?|BF16|F16|F32)(?![A-Za-z0-9])"


def _type_name(tensor) -> str:
    qtype = getattr(tensor, "qtype", None)  # a GGUF QuantizedTensor: its ggml type
    if qtype is not None:
        return getattr(qtype, "name", str(qtype))
    name = str(tensor.dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def weight_badge(variant: str, module, path: str | None = None) -> dict:
    """What a loader shows on its node: ``variant``, the weight ``format`` (as stored in the file: bf16, fp8
    e4m3fn scaled, Q4_K_M ...), ``parameters`` (logical element count of every weight the model holds, GGUF ones
    unpacked) and ``bytes`` (their storage in memory), plus ``types`` (tensor count per stored type).

    ``module``: the loaded ``nn.Module``; ``path``: the file or folder it came from (its header gives the stored
    types of safetensors files; GGUF weights stay as stored, so the module tells)."""
    import math
    import re
    from collections import Counter
    from pathlib import Path

    import torch

    parameters = nbytes = 0
    by_numel: Counter = Counter()
    types: Counter = Counter()
    seen: set[int] = set()
    for tensor in module.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        logical = getattr(tensor, "logical_shape", None)
        numel = math.prod(logical) if logical is not None else tensor.numel()
        if logical is not None:
            from ..models.io.gguf.reader import quantized_nbytes
            nbytes += quantized_nbytes(tensor.qtype, logical)
        else:
            nbytes += tensor.numel() * tensor.element_size()
        parameters += numel
        by_numel[_type_name(tensor)] += numel
        types[_type_name(tensor)] += 1
    gguf = path is not None and str(path).lower().endswith(".gguf")
    if path is not None and not gguf:
        try:  # the stored types, from the header (the loader may have converted them to the compute dtype)
            from ..models.io.weights import open_checkpoint
            checkpoint = open_checkpoint(path)
            by_numel, types = Counter(), Counter()
            for name in checkpoint:
                stored = str(checkpoint.dtype(name)).removeprefix("torch.")
                by_numel[_DTYPE_NAMES.get(stored, stored)] += math.prod(checkpoint.shape(name))
                types[_DTYPE_NAMES.get(stored, stored)] += 1
        except Exception:  # noqa: BLE001  (a badge never fails a load: fall back to what is in memory)
            pass
    fmt = by_numel.most_common(1)[0][0] if by_numel else "?"
    if gguf:
        label = re.search(_GGUF_LABEL, Path(path).name.upper())
        fmt = label.group(1) if label else f"GGUF {fmt}"
    elif fmt.startswith("fp8") and any(k.endswith(("scale_weight", "weight_scale")) for k in module.state_dict()):
        fmt += " scaled"  # scaled fp8 (per-tensor scales next to the weights)
    return {"variant": variant, "format": fmt, "parameters": int(parameters), "bytes": int(nbytes),
            "types": dict(types)}


def badge_ui(variant: str, module, path) -> dict | None:
    """A loader's ``ui``: ``{"qip_badge": [weight_badge(...)]}`` (the host reports a node's ui in the ``executed``
    message and the history, output node or not); None when it cannot be measured: a badge never fails a load."""
    try:
        return {"qip_badge": [weight_badge(variant, module, None if path is None else str(path))]}
    except Exception as e:  # noqa: BLE001
        import logging
        logging.getLogger("qwen_image").debug("no loader badge (%s: %s)", type(e).__name__, e)
        return None
