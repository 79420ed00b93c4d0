"""Qwen-Image 2.1: loaders, the text / image encode (text-to-image and editing in one), its latent, its schedule
and the prefix cache switch.

2.1 is one model for generation and editing: the prompt and up to ten condition images go through Qwen3-VL
together (each image takes the slots the encoder reserved for it), the same images through the 64-channel 16x VAE
as condition latents, and the single-stream DiT reads one block-causal sequence.  Reference settings
(``QwenImage21Pipeline``): 40 steps, CFG 1 (no guidance), images and output at the area of 1024 x 1024 on a 32-px
grid, the resolution-dependent shift; Turbo: 8 steps, CFG 1.
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.ops

from ..models import (FLOAT8_DTYPES, QWEN_IMAGE_2_1_LATENT, flow_sigmas, load_diffusion_model_2_1,
                      load_text_encoder_2_1, load_vae_2_1, policy_size, resize_images)
from .common import (QWEN_IMAGE_2_1, ImageList, Node, badge_ui, denoise_input, dequant_cache_input, io, loader_inputs,
                     mappings, output, prompt_input, schema)
from .host.components import host_tokenizer_dir
from .host.files import SAFETENSORS_EXTENSIONS, WEIGHT_EXTENSIONS, chosen_file, list_models
from .host.model_2_1 import (CACHE_OFF, CACHE_OFFLOADED, CACHE_ON_DEVICE, IMAGE_SLOTS_KEY, PREFIX_CACHE_OPTION,
                             REFERENCE_RESOLUTION, HostQwenImage21DiT, HostTextEncoder21, HostVAE21, latent_tokens,
                             reference_shift, wrap_diffusion_model_2_1)
from .host.ops import compute_dtype, host_ops, set_gguf_dequant_cache

logger = logging.getLogger("qwen_image")

# Our type for the Qwen3-VL encoder, so it never connects to the 1.x (Qwen2.5-VL) nodes, nor theirs to ours.
TextEncoder = io.Custom("QWEN_IMAGE_2_1_TEXT_ENCODER")
MAX_REFERENCES = 10  # QwenImage21Pipeline's limit of condition images
# Image sides: the reference's grid (the vision tower's 32-px tokens, each an even 2x2 group of latent cells).
GRID = 32
DEFAULT_STEPS = 40
CACHE_MODES = {"on, kept on the compute device (fastest)": CACHE_ON_DEVICE,
               "on, offloaded to the CPU (least VRAM)": CACHE_OFFLOADED, "off": CACHE_OFF}


def _images(*inputs: torch.Tensor | None, more: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every condition image as ``[1, H, W, 3]``, in order: each batch frame by frame, then the list."""
    return [frame[None, ..., :3] for batch in inputs if batch is not None for frame in batch] + list(more or [])


class DiffusionModelLoader21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "21DiffusionModelLoader", "Load Qwen-Image 2.1 Diffusion Model", QWEN_IMAGE_2_1,
            "Loads a Qwen-Image 2.1 (or 2.1 Turbo) diffusion model: Comfy-Org single files (bf16, fp16, fp8, scaled "
            "fp8), diffusers transformer folders, or GGUF. Qwen-Image 1.x files belong in Load Qwen-Image Diffusion "
            "Model.",
            inputs=[*loader_inputs("model_name", list_models("diffusion_models", "transformer", WEIGHT_EXTENSIONS),
                                   "A Qwen-Image 2.1 file or diffusers folder in models/diffusion_models (or "
                                   "models/unet)."),
                    dequant_cache_input()],
            outputs=[output(io.Model, None, "The Qwen-Image 2.1 DiT (or 2.1 Turbo), managed by ComfyUI like its own "
                                            "models.")])

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str, dequant_cache: bool = True) -> io.NodeOutput:
        compute = compute_dtype(weight_dtype, mm.get_torch_device())
        with chosen_file("diffusion_models", "model_name", model_name) as path:
            ops, stored = host_ops(path, compute)
            dit = load_diffusion_model_2_1(path, dtype=compute, device=mm.unet_offload_device(), ops=ops,
                                           model_class=HostQwenImage21DiT)
        dit.source = model_name  # named when conditioning of another encoder reaches it
        set_gguf_dequant_cache(dit, dequant_cache)
        storage = stored if stored in FLOAT8_DTYPES else compute
        variant = "2.1 Turbo" if "turbo" in model_name.lower() else "2.1"  # same architecture: the name tells
        return io.NodeOutput(wrap_diffusion_model_2_1(dit, storage, compute if storage != compute else None),
                             ui=badge_ui(variant, dit, path))


