"""Structure guidance: the InstantX ControlNet-Union (a host CONTROL_NET), DiffSynth blockwise control patches,
and built-in preprocessors (canny, soft edge, pass-through for depth / pose maps).

The ControlNet is a host ``ControlBase``: it rides in CONDITIONING like the host's own ControlNets, so strength,
start / end percent and chaining several controls (their residuals summed, as diffusers' multi-ControlNet does)
work as users know them, and the host's ControlNet Apply nodes accept it too.  Like the reference pipeline, our
apply node computes the residuals with the positive prompt and reuses them for the negative (CFG) pass.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import comfy.controlnet
import comfy.model_management as mm
import comfy.model_patcher

from ..models import (QWEN_IMAGE_LATENT, blockwise_inpaint_latent, controlnet_inpaint_latent, load_blockwise_control,
                      load_controlnet, resize_images)
from .common import CONTROL, BlockwiseControl, Node, io, loader_inputs, mappings, output, schema
from .host.files import SAFETENSORS_EXTENSIONS, WEIGHT_EXTENSIONS, chosen_file, list_models
from .host.model import BLOCKWISE_PATCHES, QwenImageLatentFormat, as_image_latent
from .host.ops import compute_dtype, host_ops

logger = logging.getLogger("qwen_image")
CANNY_MIN_SIDE = 3  # the edge filters' 5x5 smoothing needs more than 2 pixels a side


def control_image(image: torch.Tensor) -> torch.Tensor:
    """The apply nodes' image input as RGB ``[B,H,W,3]``: a gray (1-channel) map is repeated, alpha dropped; any
    other shape is refused here, at the apply node, instead of failing later in the sampler."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(f"image: a control image is an IMAGE [batch, height, width, channels] with 1 (gray), 3 (RGB) "
                         f"or 4 (RGBA) channels and at least one picture; got shape {list(image.shape)}.")
    return image.expand(-1, -1, -1, 3) if image.shape[-1] == 1 else image[..., :3]


def _encode_control(vae, image: torch.Tensor, latent: torch.Tensor, black_out: torch.Tensor | None = None):
    """The normalized VAE latent of ``image`` stretched to the target latent's pixel size (as the reference
    pipelines resize control images), keeping whatever models the sampler had loaded."""
    factor = QWEN_IMAGE_LATENT.spatial_factor
    height, width = latent.shape[-2] * factor, latent.shape[-1] * factor
    pixels = resize_images(image[..., :3].float(), width, height)
    if black_out is not None:  # the inpainting ControlNet sees the repainted area as black
        keep = F.interpolate(black_out[:, None].float(), size=(height, width))[:, 0, ..., None] <= 0.5
        pixels = pixels * keep
    loaded = mm.loaded_models(only_currently_used=True)
    raw = vae.encode(pixels)
    mm.load_models_gpu(loaded)
    return QWEN_IMAGE_LATENT.normalize(as_image_latent(raw)).to(latent.device)


