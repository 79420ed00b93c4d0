"""Loading the Qwen-Image DiT from every published layout (tiny files from tiny_models.factory)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

from models import WeightFileError, load_diffusion_model
from models.qwen_image.latent import QWEN_IMAGE_LATENT
from tiny_models.configs import TINY_DIT
from tiny_models.factory import DIT_PREFIX, make_dit
from models.io.weights import FLOAT8_DTYPES

MARKERS = ("__index_timestep_zero__", "scaled_fp8")


def dequantized_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights a file stands for (prefix removed, markers dropped, scaled fp8 multiplied out),
    read with safetensors itself - an independent reader."""
    if (path / "transformer").is_dir():
        path = path / "transformer"
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(load_file(str(f)))
    raw = {k.removeprefix(DIT_PREFIX): v for k, v in raw.items() if k.removeprefix(DIT_PREFIX) not in MARKERS}
    out = {}
    for name, tensor in raw.items():
        if name.endswith((".scale_weight", ".scale_input")):
            continue
        value = tensor.to(torch.float32)
        scale = raw.get(name.removesuffix(".weight") + ".scale_weight") if name.endswith(".weight") else None
        out[name] = value * scale.to(torch.float32) if scale is not None else value
    return out


def reference_from(path: Path, zero_cond_t: bool = False, **config) -> QwenImageTransformer2DModel:
    model = QwenImageTransformer2DModel(**{**TINY_DIT, **config}, zero_cond_t=zero_cond_t).eval()
    model.load_state_dict(dequantized_state_dict(path), strict=True)
    return model


def sample_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 10, generator=g)
    ctx = torch.randn(1, 6, TINY_DIT["joint_attention_dim"], generator=g)
    ref = torch.randn(1, 16, 6, 6, generator=g)
    return x, torch.tensor([0.6]), ctx, ref