class TextEncoderLoader21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "21TextEncoderLoader", "Load Qwen-Image 2.1 Text Encoder", QWEN_IMAGE_2_1,
            "Loads the Qwen3-VL-8B condition encoder of Qwen-Image 2.1 (Comfy-style single files in bf16 or scaled "
            "fp8, or the diffusers text_encoder folder); the tokenizer comes from the folder or your ComfyUI install.",
            inputs=loader_inputs("text_encoder_name", list_models("text_encoders", "text_encoder", WEIGHT_EXTENSIONS),
                                 "A Qwen3-VL file or HF folder in models/text_encoders (or models/clip), e.g. "
                                 "qwen3vl_8b_bf16.safetensors."),
            outputs=[output(TextEncoder, None, "The Qwen3-VL condition encoder with its tokenizer.")])

    @classmethod
    def execute(cls, text_encoder_name: str, weight_dtype: str) -> io.NodeOutput:
        load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        compute = compute_dtype(weight_dtype, load_device)
        with chosen_file("text_encoders", "text_encoder_name", text_encoder_name) as path:
            encoder = load_text_encoder_2_1(path, dtype=compute, device=offload_device, ops=host_ops(path, compute)[0],
                                            host_tokenizer_dirs=[host_tokenizer_dir()])
        logger.info("Qwen-Image 2.1 text encoder: %s (%s)", text_encoder_name, compute)
        return io.NodeOutput(HostTextEncoder21(encoder, load_device, offload_device, text_encoder_name),
                             ui=badge_ui("Qwen3-VL (2.1)", encoder.model, path))


class VAELoader21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "21VAELoader", "Load Qwen-Image 2.1 VAE", QWEN_IMAGE_2_1,
            "Loads the Qwen-Image 2.1 VAE (the Comfy-Org single file, or a diffusers vae folder).",
            inputs=loader_inputs("vae_name", list_models("vae", "vae", SAFETENSORS_EXTENSIONS),
                                 "A file or diffusers folder in models/vae, e.g. qwen_image_2.1_vae_bf16.safetensors."),
            outputs=[output(io.Vae, None, "The 64-channel 16x RGBA VAE of Qwen-Image 2.1; core VAE Decode / VAE "
                                          "Encode work with it (decoded images are RGBA).")])

    @classmethod
    def execute(cls, vae_name: str, weight_dtype: str) -> io.NodeOutput:
        compute = compute_dtype(weight_dtype, mm.vae_device())
        with chosen_file("vae", "vae_name", vae_name) as path:
            vae = load_vae_2_1(path, dtype=compute, device=mm.vae_offload_device(), ops=comfy.ops.disable_weight_init)
        return io.NodeOutput(HostVAE21(vae), ui=badge_ui("2.1 VAE", vae, path))


