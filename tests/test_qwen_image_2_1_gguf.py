"""Qwen-Image 2.1 GGUF: our quantizer (tools/quantize_gguf.py) writes the 2.1 preset under the community arch tag
``qwen_image21``; gguf-py (the oracle) reads the file and its tag; the registry identifies it (by the tag, and by
tensor names when a file says ``qwen_image``); both public loaders load it with quantized layers, and the quantized
model equals one built from the file's weights as gguf-py dequantizes them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from models import (GGUFError, QuantizedTensor, QwenImage21DiT, WeightFileError, identify, load_diffusion_model,
                    load_diffusion_model_2_1)
from models.io.gguf.reader import GGMLType
from models.io.gguf.writer import GGUFWriter
from models.qwen_image_2_1.dit_loader import dit_2_1_from_tensors
from tiny_models.qwen_image_2_1 import K_QUANT_DIT_2_1, TINY_DIT_2_1, dit_2_1_spec, make_dit_2_1
from tiny_models.qwen_image_2_1_vae import make_vae_2_1
from tools.quantize_gguf import quantize_dit

ARCH = "qwen_image21"
ATOL = 1e-5  # the quantized model vs the same weights dequantized, fp32
# preset, config (K formats need 256-wide rows), bound on the relative L2 error vs the bf16 source
PRESETS = {"Q8_0": (TINY_DIT_2_1, 1e-2), "Q4_K_M": (K_QUANT_DIT_2_1, 1e-1)}
HIGH_PRECISION = ("img_in.weight", "txt_in.in_layer.weight", "txt_in.out_layer.weight", "modulation.1.weight",
                  "time_text_embed.timestep_embedder.linear_1.weight", "norm_out.linear.weight", "proj_out.weight")


@pytest.fixture(scope="module", params=list(PRESETS))
def quantized(request, tmp_path_factory) -> tuple[str, dict, Path, Path]:
    preset = request.param
    config = PRESETS[preset][0]
    root = tmp_path_factory.mktemp(f"gguf_2_1_{preset}")
    source = make_dit_2_1(root, dtype="bf16", prefix=True, seed=9, config=config)
    lines: list[str] = []
    path = quantize_dit(source, None, preset, log=lines.append)
    assert path == root / f"qwen-image-2.1-{preset}.gguf" and any("modulation.1.weight" in line for line in lines)
    return preset, config, source, path


def gguf_py_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized by gguf-py (the independent oracle), fp32."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors}


def forward(model: QwenImage21DiT, config: dict) -> torch.Tensor:
    """A prompt around one condition image, as the 2.1 pipeline lays them out."""
    g = torch.Generator().manual_seed(3)
    slots = [False] * 3 + [True] * 4 + [False] * 2
    context = torch.randn(1, len(slots), config["context_in_dim"], generator=g)
    ref = torch.randn(1, config["in_channels"], 4, 4, generator=g)
    x = torch.randn(1, config["in_channels"], 4, 6, generator=g)
    return model(x, torch.tensor([0.4]), context, ref_latents=[ref], image_slots=torch.tensor(slots))


def test_gguf_py_reads_the_file_its_arch_tag_and_the_preset(quantized):
    preset, config, _, path = quantized
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == ARCH
    assert reader.get_field(f"{ARCH}.quantization_preset").contents() == preset
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types.keys() == dit_2_1_spec(config).keys()
    assert all(types[name] == "BF16" for name in HIGH_PRECISION), types
    assert types["txt_in.text_norm.weight"] == types["transformer_blocks.1.attn.norm_q.weight"] == "F32"
    middle, first, last = (f"transformer_blocks.{i}." for i in (1, 0, config["num_layers"] - 1))
    if preset == "Q8_0":
        assert {types[n] for n in types if n.startswith("transformer_blocks.") and "norm" not in n} == {"Q8_0"}
    else:  # base Q4_K; first and last block, V projections and FFN-down (img_mlp.out) one level higher
        assert [types[middle + n] for n in ("attn.to_q.weight", "img_mlp.proj.weight", "img_mlp.gate_layer.weight")] \
            == ["Q4_K"] * 3
        assert [types[n] for n in (middle + "attn.to_v.weight", middle + "img_mlp.out.weight",
                                   first + "attn.to_q.weight", last + "img_mlp.proj.weight")] == ["Q5_K"] * 4


def test_the_registry_identifies_it_by_its_tag(quantized):
    identity = identify(quantized[3])
    assert (identity.family, identity.role, identity.layout, identity.supported) == (
        "qwen_image_2_1", "diffusion_model", "gguf", True)


def test_the_quantized_model_equals_its_dequantized_weights(quantized):
    _, config, source, path = quantized
    model = load_diffusion_model(path)  # the public loader, by the registry's identification
    assert isinstance(model, QwenImage21DiT)
    assert isinstance(model.transformer_blocks[1].attn.to_q.weight, QuantizedTensor)
    assert not isinstance(model.modulation[1].weight, QuantizedTensor)
    dense = dit_2_1_from_tensors(gguf_py_weights(path))
    ours = forward(model, config)
    gap = (ours - forward(dense, config)).abs().max().item()
    print(f"2.1 {quantized[0]}: quantized vs dequantized weights, max abs {gap:.1e}")
    assert gap <= ATOL
    assert torch.equal(ours, forward(load_diffusion_model_2_1(path), config))
    exact = forward(load_diffusion_model(source), config)
    error = ((ours - exact).norm() / exact.norm()).item()
    print(f"2.1 {quantized[0]}: relative L2 vs the bf16 source = {error:.2e}")
    assert error < PRESETS[quantized[0]][1]


def test_the_1x_path_refuses_it_naming_both(quantized):
    with pytest.raises(GGUFError, match="this is a Qwen-Image 2.1 DiT, not a Qwen-Image diffusion model"):
        load_diffusion_model(quantized[3], family="qwen_image")


def test_a_2_1_gguf_tagged_qwen_image_is_told_by_its_names(tmp_path):
    path = make_dit_2_1(tmp_path, layout="gguf", dtype="Q8_0")
    assert gguf.GGUFReader(str(path)).get_field("general.architecture").contents() == "qwen_image"
    identity = identify(path)
    assert (identity.family, identity.role, identity.supported) == ("qwen_image_2_1", "diffusion_model", True)
    assert isinstance(load_diffusion_model(path), QwenImage21DiT)


def test_a_2_1_tag_with_unknown_tensor_names_is_named(tmp_path):
    writer = GGUFWriter(tmp_path / "fused.gguf", ARCH)
    writer.add_tensor("transformer_blocks.0.img_mlp.gate_up.weight", torch.zeros(4, 32), GGMLType.F32, (4, 32))
    path = writer.write()
    identity = identify(path)
    assert (identity.family, identity.role, identity.supported) == ("qwen_image_2_1", "diffusion_model", False)
    with pytest.raises(GGUFError, match="a Qwen-Image 2.1 DiT GGUF .* with tensor names this pack does not know"):
        load_diffusion_model(path)


def test_the_quantizer_refuses_what_is_not_a_dit(tmp_path):
    vae = make_vae_2_1(tmp_path, layout="comfy")
    with pytest.raises(WeightFileError, match="this is the Qwen-Image 2.1 VAE .*, not a Qwen-Image or Qwen-Image 2.1"):
        quantize_dit(vae, tmp_path / "vae.gguf", "Q8_0")
