"""The tiny-checkpoint factory writes files the reference implementations load exactly.

Every layout / dtype variant is loaded by diffusers / transformers with no missing, unexpected or mis-shaped
keys; the loaded weights equal the file's tensors; the tiny reference models give finite O(1) outputs on them;
same seed gives the same bytes; the Wan <-> diffusers VAE names are a bijection over the full key set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tiny_models import factory
from models.io.weights import open_checkpoint
from tiny_models.configs import TINY_DIT, TINY_TEXT, TINY_VAE, TINY_VISION
from models.qwen_image.vae_keys import diffusers_to_wan
from build_workflows import LIGHTNING_LORAS
from references import host_tokenizer_dir, wan_named_state

REPO_ROOT = Path(__file__).resolve().parent.parent
DIT_DTYPES = ["bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_e5m2"]
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp8_e4m3fn_scaled": torch.float8_e4m3fn}


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(read_file(shard))
    return out


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(file.read_bytes())
    return h.hexdigest()


def dequantize_comfy_dit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Comfy DiT file as a plain fp32 diffusers state dict: prefix stripped, scaled fp8 applied, markers dropped."""
    tensors = {k.removeprefix(factory.DIT_PREFIX): v for k, v in tensors.items()}
    out = {}
    for name, tensor in tensors.items():
        if name in ("scaled_fp8", "__index_timestep_zero__") or name.endswith((".scale_weight", ".scale_input")):
            continue
        tensor = tensor.float()
        scale = tensors.get(name.removesuffix(".weight") + ".scale_weight")
        out[name] = tensor * scale if scale is not None and name.endswith(".weight") else tensor
    return out


def assert_order_one(x: torch.Tensor, what: str) -> None:
    assert torch.isfinite(x).all(), f"{what}: non-finite output"
    rms = x.float().pow(2).mean().sqrt().item()
    assert 0.05 < rms < 20, f"{what}: output RMS {rms} is not O(1)"


# --------------------------------------------------------------------------------------------------------- DiT
def dit_forward(model: QwenImageTransformer2DModel, images: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    h = w = 4  # 8x8 latent -> 4x4 patches per image
    latents = torch.randn(1, h * w * images, TINY_DIT["in_channels"])
    text = torch.randn(1, 7, TINY_DIT["joint_attention_dim"])
    with torch.no_grad():
        return model(hidden_states=latents, encoder_hidden_states=text,
                     encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.bool),
                     timestep=torch.tensor([0.6]), img_shapes=[[(1, h, w)] * images]).sample


@pytest.fixture(scope="module")
def dit_reference() -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(**TINY_DIT).eval()


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("dtype", DIT_DTYPES)
def test_comfy_dit_loads_strict_in_diffusers(tmp_path, dit_reference, dtype, prefix):
    path = factory.make_dit(tmp_path, dtype=dtype, prefix=prefix)
    raw = read_file(path)
    assert all(k.startswith(factory.DIT_PREFIX) for k in raw) == prefix
    raw = {k.removeprefix(factory.DIT_PREFIX): v for k, v in raw.items()}
    if dtype in FP8:
        # Linear weights in fp8; biases and norms stay bf16.
        assert raw["transformer_blocks.0.attn.to_q.weight"].dtype == FP8[dtype]
        assert raw["img_in.weight"].dtype == FP8[dtype]
        assert raw["transformer_blocks.0.attn.to_q.bias"].dtype == torch.bfloat16
        assert raw["transformer_blocks.0.attn.norm_q.weight"].dtype == torch.bfloat16
    if dtype == "fp8_e4m3fn_scaled":
        assert raw["scaled_fp8"].dtype == torch.float8_e4m3fn and raw["scaled_fp8"].numel() == 0
        assert raw["transformer_blocks.0.img_mod.1.scale_weight"].shape == ()
        assert raw["transformer_blocks.0.img_mod.1.scale_input"].dtype == torch.float32
        assert not any(k.endswith(".scale_weight") and k.removesuffix(".scale_weight") + ".weight" not in raw
                       for k in raw)
    else:
        assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in raw)
    state = dequantize_comfy_dit(raw)
    model = QwenImageTransformer2DModel(**TINY_DIT)
    model.load_state_dict(state, strict=True)  # raises on missing / unexpected / mis-shaped keys
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"])
    out = dit_forward(model.eval())
    assert_order_one(out, f"DiT {dtype}")
    if dtype != "fp32":  # every variant holds the fp32 weights up to its rounding
        reference = QwenImageTransformer2DModel(**TINY_DIT)
        reference.load_state_dict(read_file(factory.make_dit(tmp_path / "ref", dtype="fp32")), strict=True)
        expected = dit_forward(reference.eval())
        cosine = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
        assert cosine > (0.99 if dtype in FP8 else 0.9999), f"{dtype}: cosine {cosine}"