def run_reference(model, x, t, ctx, ref):
    shapes = [[(1, x.shape[2] // 2, x.shape[3] // 2), (1, ref.shape[2] // 2, ref.shape[3] // 2)]]
    with torch.no_grad():
        out = model(hidden_states=torch.cat([QWEN_IMAGE_LATENT.pack(x), QWEN_IMAGE_LATENT.pack(ref)], 1), encoder_hidden_states=ctx,
                    timestep=t, img_shapes=shapes, return_dict=False)[0]
    n = (x.shape[2] // 2) * (x.shape[3] // 2)
    return QWEN_IMAGE_LATENT.unpack(out[:, :n], x.shape[2], x.shape[3])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    made = {
        "fp32": make_dit(root, dtype="fp32"),
        "bf16_prefixed": make_dit(root, dtype="bf16", prefix=True),
        "bf16": make_dit(root, dtype="bf16"),
        "fp16": make_dit(root, dtype="fp16"),
        "fp8_e4m3fn": make_dit(root, dtype="fp8_e4m3fn", prefix=True),
        "fp8_e5m2": make_dit(root, dtype="fp8_e5m2"),
        "fp8_scaled": make_dit(root, dtype="fp8_e4m3fn_scaled", prefix=True),
        "diffusers": make_dit(root, layout="diffusers", dtype="bf16"),
        "edit2511": make_dit(root, dtype="bf16", prefix=True, variant="edit2511"),
        "edit2511_diffusers": make_dit(root, layout="diffusers", dtype="fp32", variant="edit2511"),
    }
    made["pipeline"] = made["diffusers"].parent  # a full pipeline folder holding transformer/
    return made


@pytest.fixture(scope="module")
def fp32_output(files):
    model = load_diffusion_model(files["fp32"])
    return model(*sample_inputs()[:3], ref_latents=[sample_inputs()[3]])


LAYOUTS = ["fp32", "bf16_prefixed", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "diffusers",
           "pipeline", "edit2511", "edit2511_diffusers"]
# relative L2 distance to the fp32 file's output that the file's weight precision allows
PRECISION_TOLERANCE = {"fp32": 1e-6, "bf16": 3e-2, "fp16": 3e-2, "fp8_e4m3fn": 0.15, "fp8_e5m2": 0.3,
                       "fp8_scaled": 0.15}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_and_matches_its_weights(files, layout, fp32_output):
    path = files[layout]
    zero_cond = layout.startswith("edit2511")
    model = load_diffusion_model(path, dtype=torch.float32)
    assert model.config.zero_cond_t == zero_cond
    assert (model.config.depth, model.config.width, model.config.axes_dim) == (2, 64, (4, 14, 14))
    x, t, ctx, ref = sample_inputs()
    ours = model(x, t, ctx, ref_latents=[ref])
    expected = run_reference(reference_from(path, zero_cond_t=zero_cond), x, t, ctx, ref)
    assert expected.abs().max() > 0.5
    assert (ours - expected).abs().max().item() <= 1e-5
    if not zero_cond:
        kind = "bf16" if layout in ("bf16_prefixed", "diffusers", "pipeline") else layout
        rel = ((ours - fp32_output).norm() / fp32_output.norm()).item()
        assert rel < PRECISION_TOLERANCE[kind], rel


@pytest.mark.parametrize("layout", ["fp8_e4m3fn", "fp8_e5m2", "fp8_scaled"])
def test_fp8_weights_stay_fp8_in_memory(files, layout):
    model = load_diffusion_model(files[layout], dtype=torch.bfloat16)
    linear_weights = {n: p for n, p in model.named_parameters() if n.startswith("transformer_blocks")
                      and n.endswith(".weight") and p.ndim == 2}
    assert len(linear_weights) == 2 * 14  # 14 Linear layers per block
    for name, weight in linear_weights.items():
        assert weight.dtype in FLOAT8_DTYPES and weight.element_size() == 1, name
    q = model.transformer_blocks[0].attn.to_q
    assert hasattr(q, "scale_weight") == (layout == "fp8_scaled")
    assert model.txt_norm.weight.dtype == torch.bfloat16
    x, t, ctx, ref = sample_inputs()
    out = model(x, t, ctx, ref_latents=[ref])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 compute on fp8 weights vs fp32 compute on the same (dequantized) weights
    expected = run_reference(reference_from(files[layout]), x, t, ctx, ref)
    rel = ((out - expected).norm() / expected.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0).item()
    assert rel < 3e-2 and cos > 0.999, (rel, cos)


def test_bf16_file_keeps_bf16_and_prefix_is_optional(files):
    a = load_diffusion_model(files["bf16"], dtype=torch.bfloat16)
    b = load_diffusion_model(files["bf16_prefixed"], dtype=torch.bfloat16)
    assert a.img_in.weight.dtype == torch.bfloat16
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_public_import_and_device_argument(files):
    import models

    assert models.load_diffusion_model is load_diffusion_model
    model = load_diffusion_model(files["bf16"], dtype=torch.float32, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_logs_detected_variant(files, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_image"):
        load_diffusion_model(files["fp8_scaled"], dtype=torch.bfloat16)
        load_diffusion_model(files["edit2511"])
    text = caplog.text
    assert "Qwen-Image DiT: 2 blocks, width 64, float8_e4m3fn scaled" in text
    assert "Edit-2511 zero_cond_t" in text


def test_depth_and_width_detected_from_shapes(tmp_path):
    config = {**TINY_DIT, "num_layers": 3, "num_attention_heads": 3, "attention_head_dim": 16,
              "axes_dims_rope": (2, 7, 7)}
    model = load_diffusion_model(make_dit(tmp_path, dtype="fp32", config=config))
    assert (model.config.depth, model.config.heads, model.config.head_dim, model.config.axes_dim) == \
        (3, 3, 16, (2, 7, 7))


# --- wrong files --------------------------------------------------------------------------------------------------
def _fake(tmp_path: Path, name: str, keys: list[str]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: torch.zeros(4, 4) for k in keys}, str(path))
    return path


WRONG = {
    "flux": (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"], "Flux"),
    "sd3": ([DIT_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight", DIT_PREFIX + "x_embedder.proj.weight"],
            "Stable Diffusion 3"),
    "vae": (["encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight"], "VAE"),
    "text_encoder": (["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"], "text encoder"),
    "controlnet": (["controlnet_blocks.0.weight", "controlnet_x_embedder.weight"], "ControlNet"),
    "unknown": (["foo.weight"], "not a Qwen-Image diffusion model"),
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_wrong_model_files_are_named(tmp_path, kind):
    keys, what = WRONG[kind]
    with pytest.raises(WeightFileError, match=what) as info:
        load_diffusion_model(_fake(tmp_path, kind, keys))
    assert "img_in.weight" in str(info.value)  # says what was expected


def test_truncated_file(files, tmp_path):
    data = files["bf16"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightFileError, match="truncated"):
        load_diffusion_model(cut)


def test_incomplete_qwen_file(files, tmp_path):
    tensors = load_file(str(files["bf16"]))
    del tensors["transformer_blocks.1.attn.to_k.bias"]
    path = tmp_path / "incomplete.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightFileError, match="missing"):
        load_diffusion_model(path)


def test_diffusers_folder_config_flag(files):
    config = json.loads((files["edit2511_diffusers"] / "config.json").read_text())
    assert config["zero_cond_t"] is True
    assert load_diffusion_model(files["edit2511_diffusers"]).config.zero_cond_t


def test_broken_gguf_is_a_weight_file_error(tmp_path):
    """.gguf paths go to the GGUF reader (models.qwen_image.dit_loader._open_gguf); a broken file is a WeightFileError."""
    path = tmp_path / "qwen-image-Q4_K_M.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(WeightFileError, match="GGUF"):
        load_diffusion_model(path)