class QwenImageControl(comfy.controlnet.ControlBase):
    """The InstantX ControlNet-Union for Qwen-Image in the host's ControlNet machinery."""

    def __init__(self, patcher: comfy.model_patcher.ModelPatcher):
        super().__init__()
        self.patcher = patcher
        self.latent_format = QwenImageLatentFormat()  # a VAE is required to encode the control image
        self.positive_context: torch.Tensor | None = None
        self.inpaint_mask: torch.Tensor | None = None
        self._control_latent: torch.Tensor | None = None
        self._reuse: tuple | None = None  # (sigma, x, residuals) of the last call, for the CFG pass

    @property
    def model(self):
        return self.patcher.model

    def copy(self) -> "QwenImageControl":
        copied = QwenImageControl(self.patcher)
        self.copy_to(copied)
        copied.positive_context = self.positive_context
        copied.inpaint_mask = self.inpaint_mask
        return copied

    def get_models(self) -> list:
        return super().get_models() + [self.patcher]

    def cleanup(self) -> None:
        self._control_latent, self._reuse = None, None
        super().cleanup()

    def _control(self, latent: torch.Tensor) -> torch.Tensor:
        if self._control_latent is None or self._control_latent.shape[-2:] != latent.shape[-2:]:
            image = self.cond_hint_original.movedim(1, -1)  # the apply nodes store [B,C,H,W]
            inpaint = self.model.config.extra_channels > 0
            if inpaint and self.inpaint_mask is None:
                raise ValueError("This is the Inpainting ControlNet: give the apply node a mask (1 = repaint).")
            encoded = _encode_control(self.vae, image, latent, self.inpaint_mask if inpaint else None)
            self._control_latent = controlnet_inpaint_latent(encoded, self.inpaint_mask) if inpaint else encoded
        return self._control_latent

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return previous
        latent = as_image_latent(x_noisy)
        reuse = self._reuse
        if reuse is not None and torch.equal(reuse[0], t) and reuse[1].shape == latent.shape and \
                torch.equal(reuse[1], latent):
            residuals = reuse[2]  # the same step's conditional residuals, reused for the negative pass
        else:
            context = self.positive_context if self.positive_context is not None else cond["c_crossattn"]
            context = context.to(device=latent.device)
            batch = latent.shape[0]
            # Several control images spread over the batch the way the host's ControlNets do it.
            control = comfy.controlnet.broadcast_image_to(self._control(latent), batch, batched_number)
            residuals = self.model(latent, t, context.expand(batch, -1, -1) if context.shape[0] == 1 else context,
                                   control.expand(batch, -1, -1, -1) if control.shape[0] == 1 else control)
            self._reuse = (t.clone(), latent.clone(), residuals)
        # control_merge scales by the strength in place: hand it copies so the reused residuals stay intact.
        return self.control_merge({"input": [r.clone() for r in residuals]}, previous, x_noisy.dtype)


class BlockwisePatch:
    """A DiffSynth blockwise control as a host model patch (``transformer_options["patches"]``)."""

    def __init__(self, patcher, vae, image: torch.Tensor, strength: float, mask: torch.Tensor | None):
        self.patcher, self.vae, self.image, self.strength, self.mask = patcher, vae, image, strength, mask
        self._tokens: torch.Tensor | None = None
        self._shape: tuple | None = None

    def for_latent(self, latent: torch.Tensor):
        """The DiT ``block_patches`` entry for a target latent ``[B,C,h,w]``."""
        control = self.patcher.model
        if self._tokens is None or self._shape != latent.shape[-2:]:
            encoded = _encode_control(self.vae, self.image, latent)
            if control.config.extra_channels:
                encoded = blockwise_inpaint_latent(encoded, self.mask)
            self._tokens, self._shape = control.encode(encoded), latent.shape[-2:]
        return control.patch(self._tokens.to(latent.device), self.strength)

    def to(self, device):
        if isinstance(device, torch.device) and self._tokens is not None:
            self._tokens = self._tokens.to(device)
        return self

    def models(self) -> list:
        return [self.patcher]


def _wrap(module, load_device) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=mm.unet_offload_device())