class Encode21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "21Encode", "Qwen-Image 2.1 Encode", QWEN_IMAGE_2_1,
            "Text-to-image and image-conditioned generation in one: the prompt and any number of condition images (up "
            "to 10) through Qwen3-VL together, each image also through the 2.1 VAE; every image is sized like the "
            "reference (aspect kept, output_resolution^2 area, sides multiples of 32).",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="From Load Qwen-Image 2.1 Text Encoder."),
                prompt_input("prompt", "What to draw, or how to use the images (they are <image1>, <image2>, ... in "
                                       "the encoder's prompt)."),
                prompt_input("negative_prompt", "Used only with CFG > 1 (2.1 is meant to run at CFG 1). Empty: no "
                                                "negative is encoded; a single space is the reference's empty "
                                                "negative."),
                io.Int.Input("output_resolution", default=REFERENCE_RESOLUTION, min=256, max=4096, step=GRID,
                             tooltip="Side of the square whose area every condition image and the output latent get "
                                     "(the reference's output_resolution, 1024)."),
                io.Vae.Input("vae", optional=True, tooltip="The Qwen-Image 2.1 VAE; needed with condition images."),
                io.Image.Input("image", optional=True,
                               tooltip="A condition image (a batch counts as several images)."),
                io.Image.Input("image2", optional=True, tooltip="A second condition image."),
                io.Image.Input("image3", optional=True, tooltip="A third condition image."),
                ImageList.Input("more_images", optional=True,
                                tooltip="Any number of further images, from Qwen-Image Image List nodes (up to 10 "
                                        "images in all)."),
            ],
            outputs=[
                output(io.Conditioning, "positive", "The prompt with the condition images (Qwen3-VL) and their "
                                                    "latents."),
                output(io.Conditioning, "negative", "The negative prompt with the same images; without a negative "
                                                    "prompt the positive itself (CFG then changes nothing, like the "
                                                    "reference without one)."),
                output(io.Latent, "latent", "The empty latent to sample into: the last image's aspect at the output "
                                            "resolution's area, or a square of that side without images."),
            ])

    @classmethod
    def execute(cls, text_encoder, prompt: str, negative_prompt: str, output_resolution: int, vae=None, image=None,
                image2=None, image3=None, more_images=None) -> io.NodeOutput:
        images = _images(image, image2, image3, more=more_images)
        if len(images) > MAX_REFERENCES:
            raise ValueError(f"Qwen-Image 2.1 takes at most {MAX_REFERENCES} condition images, got {len(images)}.")
        if images and getattr(vae, "latent_channels", None) != QWEN_IMAGE_2_1_LATENT.channels:
            raise ValueError("vae: condition images need the Qwen-Image 2.1 VAE (64 latent channels); connect Load "
                             "Qwen-Image 2.1 VAE.")
        area = output_resolution * output_resolution
        sized = [resize_images(img, *policy_size(img.shape[2], img.shape[1], area, GRID)) for img in images]
        latents = [vae.encode(img) for img in sized]
        positive = cls._conditioning(text_encoder, prompt, sized, latents)
        negative = cls._conditioning(text_encoder, negative_prompt, sized, latents) if negative_prompt else positive
        width, height = (sized[-1].shape[2], sized[-1].shape[1]) if sized else (output_resolution,) * 2
        latent = QWEN_IMAGE_2_1_LATENT.empty(1, width, height, mm.intermediate_device())
        return io.NodeOutput(positive, negative, {"samples": latent})

    @staticmethod
    def _conditioning(text_encoder, prompt: str, images: list[torch.Tensor], latents: list[torch.Tensor]) -> list:
        condition = text_encoder.encode(prompt, images=[img[0] for img in images])
        for index, (grid, latent) in enumerate(zip(condition.image_grids, latents)):
            # Each encoder token covers a 2x2 group of latent cells; the processor resizes images outside its
            # pixel range, and then the slots no longer fit the latent.
            if tuple(2 * side for side in grid) != tuple(latent.shape[-2:]):
                raise ValueError(f"image {index + 1}: at {images[index].shape[2]}x{images[index].shape[1]} the "
                                 "vision encoder resizes it (it takes 256x256 to 4096x4096 pixels), so it no longer "
                                 "matches its latent; change output_resolution.")
        if not images:
            return text_encoder.conditioning(condition.embeds)
        return text_encoder.conditioning(condition.embeds, reference_latents=latents,
                                         **{IMAGE_SLOTS_KEY: tuple(condition.image_mask[0].tolist())})


