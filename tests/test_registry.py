"""models.registry.identify: every file layout the factory makes, Layered and its RGBA VAE and the family members
the pack does not run yet (Qwen-Image 2.1 at tiny width from diffusers / transformers), and other models' files
are named correctly; every loader's wrong-file message is the registry's description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import (BlockwiseControl, QwenImageControlNet, QwenImageDiT, QwenImageVAE, TextEncoder, WeightFileError,
                    identify, load, load_blockwise_control, load_controlnet, load_diffusion_model,
                    load_text_encoder, load_vae)
from references import host_tokenizer_dir
from tiny_models.configs import TINY_DIT
from tiny_models.factory import (make_blockwise_control, make_controlnet, make_controlnet_gguf, make_dit, make_lora,
                                 make_text_encoder, make_vae)
from tiny_models.gguf_factory import make_dit_gguf, make_text_encoder_gguf


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A single file, or a diffusers-style folder when a config is given."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    if config is None:
        save_file(tensors, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _shapes(spec: dict[str, tuple]) -> dict[str, torch.Tensor]:
    # Ones, not zeros: a file ending in zero-filled tensors is what an interrupted download leaves (refused).
    return {name: torch.ones(shape) for name, shape in spec.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


# -- what the factory makes ------------------------------------------------------------------------------------------
FACTORY = {
    "dit bf16": (lambda r: make_dit(r / "a", dtype="bf16"), ("qwen_image", "diffusion_model", "comfy", "")),
    "dit fp16": (lambda r: make_dit(r / "a", dtype="fp16"), ("qwen_image", "diffusion_model", "comfy", "")),
    "dit fp8": (lambda r: make_dit(r / "a", dtype="fp8_e4m3fn"), ("qwen_image", "diffusion_model", "comfy", "")),
    "dit fp8 e5m2": (lambda r: make_dit(r / "a", dtype="fp8_e5m2"), ("qwen_image", "diffusion_model", "comfy", "")),
    "dit scaled fp8": (lambda r: make_dit(r / "a", dtype="fp8_e4m3fn_scaled"),
                       ("qwen_image", "diffusion_model", "comfy", "")),
    "dit prefixed": (lambda r: make_dit(r / "a", prefix=True), ("qwen_image", "diffusion_model", "comfy", "")),
    "dit diffusers": (lambda r: make_dit(r / "a", layout="diffusers", dtype="fp32"),
                      ("qwen_image", "diffusion_model", "diffusers", "")),
    "dit 2511": (lambda r: make_dit(r / "a", variant="edit2511"),
                 ("qwen_image", "diffusion_model", "comfy", "edit-2511")),
    "dit 2511 diffusers": (lambda r: make_dit(r / "a", layout="diffusers", variant="edit2511"),
                           ("qwen_image", "diffusion_model", "diffusers", "edit-2511")),
    "dit gguf": (lambda r: make_dit_gguf(r / "a", qtype="Q8_0"), ("qwen_image", "diffusion_model", "gguf", "")),
    "vae comfy": (lambda r: make_vae(r / "a"), ("qwen_image", "vae", "comfy", "")),
    "vae diffusers": (lambda r: make_vae(r / "a", layout="diffusers"), ("qwen_image", "vae", "diffusers", "")),
    "te comfy": (lambda r: make_text_encoder(r / "a"), ("qwen_image", "text_encoder", "comfy", "qwen2.5-vl")),
    "te hf": (lambda r: make_text_encoder(r / "a", layout="hf", tokenizer_dir=host_tokenizer_dir()),
              ("qwen_image", "text_encoder", "hf", "qwen2.5-vl")),
    "te gguf": (lambda r: make_text_encoder_gguf(r / "a")[0], ("qwen_image", "text_encoder", "gguf", "qwen2.5-vl")),
    "mmproj gguf": (lambda r: make_text_encoder_gguf(r / "b")[1],
                    ("qwen_image", "vision_projector", "gguf", "mmproj")),
    "instantx union": (lambda r: make_controlnet(r / "a", variant="union", layout="comfy"),
                       ("qwen_image", "controlnet", "comfy", "union")),
    "instantx inpaint": (lambda r: make_controlnet(r / "a", variant="inpaint", layout="diffusers"),
                         ("qwen_image", "controlnet", "diffusers", "inpaint")),
    "instantx gguf": (lambda r: make_controlnet_gguf(r / "a"), ("qwen_image", "controlnet", "gguf", "union")),
    "diffsynth canny": (lambda r: make_blockwise_control(r / "a", variant="canny"),
                        ("qwen_image", "model_patch", "diffsynth", "")),
    "diffsynth inpaint": (lambda r: make_blockwise_control(r / "a", variant="inpaint"),
                          ("qwen_image", "model_patch", "diffsynth", "inpaint")),
    "lora diffusers": (lambda r: make_lora(r / "a", lora_format="diffusers"), ("qwen_image", "lora", "lora", "")),
    "lora kohya": (lambda r: make_lora(r / "a", lora_format="kohya"), ("qwen_image", "lora", "lora", "")),
}


@pytest.mark.parametrize("case", list(FACTORY))
def test_factory_files(root, case):
    make, expected = FACTORY[case]
    identity = identify(make(root / case.replace(" ", "_")))
    assert (identity.family, identity.role, identity.layout, identity.variant) == expected
    assert identity.supported == (identity.role != "vision_projector")


# -- family members the pack does not run yet, built by the reference libraries ---------------------------------------
def _qwen_image_2_1_dit() -> dict:
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=2, context_in_dim=32,
                                         axes_dims_rope=(4, 6, 6)).state_dict()


def _layered_dit() -> tuple[dict, dict]:
    from diffusers import QwenImageTransformer2DModel

    config = {**TINY_DIT, "use_additional_t_cond": True, "use_layer3d_rope": True}
    return QwenImageTransformer2DModel(**config).state_dict(), config


def test_layered_dit(root):
    state, config = _layered_dit()
    for path in (_save(root / "layered.safetensors", state),
                 _save(root / "layered_prefixed.safetensors", {"model.diffusion_model." + k: v for k, v in state.items()}),
                 _save(root / "layered_diffusers", state, config)):
        identity = identify(path)
        assert (identity.family, identity.role, identity.variant, identity.supported) == (
            "qwen_image", "diffusion_model", "layered", True), path
        assert "Layered" in identity.description


def test_rgba_vae(root):
    from diffusers import AutoencoderKLQwenImage

    state = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                   input_channels=4).state_dict()
    identity = identify(_save(root / "rgba_vae.safetensors", state))
    assert (identity.family, identity.role, identity.layout, identity.variant, identity.supported) == (
        "qwen_image", "vae", "diffusers", "rgba", True)


def test_qwen_image_2_1(root):
    from diffusers import AutoencoderKLQwenImage21
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    dit = _qwen_image_2_1_dit()
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4, 4],
                                   num_res_blocks=1, latents_mean=[0.0] * 8, latents_std=[1.0] * 8).state_dict()
    encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=100,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0]))).state_dict()
    cases = {"dit.safetensors": (dit, "diffusion_model", "Qwen-Image 2.1 DiT"),
             "vae.safetensors": (vae, "vae", "Qwen-Image 2.1 VAE"),
             "qwen3vl.safetensors": (encoder, "text_encoder", "Qwen3-VL")}
    for name, (state, role, words) in cases.items():
        identity = identify(_save(root / name, state))
        assert (identity.family, identity.role, identity.supported) == ("qwen_image_2_1", role, True), name
        assert words in identity.description and "Qwen-Image 2.1" in identity.advice


# -- other models' files ---------------------------------------------------------------------------------------------
OTHERS = {
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (8, 8), "single_blocks.0.linear1.weight": (8, 8),
              "img_in.weight": (8, 64)}, ("flux", "diffusion_model"), "Flux diffusion model"),
    "flux diffusers": ({"transformer_blocks.0.attn.to_q.weight": (8, 8),
                        "single_transformer_blocks.0.attn.to_q.weight": (8, 8), "x_embedder.weight": (8, 64)},
                       ("flux", "diffusion_model"), "Flux diffusion model"),
    "sd3": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (8, 8)}, ("sd3", "diffusion_model"),
            "Stable Diffusion 3"),
    "sdxl checkpoint": ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
                         "model.diffusion_model.label_emb.0.0.weight": (8, 8),
                         "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
                         "conditioner.embedders.1.model.ln_final.weight": (8,)},
                        ("sdxl", "checkpoint"), "full Stable Diffusion XL checkpoint"),
    "sd1 unet": ({"input_blocks.0.0.weight": (8, 4, 3, 3)}, ("sd1", "diffusion_model"), "UNet"),
    "wan 2.2 vae": ({"encoder.conv1.weight": (160, 12, 3, 3, 3), "conv1.weight": (96, 96, 1, 1, 1),
                     "conv2.weight": (48, 48, 1, 1, 1)}, ("wan", "vae"), "Wan 2.2 VAE"),
    "sd vae": ({"encoder.conv_in.weight": (128, 3, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
                "decoder.conv_in.weight": (512, 4, 3, 3)}, ("sd", "vae"), "SD 1.x / SDXL-style VAE"),
    "flux vae": ({"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (32, 512, 3, 3),
                  "decoder.conv_in.weight": (512, 16, 3, 3)}, ("flux", "vae"), "Flux / SD3-style VAE"),
    "clip": ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8)}, ("clip", "text_encoder"), "CLIP"),
    "t5": ({"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8), "shared.weight": (8, 8)},
           ("t5", "text_encoder"), "T5"),
    "qwen3 llm": ({"model.embed_tokens.weight": (8, 8), "model.layers.0.self_attn.q_norm.weight": (4,)},
                  ("qwen3", "text_encoder"), "Qwen3"),
    "flux controlnet": ({"controlnet_blocks.0.weight": (8, 8), "controlnet_single_blocks.0.weight": (8, 8)},
                        ("flux", "controlnet"), "Flux ControlNet"),
    "flux lora": ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 8)}, ("flux", "lora"),
                  "Flux LoRA"),
    "unknown": ({"foo.weight": (4, 4)}, ("unknown", "unknown"), "no model this pack recognises"),
}


@pytest.mark.parametrize("case", list(OTHERS))
def test_other_models(root, case):
    spec, expected, words = OTHERS[case]
    identity = identify(_save(root / f"{case.replace(' ', '_')}.safetensors", _shapes(spec)))
    assert (identity.family, identity.role) == expected and not identity.supported
    assert words in identity.description, identity.description


def test_in_memory_mapping_and_path_agree(root):
    path = make_dit(root / "mem", dtype="fp32")
    from safetensors.torch import load_file

    assert identify(load_file(str(path))) == identify(path)


# -- every loader's wrong-file message is the registry's -----------------------------------------------------------
LOADERS = {
    "dit": lambda p: load_diffusion_model(p, family="qwen_image"),  # pinned: unpinned, a 2.1 file loads
    "vae": lambda p: load_vae(p, family="qwen_image"),
    "text_encoder": lambda p: load_text_encoder(p, tokenizer=host_tokenizer_dir(), family="qwen_image"),
    "controlnet": lambda p: load_controlnet(p),
    "blockwise": lambda p: load_blockwise_control(p),
}
WRONG_FILES = {
    "dit": lambda r: make_dit(r, dtype="fp32"),
    "vae": lambda r: make_vae(r),
    "text_encoder": lambda r: make_text_encoder(r),
    "controlnet": lambda r: make_controlnet(r, layout="comfy"),
    "blockwise": lambda r: make_blockwise_control(r),
    "layered": lambda r: _save(r / "layered.safetensors", _layered_dit()[0]),
    "qwen-image 2.1": lambda r: _save(r / "qwen_image_2_1.safetensors", _qwen_image_2_1_dit()),
    "flux": lambda r: _save(r / "flux.safetensors", _shapes(OTHERS["flux"][0])),
    "sdxl checkpoint": lambda r: _save(r / "sdxl.safetensors", _shapes(OTHERS["sdxl checkpoint"][0])),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_wrong_file_messages_come_from_the_registry(root, loader):
    folder = root / f"wrong_{loader}"
    folder.mkdir()
    for kind, make in WRONG_FILES.items():
        if kind == loader or (loader, kind) == ("dit", "layered"):  # the DiT loader runs Layered DiTs
            continue
        path = make(folder)
        with pytest.raises(WeightFileError) as error:
            LOADERS[loader](path)
        message = str(error.value)
        assert identify(path).description in message and str(path) in message, (loader, kind, message)


def test_load_dispatches_by_identity(root):
    folder = root / "load"
    folder.mkdir()
    cases = [(WRONG_FILES["dit"](folder), QwenImageDiT), (WRONG_FILES["vae"](folder), QwenImageVAE),
             (WRONG_FILES["controlnet"](folder), QwenImageControlNet),
             (WRONG_FILES["blockwise"](folder), BlockwiseControl)]
    for path, kind in cases:
        assert isinstance(load(path), kind), path
    assert isinstance(load(WRONG_FILES["text_encoder"](folder), tokenizer=host_tokenizer_dir()), TextEncoder)
    assert isinstance(load(WRONG_FILES["layered"](folder)), QwenImageDiT)
    from models import QwenImage21DiT

    assert isinstance(load(WRONG_FILES["qwen-image 2.1"](folder)), QwenImage21DiT)
    for kind in ("flux", "sdxl checkpoint"):
        path = WRONG_FILES[kind](folder)
        with pytest.raises(WeightFileError, match="not a file this pack can load") as error:
            load(path)
        assert identify(path).description in str(error.value)