def _strength_input(minimum: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input("strength", default=1.0, min=minimum, max=10.0, step=0.01, tooltip=tooltip)


class ControlNetLoader(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "ControlNetLoader", "Load Qwen-Image ControlNet", CONTROL,
            "Loads the InstantX Qwen-Image ControlNet-Union (canny, soft edge, depth, pose) or the Inpainting "
            "ControlNet, as safetensors (bf16/fp16/fp32), a diffusers folder or GGUF.",
            inputs=loader_inputs("control_net_name", list_models("controlnet", "controlnet", WEIGHT_EXTENSIONS),
                                 "A file or folder in models/controlnet, e.g. Qwen-Image-InstantX-ControlNet-Union."),
            outputs=[output(io.ControlNet, None, "The ControlNet-Union (or its Inpainting variant), usable with the "
                                                 "apply nodes.")])

    @classmethod
    def execute(cls, control_net_name: str, weight_dtype: str) -> io.NodeOutput:
        load_device = mm.get_torch_device()
        compute = compute_dtype(weight_dtype, load_device)
        with chosen_file("controlnet", "control_net_name", control_net_name) as path:
            module = load_controlnet(path, dtype=compute, device=mm.unet_offload_device(),
                                     ops=host_ops(path, compute)[0])
        logger.info("Qwen-Image ControlNet: %s (%d blocks%s)", control_net_name, len(module.transformer_blocks),
                    ", inpainting" if module.config.extra_channels else "")
        return io.NodeOutput(QwenImageControl(_wrap(module, load_device)))


class ControlNetApply(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "ControlNetApply", "Qwen-Image ControlNet Apply", CONTROL,
            "Guides generation with a control image (canny / soft edge / depth / pose, or inpainting with a mask). "
            "Chain several apply nodes to combine controls; their residuals add up.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning (gets the same residuals)."),
                io.ControlNet.Input("control_net", tooltip="From Load Qwen-Image ControlNet."),
                io.Vae.Input("vae", tooltip="The Qwen-Image VAE, to encode the control image."),
                io.Image.Input("image", tooltip="The control image (an edge map, depth map, pose image...), resized "
                                                "to the output size."),
                _strength_input(0.0, "How strongly the control steers (the reference's "
                                     "controlnet_conditioning_scale; 0 = off)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the control starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the control stops."),
                io.Mask.Input("mask", optional=True, tooltip="Inpainting ControlNet only: the area to repaint (1)."),
            ],
            outputs=[output(io.Conditioning, "positive", "The prompt conditioning with the control attached."),
                     output(io.Conditioning, "negative", "The negative, with the same control.")])

    @classmethod
    def execute(cls, positive, negative, control_net, vae, image, strength: float, start_percent: float,
                end_percent: float, mask=None) -> io.NodeOutput:
        image = control_image(image)
        if strength == 0:
            return io.NodeOutput(positive, negative)
        context = positive[0][0]  # like the reference: residuals from the prompt, reused for the negative pass
        attached: dict = {}
        outputs = []
        for conditioning in (positive, negative):
            result = []
            for tensor, options in conditioning:
                options = options.copy()
                previous = options.get("control")
                key = id(previous)
                if key not in attached:
                    control = control_net.copy().set_cond_hint(image.movedim(-1, 1), strength,
                                                               (start_percent, end_percent), vae=vae)
                    control.positive_context = context
                    control.inpaint_mask = mask
                    control.set_previous_controlnet(previous)
                    attached[key] = control
                options["control"] = attached[key]
                options["control_apply_to_uncond"] = False
                result.append([tensor, options])
            outputs.append(result)
        return io.NodeOutput(*outputs)


class BlockwiseControlLoader(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "BlockwiseControlLoader", "Load Qwen-Image DiffSynth Control Patch", CONTROL,
            "Loads a DiffSynth blockwise ControlNet patch for Qwen-Image from models/model_patches.",
            inputs=loader_inputs("patch_name", list_models("model_patches", "model_patches", SAFETENSORS_EXTENSIONS),
                                 "e.g. qwen_image_canny_diffsynth_controlnet.safetensors in models/model_patches."),
            outputs=[output(BlockwiseControl, None, "A DiffSynth blockwise control (canny, depth or inpaint) for "
                                                    "Qwen-Image DiffSynth Control Apply.")])

    @classmethod
    def execute(cls, patch_name: str, weight_dtype: str) -> io.NodeOutput:
        load_device = mm.get_torch_device()
        compute = compute_dtype(weight_dtype, load_device)
        with chosen_file("model_patches", "patch_name", patch_name) as path:
            module = load_blockwise_control(path, dtype=compute, device=mm.unet_offload_device(),
                                            ops=host_ops(path, compute)[0])
        return io.NodeOutput(_wrap(module, load_device))