class EmptyLatent21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        size = {"default": REFERENCE_RESOLUTION, "min": GRID, "max": 4096, "step": GRID}
        return schema(
            "21EmptyLatent", "Empty Qwen-Image 2.1 Latent", QWEN_IMAGE_2_1,
            "Makes the empty latent to sample a Qwen-Image 2.1 text-to-image into, on the reference's 32-px grid.",
            inputs=[
                io.Int.Input("width", **size, tooltip=f"Width in pixels, a multiple of {GRID} (reference 1024)."),
                io.Int.Input("height", **size, tooltip=f"Height in pixels, a multiple of {GRID} (reference 1024)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="How many images at once."),
            ],
            outputs=[output(io.Latent, None, f"An all-zero latent batch (raw VAE space, "
                                             f"{QWEN_IMAGE_2_1_LATENT.channels} channels, "
                                             f"1/{QWEN_IMAGE_2_1_LATENT.spatial_factor} of the image size).")])

    @classmethod
    def execute(cls, width: int, height: int, batch_size: int) -> io.NodeOutput:
        if width % GRID or height % GRID:
            raise ValueError(f"Qwen-Image 2.1 needs sides that are multiples of {GRID} pixels; got {width}x{height}.")
        samples = QWEN_IMAGE_2_1_LATENT.empty(batch_size, width, height, mm.intermediate_device())
        return io.NodeOutput({"samples": samples})


class Scheduler21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "21Scheduler", "Qwen-Image 2.1 Scheduler", QWEN_IMAGE_2_1,
            "The reference Qwen-Image 2.1 schedule: linear sigmas, exponentially shifted by mu from the latent's size "
            "(0.5 at 256 tokens to 1.15 at 4096, 1024x1024), no terminal stretch. Use with SamplerCustom(Advanced).",
            inputs=[
                io.Latent.Input("latent", tooltip="The latent to sample: its size sets the shift."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=1000,
                             tooltip="Sampling steps (reference 40; Turbo 8)."),
                denoise_input(),
            ],
            outputs=[output(io.Sigmas, None, "The noise levels to sample through, ending at 0.")])

    @classmethod
    def execute(cls, latent: dict, steps: int, denoise: float) -> io.NodeOutput:
        if denoise <= 0.0:
            return io.NodeOutput(torch.zeros(0))
        total = steps if denoise >= 1.0 else int(steps / denoise)
        sigmas = flow_sigmas(total, reference_shift(latent_tokens(latent["samples"])), terminal=None)
        return io.NodeOutput(sigmas[-(steps + 1):])


class PrefixCache21(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "21PrefixCache", "Qwen-Image 2.1 Prefix Cache", QWEN_IMAGE_2_1,
            "The 2.1 DiT computes the prompt's and the condition images' keys and values once per sampling run and "
            "reuses them at every step (exact: the same result as without). On by default; here you can offload them "
            "to the CPU to save VRAM with many images, or turn the cache off.",
            inputs=[
                io.Model.Input("model", tooltip="A Qwen-Image 2.1 model."),
                io.Combo.Input("mode", options=list(CACHE_MODES),
                               tooltip="Where the cached keys and values live, or off (recomputed at every step)."),
            ],
            outputs=[output(io.Model, None, "The model with this prefix cache setting.")])

    @classmethod
    def execute(cls, model, mode: str) -> io.NodeOutput:
        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})[PREFIX_CACHE_OPTION] = CACHE_MODES[mode]
        return io.NodeOutput(patched)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    DiffusionModelLoader21, TextEncoderLoader21, VAELoader21, Encode21, EmptyLatent21, Scheduler21, PrefixCache21)
