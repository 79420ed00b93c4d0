"""The reference implementations (diffusers / transformers) built on the tiny checkpoints, shared by the tests.

Each builder reads one of the factory's Comfy-layout files in fp32 ("scaled fp8" weights multiplied by their
scale) and loads it strictly into the reference model, so a test compares our code with the reference on
identical weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from env import comfyui_path
from tiny_models.configs import TINY_DIT, TINY_TEXT, TINY_VAE, TINY_VISION
from tiny_models.factory import DIT_PREFIX
from models.qwen_image.vae_keys import diffusers_to_wan

TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
# The Qwen/Qwen-Image scheduler_config.json.
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                      use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


def host_tokenizer_dir() -> Path:
    """The Qwen2.5 tokenizer folder of the host the tests run (COMFYUI_PATH or the pinned ComfyUI)."""
    folder = comfyui_path() / TOKENIZER_SUBDIR
    if not (folder / "vocab.json").is_file():
        raise FileNotFoundError(f"the host has no Qwen2.5 tokenizer at {folder}")
    return folder


def comfy_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A Comfy file's tensors in fp32, "scaled fp8" weights multiplied by their scale, markers dropped."""
    tensors = load_file(str(path))
    out = {}
    for name, tensor in tensors.items():
        if name in ("scaled_fp8", "__index_timestep_zero__") or name.endswith((".scale_weight", ".scale_input")):
            continue
        scale = tensors.get(name[: -len("weight")] + "scale_weight") if name.endswith("weight") else None
        out[name] = tensor.float() * scale.float() if scale is not None else tensor.float()
    return out


def reference_dit(path: Path, config: dict | None = None):
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**(config or TINY_DIT))
    state = {name.removeprefix(DIT_PREFIX): tensor for name, tensor in comfy_tensors(path).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_vae(path: Path, config: dict | None = None):
    from diffusers import AutoencoderKLQwenImage

    model = AutoencoderKLQwenImage(**(config or TINY_VAE))
    model.load_state_dict(wan_named_state(model, comfy_tensors(path)), strict=True)
    return model.eval()


def wan_named_state(model, wan_tensors: dict) -> dict:
    """A diffusers VAE state dict from tensors under the original Wan names (through the loader's mapping)."""
    return {name: wan_tensors[diffusers_to_wan(name)] for name in model.state_dict()}


def reference_text_encoder(path: Path):
    """transformers' Qwen2.5-VL in fp32 (transformers 5 module names) with a Comfy file's weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=TINY_VISION))
    state = {}
    for name, tensor in comfy_tensors(path).items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        elif name.startswith("visual."):
            name = "model." + name
        state[name] = tensor
    model.load_state_dict(state, strict=True)
    return model.eval()


def pack(latent: torch.Tensor) -> torch.Tensor:
    """diffusers' 2x2 packing of ``[B,16,H,W]`` (or single-frame 5-D) into ``[B, H/2*W/2, 64]``."""
    if latent.ndim == 5:
        latent = latent[:, :, 0]
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


IMAGE_TOKEN_ID = 151655  # <|image_pad|>


@contextlib.contextmanager
def passing_token_types(model):
    """Make transformers' Qwen2.5-VL receive mm_token_type_ids (image tokens = 1), which the diffusers Edit
    pipelines leave out; without them transformers 5 uses 1-D positions for image tokens (REFERENCE.md s.2)."""
    original = model.forward

    def forward(*args, **kwargs):
        if kwargs.get("input_ids") is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == IMAGE_TOKEN_ID).int()
        return original(*args, **kwargs)

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


def reference_controlnet(path: Path, config: dict | None = None):
    """diffusers' QwenImageControlNetModel in fp32: ``from_pretrained`` on an InstantX folder (asserting that no
    key is missing or unexpected), or a strict ``load_state_dict`` of a single file with ``config``."""
    from diffusers import QwenImageControlNetModel

    path = Path(path)
    if path.is_dir():
        model, info = QwenImageControlNetModel.from_pretrained(str(path), torch_dtype=torch.float32,
                                                               output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        assert not problems, f"diffusers could not load {path} cleanly: {problems}"
        return model.float().eval()
    model = QwenImageControlNetModel(**config)
    model.load_state_dict(comfy_tensors(path), strict=True)
    return model.eval()
