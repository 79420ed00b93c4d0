"""Load Qwen-Image LoRA: a LoRA file in any trainer's layout applied to our MODEL (and text encoder), with a report.

The library normalises the file to our module names (:func:`models.normalize_lora`); applying goes through the
host's own machinery (``comfy.lora.load_lora`` with the host's key map, then ``ModelPatcher.add_patches``), so the
host's scaling rule holds and the result composes with core's LoRA loaders, hooks and model merging like any
LoRA.  A file for another model (Flux, SDXL, ...) changes nothing and says so.
"""

from __future__ import annotations

import copy
import logging
import os

import torch

import comfy.lora
import comfy.utils
import folder_paths

from ..models import FLOAT8_DTYPES, NormalizedLora, QuantizedTensor, normalize_lora
from .common import LOADERS, Node, TextEncoder, io, mappings, output, schema
from .host.files import chosen_file

logger = logging.getLogger("qwen_image")
DIT_PREFIX = "diffusion_model."  # where the host's BaseModel holds the DiT; its key map covers these names
LIGHTNING_ON_FP8 = ("a Lightning LoRA that was not distilled for fp8 on a plain (unscaled) fp8 model gives grid "
                    "artifacts: use the fp8-distilled Lightning LoRA (its file name says fp8) or the scaled fp8 / "
                    "bf16 model")


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.logical_shape if isinstance(tensor, QuantizedTensor) else tensor.shape)


# What marks a scaled fp8 layer: legacy scaled fp8 (``scale_weight``), mixed-precision "comfy_quant" files in our
# casting (``weight_scale``) or in the host's mixed-precision layers (a quantized ``layout_type``).
_FP8_SCALE_ATTRIBUTES = ("scale_weight", "weight_scale", "layout_type")


def _plain_fp8(dit: torch.nn.Module) -> bool:
    """Whether the DiT's Linear weights are fp8 without a per-layer scale."""
    for module in dit.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.dtype in FLOAT8_DTYPES:
            return all(getattr(module, name, None) is None for name in _FP8_SCALE_ATTRIBUTES)
    return False


def _lightning_on_plain_fp8(lora_name: str, model) -> bool:
    name = os.path.basename(lora_name).lower()
    return "lightning" in name and "fp8" not in name and _plain_fp8(model.model.diffusion_model)


def _text_encoder_target(text_encoder) -> tuple[dict[str, tuple[int, ...]], str]:
    """The text encoder's parameter names and shapes, and the prefix its ModelPatcher adds to them."""
    model = text_encoder.encoder.model
    child = next(name for name, module in text_encoder.patcher.model.named_children() if module is model)
    return {name: _shape(p) for name, p in model.state_dict().items()}, child + "."


def _patched_text_encoder(text_encoder, lora: NormalizedLora, prefix: str, strength: float) -> tuple[object, int]:
    """A copy of the text encoder (sharing its weights) whose ModelPatcher carries the LoRA's text-encoder patches,
    and how many weights they patch."""
    key_map = {prefix + module: f"{prefix}{module}.weight" for module in lora.report.text_encoder_matched}
    text_encoder = copy.copy(text_encoder)
    text_encoder.patcher = text_encoder.patcher.clone()
    added = text_encoder.patcher.add_patches(comfy.lora.load_lora(lora.text_encoder_tensors, key_map), strength)
    return text_encoder, len(added)


# The file each LoRA node read last (node id -> (path, tensors)): a re-run with the same file reads nothing.
_LOADED: dict[str | None, tuple[str, dict]] = {}


def _tensors(node: str | None, path: str) -> dict:
    if node not in _LOADED or _LOADED[node][0] != path:
        _LOADED.pop(node, None)  # the old file's tensors go before the new ones are read
        _LOADED[node] = (path, comfy.utils.load_torch_file(path, safe_load=True))
    return _LOADED[node][1]


class LoraLoader(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return schema(
            "LoraLoader", "Load Qwen-Image LoRA", LOADERS,
            "Applies a Qwen-Image LoRA in any common layout (ai-toolkit, DiffSynth, kohya / musubi, diffusers, PEFT, "
            "OneTrainer, lightx2v Lightning, LyCORIS LoKr / LoHa, full diffs, DoRA) with ComfyUI's scaling "
            "(strength * alpha / rank). Reports what matched; a LoRA for another model (Flux, SDXL, ...) changes "
            "nothing. Chain several; works with core LoRA nodes too.",
            inputs=[
                io.Model.Input("model", tooltip="The Qwen-Image diffusion model (from our loader or another LoRA)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file in models/loras."),
                io.Float.Input("strength", **strength, tooltip="How strongly the LoRA changes the diffusion model "
                                                               "(1 = as trained; negative values invert it)."),
                io.Float.Input("text_encoder_strength", **strength,
                               tooltip="How strongly it changes the text encoder, when the file has text-encoder "
                                       "weights and one is connected."),
                TextEncoder.Input("text_encoder", optional=True,
                                  tooltip="Connect the Qwen2.5-VL text encoder to apply the LoRA's text-encoder "
                                          "weights (if it has any)."),
            ],
            outputs=[
                output(io.Model, "model", "The diffusion model with the LoRA (a patch the host applies when it loads "
                                          "the model; chain more LoRAs)."),
                output(TextEncoder, "text_encoder", "The text encoder with the LoRA's text-encoder part (the input, "
                                                    "unchanged, when the file has none)."),
                output(io.String, "report", "What was found: format, matched modules, rank / alpha, keys that match "
                                            "nothing, warnings."),
            ],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, lora_name: str, strength: float, text_encoder_strength: float,
                text_encoder=None) -> io.NodeOutput:
        with chosen_file("loras", "lora_name", lora_name) as path:
            tensors = _tensors(cls.hidden.unique_id if cls.hidden else None, path)
        parameters = {name[len(DIT_PREFIX):]: _shape(t) for name, t in model.model.state_dict().items()
                      if name.startswith(DIT_PREFIX)}
        te_parameters, te_prefix = _text_encoder_target(text_encoder) if text_encoder is not None else (None, "")
        lora = normalize_lora(tensors, parameters, text_encoder=te_parameters, prefix=DIT_PREFIX,
                              text_encoder_prefix=te_prefix)
        report = lora.report
        lines = [f"{lora_name} (strength {strength:g}"
                 + (f", text encoder {text_encoder_strength:g})" if report.text_encoder_matched else ")"),
                 report.summary()]
        warned = bool(report.foreign or report.unmatched or report.mismatched or report.text_encoder_keys)
        if lora.tensors and strength != 0:
            patches = comfy.lora.load_lora(lora.tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
            model = model.clone()
            lines.append(f"patched {len(model.add_patches(patches, strength))} diffusion-model weights")
            if _lightning_on_plain_fp8(lora_name, model):
                lines.append("WARNING: " + LIGHTNING_ON_FP8)
                warned = True
        if lora.text_encoder_tensors and text_encoder_strength != 0:
            text_encoder, added = _patched_text_encoder(text_encoder, lora, te_prefix, text_encoder_strength)
            lines.append(f"patched {added} text-encoder weights")
        text = "\n".join(lines)
        logger.log(logging.WARNING if warned else logging.INFO, "Qwen-Image LoRA: %s", text)
        return io.NodeOutput(model, text_encoder, text, ui={"text": [text]})


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(LoraLoader)