def test_comfy_edit2511_has_comfy_marker(tmp_path):
    plain = read_file(factory.make_dit(tmp_path, variant="plain", prefix=True))
    edit = read_file(factory.make_dit(tmp_path, variant="edit2511", prefix=True))
    assert set(edit) - set(plain) == {factory.DIT_PREFIX + "__index_timestep_zero__"}
    model = QwenImageTransformer2DModel(**TINY_DIT, zero_cond_t=True)
    model.load_state_dict(dequantize_comfy_dit(edit), strict=True)
    assert all(torch.equal(edit[k], plain[k]) for k in plain)  # same weights, only the flag differs


@pytest.mark.parametrize("variant", ["plain", "edit2511"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_diffusers_dit_folder_loads_with_from_pretrained(tmp_path, dtype, variant):
    folder = factory.make_dit(tmp_path, layout="diffusers", dtype=dtype, variant=variant)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(s.startswith("diffusion_pytorch_model-0000") for s in shards)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "QwenImageTransformer2DModel"
    model, info = QwenImageTransformer2DModel.from_pretrained(folder, output_loading_info=True,
                                                              torch_dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.zero_cond_t == (variant == "edit2511")
    file = read_folder(folder)
    assert set(file) == set(model.state_dict())
    for name in ("img_in.weight", "transformer_blocks.1.attn.norm_added_k.weight", "norm_out.linear.bias"):
        assert torch.equal(model.state_dict()[name], file[name].float())
    assert_order_one(dit_forward(model.eval(), images=2 if variant == "edit2511" else 1), f"DiT folder {dtype}")
    # The comfy file of the same seed holds the same values.
    comfy = read_file(factory.make_dit(tmp_path, dtype=dtype))
    assert all(torch.equal(comfy[k], file[k]) for k in file)


# --------------------------------------------------------------------------------------------------------- VAE
def vae_roundtrip(model: AutoencoderKLQwenImage) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 1, 16, 16) * 2 - 1  # 16 px -> 2x2 latent
    with torch.no_grad():
        latent = model.encode(image).latent_dist.mean
        return latent, model.decode(latent).sample


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_comfy_vae_has_wan_names_and_loads_strict(tmp_path, dtype):
    raw = read_file(factory.make_vae(tmp_path, dtype=dtype))
    assert {"encoder.conv1.weight", "conv1.weight", "conv2.weight", "encoder.downsamples.0.residual.0.gamma",
            "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight", "decoder.upsamples.3.time_conv.weight",
            "decoder.head.0.gamma"} <= set(raw)
    model = AutoencoderKLQwenImage(**TINY_VAE)
    model.load_state_dict({k: v.float() for k, v in wan_named_state(model, raw).items()}, strict=True)
    latent, decoded = vae_roundtrip(model.eval())
    assert_order_one(latent, f"VAE latent {dtype}")
    assert_order_one(decoded, f"VAE decode {dtype}")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_diffusers_vae_folder_loads_with_from_pretrained(tmp_path, dtype):
    folder = factory.make_vae(tmp_path, layout="diffusers", dtype=dtype)
    model, info = AutoencoderKLQwenImage.from_pretrained(folder, output_loading_info=True, torch_dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert len(model.config.latents_mean) == TINY_VAE["z_dim"]
    file = read_folder(folder)
    comfy = read_file(factory.make_vae(tmp_path, dtype=dtype))
    for name in ("encoder.conv_in.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.bias", "quant_conv.weight"):
        assert torch.equal(model.state_dict()[name], file[name].float())
        assert torch.equal(comfy[diffusers_to_wan(name)], file[name])


def test_vae_keys_are_a_bijection_over_the_full_key_set(tmp_path):
    diffusers_names = set(AutoencoderKLQwenImage(**TINY_VAE).state_dict())
    wan_names = set(read_file(factory.make_vae(tmp_path)))
    assert len(wan_names) == len(diffusers_names) == 194  # the real VAE's key count
    mapped = [diffusers_to_wan(n) for n in diffusers_names]
    assert len(set(mapped)) == len(mapped)  # one-to-one
    assert set(mapped) == wan_names  # and onto the Wan names
    with pytest.raises(ValueError):
        diffusers_to_wan("encoder.conv1.weight")  # a Wan name is not a diffusers name
    with pytest.raises(ValueError):
        diffusers_to_wan("model.layers.0.mlp.up_proj.weight")


# ------------------------------------------------------------------------------------------------ text encoder
def transformers5_name(legacy: str) -> str:
    """transformers 5 module names of a Comfy / transformers-4.x Qwen2.5-VL tensor name."""
    if legacy.startswith("visual."):
        return "model." + legacy
    if legacy.startswith("model."):
        return "model.language_model." + legacy.removeprefix("model.")
    return legacy  # lm_head.weight


def text_encoder_forward(model: Qwen2_5_VLForConditionalGeneration) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[151644, 8948, 198, 74785, 279, 2168, 151645, 198]])
    patch = TINY_VISION["patch_size"]
    grid = torch.tensor([[1, 4, 4]])  # one frame, 4x4 patches -> 2x2 merged tokens
    torch.manual_seed(0)
    pixels = torch.randn(16, 3 * TINY_VISION["temporal_patch_size"] * patch * patch)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        vision = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
    vision = vision.pooler_output if hasattr(vision, "pooler_output") else vision
    return hidden, torch.cat(list(vision)) if isinstance(vision, (list, tuple)) else vision


def tiny_text_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=TINY_VISION)


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp8_e4m3fn_scaled"])
def test_comfy_text_encoder_loads_strict_in_transformers(tmp_path, dtype):
    raw = read_file(factory.make_text_encoder(tmp_path, dtype=dtype))
    assert raw["model.embed_tokens.weight"].shape == (152064, TINY_TEXT["hidden_size"])
    assert "lm_head.weight" in raw
    state = {}
    for name, tensor in raw.items():
        if name == "scaled_fp8" or name.endswith((".scale_weight", ".scale_input")):
            continue
        scale = raw.get(name.removesuffix(".weight") + ".scale_weight")
        state[transformers5_name(name)] = tensor.float() * scale if scale is not None else tensor.float()
    if dtype == "fp8_e4m3fn_scaled":
        assert raw["scaled_fp8"].dtype == torch.float8_e4m3fn
        assert raw["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
        assert raw["visual.blocks.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
        assert raw["model.embed_tokens.weight"].dtype == torch.bfloat16
        assert raw["lm_head.weight"].dtype == torch.bfloat16
    model = Qwen2_5_VLForConditionalGeneration(tiny_text_config())
    model.load_state_dict(state, strict=True)
    hidden, vision = text_encoder_forward(model.eval())
    assert_order_one(hidden, f"text encoder {dtype}")
    assert_order_one(vision, f"vision tower {dtype}")


def test_hf_text_encoder_folder_loads_with_from_pretrained(tmp_path):
    tokenizer_dir = host_tokenizer_dir()
    folder = factory.make_text_encoder(tmp_path, layout="hf", dtype="bf16", tokenizer_dir=tokenizer_dir)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"]
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True,
                                                                     dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info.get("error_msgs"), info
    file = read_folder(folder)
    loaded = model.state_dict()
    assert {transformers5_name(k) for k in file} == set(loaded)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.bias", "model.norm.weight",
                 "visual.blocks.3.mlp.down_proj.weight", "visual.merger.ln_q.weight", "lm_head.weight"):
        assert torch.equal(loaded[transformers5_name(name)], file[name].float()), name
    hidden, vision = text_encoder_forward(model.eval())
    assert_order_one(hidden, "HF text encoder")
    assert_order_one(vision, "HF vision tower")
    # config.json describes the tiny configuration: the same weights in a model built from TINY_TEXT /
    # TINY_VISION compute the same thing (M-RoPE sections, eps, heads, window... all read back correctly).
    direct = Qwen2_5_VLForConditionalGeneration(tiny_text_config())
    direct.load_state_dict({transformers5_name(k): v.float() for k, v in file.items()}, strict=True)
    direct_hidden, direct_vision = text_encoder_forward(direct.eval())
    assert torch.equal(hidden, direct_hidden) and torch.equal(vision, direct_vision)


# ------------------------------------------------------------------------------------------- general properties
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    makers = [
        lambda d, s: factory.make_dit(d, dtype="fp8_e4m3fn_scaled", prefix=True, variant="edit2511", seed=s),
        lambda d, s: factory.make_dit(d, layout="diffusers", seed=s),
        lambda d, s: factory.make_vae(d, seed=s),
        lambda d, s: factory.make_text_encoder(d, layout="hf", seed=s),
    ]
    for make in makers:
        assert digest(make(tmp_path / "a", 3)) == digest(make(tmp_path / "b", 3))
    for make in makers[:3]:  # the 40 MB text encoder is left out of this one to keep the test fast
        assert digest(make(tmp_path / "a", 3)) != digest(make(tmp_path / "c", 4))


def test_norms_are_not_ones_and_biases_not_zero(tmp_path):
    files = [factory.make_dit(tmp_path), factory.make_vae(tmp_path), factory.make_text_encoder(tmp_path)]
    for path in files:
        tensors = read_file(path)
        norms = [k for k in tensors if k.endswith(("norm_q.weight", "txt_norm.weight", ".gamma", "layernorm.weight",
                                                     "norm1.weight", "ln_q.weight"))]
        biases = [k for k in tensors if k.endswith(".bias")]
        assert norms and biases, path
        for name in norms:
            values = tensors[name].float()
            assert not torch.all(values == 1), name
            assert 0.5 < values.mean() < 1.5, name
        for name in biases:
            assert tensors[name].float().abs().sum() > 0, name


def test_files_are_written_atomically(tmp_path, monkeypatch):
    path = factory.make_dit(tmp_path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(factory, "save_file", crash)
    with pytest.raises(RuntimeError):
        factory.make_dit(tmp_path, seed=1)  # same file name, crashes while writing
    with pytest.raises(RuntimeError):
        factory.make_vae(tmp_path, layout="diffusers")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary or half-built leftovers


@pytest.mark.parametrize("make", [
    lambda d: factory.make_dit(d, dtype="fp8_e4m3fn_scaled", prefix=True, variant="edit2511"),
    lambda d: factory.make_dit(d, layout="diffusers"),
    lambda d: factory.make_vae(d, layout="diffusers", dtype="fp16"),
    lambda d: factory.make_text_encoder(d, dtype="fp8_e4m3fn_scaled"),
    lambda d: factory.make_text_encoder(d, layout="hf"),
])
def test_project_reader_opens_every_layout(tmp_path, make):
    path = make(tmp_path)
    expected = read_folder(path) if path.is_dir() else read_file(path)
    checkpoint = open_checkpoint(path)
    assert set(checkpoint) == set(expected)
    for name, tensor in expected.items():
        got = checkpoint[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_make_all_and_cli_write_the_demo_set(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_models", REPO_ROOT / "tools" / "make_tiny_models.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "cli"), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    paths = factory.make_all(tmp_path / "api", seed=5)
    assert paths == {  # named like the real files, in ComfyUI's model folders
        "diffusion_model": tmp_path / "api" / "diffusion_models" / "qwen_image_bf16.safetensors",
        "edit_diffusion_model": tmp_path / "api" / "diffusion_models" / "qwen_image_edit_2511_bf16.safetensors",
        "vae": tmp_path / "api" / "vae" / "qwen_image_vae.safetensors",
        "text_encoder": tmp_path / "api" / "text_encoders" / "qwen_2.5_vl_7b.safetensors",
        "lora": tmp_path / "api" / "loras" / "qwen_image_tiny_lora_diffusers.safetensors",
        "controlnet": tmp_path / "api" / "controlnet" / "Qwen-Image-InstantX-ControlNet-Union.safetensors",
        "controlnet_inpaint": tmp_path / "api" / "controlnet" / "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors",
        "blockwise_canny": tmp_path / "api" / "model_patches" / "qwen_image_canny_diffsynth_controlnet.safetensors",
        "diffusion_model_2512": tmp_path / "api" / "diffusion_models" / "qwen_image_2512_bf16.safetensors",
        "layered_diffusion_model": tmp_path / "api" / "diffusion_models" / "qwen_image_layered_bf16.safetensors",
        "layered_vae": tmp_path / "api" / "vae" / "qwen_image_layered_vae.safetensors",
        **{f"lightning_lora_{model}": tmp_path / "api" / "loras" / name for model, name in LIGHTNING_LORAS.items()},
        "eligen_lora": tmp_path / "api" / "loras" / "Qwen-Image-EliGen-Poster.safetensors",
        "diffusion_model_2_1": tmp_path / "api" / "diffusion_models" / "qwen_image_2.1_bf16.safetensors",
        "turbo_diffusion_model_2_1": tmp_path / "api" / "diffusion_models" / "qwen_image_2.1_turbo_bf16.safetensors",
        "vae_2_1": tmp_path / "api" / "vae" / "qwen_image_2.1_vae_bf16.safetensors",
        "text_encoder_2_1": tmp_path / "api" / "text_encoders" / "qwen3vl_8b_bf16.safetensors",
        # the same files under the names earlier templates used (workflows saved from them keep running)
        **{f"{role}_earlier_name": tmp_path / "api" / earlier for role, earlier in (
            ("diffusion_model_2_1", "diffusion_models/qwen_image_2_1_bf16.safetensors"),
            ("turbo_diffusion_model_2_1", "diffusion_models/qwen_image_2_1_turbo_bf16.safetensors"),
            ("text_encoder_2_1", "text_encoders/qwen_3_vl_8b.safetensors"))},
    }
    for role in ("diffusion_model_2_1", "turbo_diffusion_model_2_1", "text_encoder_2_1"):
        assert paths[f"{role}_earlier_name"].read_bytes() == paths[role].read_bytes()
    for role, path in paths.items():
        written = tmp_path / "cli" / path.relative_to(tmp_path / "api")
        assert written.read_bytes() == path.read_bytes() and str(written) in printed and role in printed