class BlockwiseControlApply(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "BlockwiseControlApply", "Qwen-Image DiffSynth Control Apply", CONTROL,
            "Applies a DiffSynth blockwise control patch (canny, depth, inpaint) to the Qwen-Image model.",
            inputs=[
                io.Model.Input("model", tooltip="The Qwen-Image model."),
                BlockwiseControl.Input("control", tooltip="From Load Qwen-Image DiffSynth Control Patch."),
                io.Vae.Input("vae", tooltip="The Qwen-Image VAE, to encode the control image."),
                io.Image.Input("image", tooltip="The control image (edge map, depth map, or the image to inpaint)."),
                _strength_input(-10.0, "Scale of the control residuals (0 = off)."),
                io.Mask.Input("mask", optional=True, tooltip="Inpaint patch only: the area to repaint (1)."),
            ],
            outputs=[output(io.Model, None, "The model with the control patch applied after every DiT block.")])

    @classmethod
    def execute(cls, model, control, vae, image, strength: float, mask=None) -> io.NodeOutput:
        image = control_image(image)
        patched = model.clone()
        if strength != 0:
            patched.set_model_patch(BlockwisePatch(control, vae, image, strength, mask), BLOCKWISE_PATCHES)
        return io.NodeOutput(patched)


METHODS = ("canny", "soft edge", "none (depth / pose map as given)")


class ControlPreprocess(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "ControlPreprocess", "Qwen-Image Control Preprocessor", CONTROL,
            "Built-in preprocessing: canny edges, a soft edge map (blurred Sobel magnitude, HED-like), or "
            "pass-through for depth or pose maps you already have.",
            inputs=[
                io.Image.Input("image", tooltip="The picture to extract structure from (or a ready control map)."),
                io.Combo.Input("method", options=list(METHODS),
                               tooltip="Which control to make; match it to the ControlNet mode."),
                io.Float.Input("low_threshold", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Canny: weaker edges below this are dropped."),
                io.Float.Input("high_threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Canny: edges above this are always kept."),
            ],
            outputs=[output(io.Image, None, "The control image for the ControlNet (white structure on black).")])

    @classmethod
    def execute(cls, image, method: str, low_threshold: float, high_threshold: float) -> io.NodeOutput:
        if method == METHODS[2]:
            return io.NodeOutput(image)
        gray = image[..., :3].movedim(-1, 1).float().mean(dim=1, keepdim=True)
        if method == "canny":
            try:
                import kornia
            except ImportError as e:
                raise RuntimeError("canny needs kornia (part of ComfyUI's requirements): pip install kornia") from e
            if low_threshold >= high_threshold:
                raise ValueError("canny: low_threshold must be below high_threshold")
            if min(gray.shape[-2:]) < CANNY_MIN_SIDE:
                raise ValueError(f"image: canny needs an image of at least {CANNY_MIN_SIDE}x{CANNY_MIN_SIDE} pixels "
                                 f"(got {gray.shape[-1]}x{gray.shape[-2]}); scale it up first.")
            edges = kornia.filters.canny(gray, low_threshold=low_threshold, high_threshold=high_threshold)[1]
        else:
            edges = soft_edges(gray)
        return io.NodeOutput(edges.clamp(0, 1).expand(-1, 3, -1, -1).movedim(1, -1).contiguous())


def soft_edges(gray: torch.Tensor) -> torch.Tensor:
    """A soft edge map ``[B,1,H,W]`` in 0..1: Sobel gradient magnitude of a Gaussian-blurred image, normalised."""
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=gray.device) / 16
    blur = kernel[:, None] * kernel[None]
    smooth = F.conv2d(F.pad(gray, (2, 2, 2, 2), mode="replicate"), blur[None, None])
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=gray.device)
    padded = F.pad(smooth, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x[None, None])
    gy = F.conv2d(padded, sobel_x.t()[None, None])
    magnitude = torch.sqrt(gx * gx + gy * gy)
    return magnitude / magnitude.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ControlNetLoader, ControlNetApply, BlockwiseControlLoader, BlockwiseControlApply, ControlPreprocess)
