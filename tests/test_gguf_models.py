"""GGUF checkpoints through the model loaders: the DiT (city96 layout) and the Qwen2.5-VL text GGUF + mmproj."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from models import WeightFileError, load_diffusion_model, load_text_encoder
from models.io.gguf import GGUFError, QuantizedTensor, find_mmproj, load_gguf_state_dict, open_text_encoder_gguf
from models.io.gguf.reader import GGMLType
from tiny_models.configs import TINY_DIT
from tiny_models.factory import make_dit, make_text_encoder
from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf, make_text_encoder_gguf
from test_dit_loading import run_reference, sample_inputs
from test_tokenizer import host_tokenizer_dir


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def gguf_py_weights(path: Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized by gguf-py (the independent oracle)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors if t.name not in skip}


def dit_inputs(config: dict):
    x, t, ctx, ref = sample_inputs()
    ctx = torch.randn(1, 6, config["joint_attention_dim"], generator=torch.Generator().manual_seed(5))
    return x, t, ctx, ref


@pytest.mark.parametrize("qtype,config,bound", [("Q8_0", TINY_DIT, 1e-2), ("Q4_K", K_QUANT_DIT, 1e-1),
                                                ("Q5_1", TINY_DIT, 1e-1)])
def test_dit_gguf_matches_reference_and_unquantized(tmp_path: Path, qtype: str, config: dict, bound: float):
    path = make_dit_gguf(tmp_path, qtype=qtype, seed=1, config=config)
    model = load_diffusion_model(path, dtype=torch.float32)
    packed = [n for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)]
    assert "transformer_blocks.0.img_mod.1.weight" in packed
    x, t, ctx, ref = dit_inputs(config)
    with torch.no_grad():
        ours = model(x, t, ctx, ref_latents=[ref])

    # the same file dequantized by gguf-py, in diffusers' model: the loader adds no error of its own
    reference = QwenImageTransformer2DModel(**config).eval()
    reference.load_state_dict(gguf_py_weights(path), strict=True)
    torch.testing.assert_close(ours, run_reference(reference, x, t, ctx, ref), atol=1e-4, rtol=1e-4)

    # quantization error against the unquantized fp32 model of the same seed
    unquantized = load_diffusion_model(make_dit(tmp_path, dtype="fp32", seed=1, config=config))
    with torch.no_grad():
        exact = unquantized(x, t, ctx, ref_latents=[ref])
    error = rel_l2(ours, exact)
    print(f"{qtype}: relative L2 vs unquantized = {error:.2e}")
    assert error < bound


def test_dit_k_quant_file_holds_k_blocks_and_gguf_py_agrees(tmp_path: Path):
    path = make_dit_gguf(tmp_path, qtype="Q4_K", seed=2, config=K_QUANT_DIT)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["transformer_blocks.0.attn.to_q.weight"] == "Q4_K"
    assert types["img_in.weight"] == "Q5_0"  # 64-wide rows: the legacy fallback
    assert types["transformer_blocks.0.attn.norm_q.weight"] == "F32"
    mine = load_gguf_state_dict(path)
    theirs = gguf_py_weights(path)
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name


def test_dit_gguf_same_seed_same_bytes(tmp_path: Path):
    a = make_dit_gguf(tmp_path / "a", qtype="Q5_1", seed=4)
    b = make_dit_gguf(tmp_path / "b", qtype="Q5_1", seed=4)
    assert a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def te_files(tmp_path_factory) -> dict[str, Path]:
    """Text-encoder files shared by the tests below (the 152064-row tables make them slow to write)."""
    root = tmp_path_factory.mktemp("te")
    q8, q8_mmproj = make_text_encoder_gguf(root / "q8", qtype="Q8_0", seed=3)
    f32, _ = make_text_encoder_gguf(root / "f32", qtype="F32", mmproj_type="F32", seed=3,
                                    tokenizer_dir=host_tokenizer_dir())
    reference = make_text_encoder(root / "st", layout="comfy", dtype="fp32", seed=3)
    return {"q8": q8, "q8_mmproj": q8_mmproj, "f32": f32, "reference": reference}


def test_wrong_gguf_for_loader(tmp_path: Path, te_files):
    with pytest.raises(GGUFError, match="text encoder"):
        load_diffusion_model(te_files["q8"])
    dit = make_dit_gguf(tmp_path, qtype="Q8_0")
    with pytest.raises(GGUFError, match="diffusion model"):
        load_text_encoder(dit)


def _image() -> torch.Tensor:
    return torch.rand(56, 84, 3, generator=torch.Generator().manual_seed(0))


def test_text_encoder_gguf_matches_safetensors(te_files):
    ours = load_text_encoder(te_files["f32"])  # tokenizer from the GGUF metadata
    reference = load_text_encoder(te_files["reference"], tokenizer=host_tokenizer_dir())
    prompt = "A red fox in the snow <|im_end|> and 一只橘猫"
    assert ours.tokenizer.encode(prompt) == reference.tokenizer.encode(prompt)
    for template, images in [("t2i", None), ("edit", [_image()])]:
        a, mask_a = ours.encode(prompt, images, template=template)
        b, mask_b = reference.encode(prompt, images, template=template)
        assert torch.equal(mask_a, mask_b)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_quantized_text_encoder_gguf_is_close_and_stays_packed(te_files):
    ours = load_text_encoder(te_files["q8"], tokenizer=host_tokenizer_dir())
    reference = load_text_encoder(te_files["reference"], tokenizer=host_tokenizer_dir())
    assert isinstance(ours.model.model.embed_tokens.weight, QuantizedTensor)
    assert isinstance(ours.model.model.layers[0].mlp.down_proj.weight, QuantizedTensor)
    a, _ = ours.encode("a cat", [_image()], template="edit")
    b, _ = reference.encode("a cat", [_image()], template="edit")
    assert rel_l2(a, b) < 2e-2


def test_text_gguf_tensors_match_gguf_py_under_our_names(te_files):
    checkpoint, _ = open_text_encoder_gguf(te_files["q8"])
    t = gguf_py_weights(te_files["q8"], skip=("output.weight",))
    v = gguf_py_weights(te_files["q8_mmproj"])
    expected = {
        "model.layers.1.mlp.down_proj.weight": t["blk.1.ffn_down.weight"],
        "model.layers.0.self_attn.k_proj.bias": t["blk.0.attn_k.bias"],
        "model.embed_tokens.weight": t["token_embd.weight"],
        "model.norm.weight": t["output_norm.weight"],
        "visual.blocks.2.attn.qkv.weight": torch.cat([v[f"v.blk.2.attn_{p}.weight"] for p in "qkv"]),
        "visual.blocks.2.attn.qkv.bias": torch.cat([v[f"v.blk.2.attn_{p}.bias"] for p in "qkv"]),
        "visual.patch_embed.proj.weight": torch.stack([v["v.patch_embd.weight"], v["v.patch_embd.weight.1"]], 2),
        "visual.merger.mlp.2.weight": v["mm.2.weight"],
        "visual.merger.ln_q.weight": v["v.post_ln.weight"],
    }
    for name, value in expected.items():
        got = checkpoint[name]
        got = got.dequantize() if isinstance(got, QuantizedTensor) else got.float()
        assert checkpoint.shape(name) == tuple(value.shape), name
        assert torch.equal(got, value), name
    assert not any(name.startswith(("lm_head", "output.")) for name in checkpoint)


def _copy_pair(te_files, folder: Path, mmproj_name: str | None) -> Path:
    folder.mkdir()
    text = Path(shutil.copyfile(te_files["q8"], folder / te_files["q8"].name))
    if mmproj_name:
        shutil.copyfile(te_files["q8_mmproj"], folder / mmproj_name)
    return text


def test_without_mmproj_prompts_encode_and_images_name_folder_and_files(tmp_path: Path, te_files):
    # Text-to-image never needs the vision tower: the language model alone gives the same prompt embeddings.
    text = _copy_pair(te_files, tmp_path / "alone", None)
    alone = load_text_encoder(text, tokenizer=host_tokenizer_dir())
    paired = load_text_encoder(_copy_pair(te_files, tmp_path / "pair", "mmproj-F16.gguf"), tokenizer=host_tokenizer_dir())
    assert not alone.has_vision and paired.has_vision
    assert torch.equal(alone.encode("a red kite")[0], paired.encode("a red kite")[0])
    with pytest.raises(WeightFileError) as info:
        alone.encode("make it blue", images=[torch.rand(56, 56, 3)], template="edit")
    message = str(info.value)
    assert str(text) in message and str(tmp_path / "alone") in message and "mmproj-F16.gguf" in message
    assert "Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf" in message and "encodes prompts but not images" in message
    with pytest.raises(GGUFError, match="none was found"):
        open_text_encoder_gguf(text, require_mmproj=True)


@pytest.mark.parametrize("name", ["mmproj-F16.gguf", "Qwen2.5-VL-7B-Instruct-mmproj-BF16.gguf",
                                  "MMPROJ-qwen2.5-vl-7b-f16.GGUF", "qwen2.5-vl-7b-instruct.mmproj-q8_0.gguf"])
def test_mmproj_found_by_community_names(tmp_path: Path, te_files, name: str):
    text = _copy_pair(te_files, tmp_path / "pair", name)
    assert find_mmproj(text) == tmp_path / "pair" / name
    checkpoint, _ = open_text_encoder_gguf(text)
    assert checkpoint.shape("visual.patch_embed.proj.weight") == (32, 3, 2, 14, 14)


def test_mmproj_prefers_the_matching_name(tmp_path: Path, te_files):
    text = _copy_pair(te_files, tmp_path / "two", te_files["q8_mmproj"].name)
    shutil.copyfile(te_files["q8_mmproj"], tmp_path / "two" / "mmproj-other-model-F16.gguf")
    assert find_mmproj(text).name == te_files["q8_mmproj"].name


def test_mmproj_prefers_the_projector_of_the_right_width(tmp_path: Path, te_files):
    text = _copy_pair(te_files, tmp_path / "widths", "mmproj-a-qwen2.5-vl.gguf")
    # a projector for another model (output width 128, not 64), with a name that shares a longer prefix
    from models.io.gguf.writer import GGUFWriter

    other = GGUFWriter(tmp_path / "widths" / (te_files["q8"].name[:12] + "-mmproj-other.gguf"), "clip")
    other.add("clip.vision.projection_dim", 128)
    other.write()
    assert find_mmproj(text, hidden_size=64).name == "mmproj-a-qwen2.5-vl.gguf"


def test_packed_rows_concatenate_for_fused_qkv(tmp_path: Path):
    # a quantized mmproj: q/k/v rows of one type are joined as bytes and stay packed
    text, mmproj = make_text_encoder_gguf(tmp_path, qtype="Q8_0", mmproj_type="Q8_0")
    checkpoint, _ = open_text_encoder_gguf(text)
    qkv = checkpoint["visual.blocks.0.attn.qkv.weight"]
    assert isinstance(qkv, QuantizedTensor) and qkv.qtype == GGMLType.Q8_0
    v = gguf_py_weights(mmproj)
    assert torch.equal(qkv.dequantize(), torch.cat([v[f"v.blk.0.attn_{p}.weight"] for p in "qkv"]))


# -- the quantization tool ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,config,bound", [("Q8_0", TINY_DIT, 1e-2), ("Q4_K_M", K_QUANT_DIT, 1e-1)])
def test_quantize_tool_round_trip(tmp_path: Path, preset: str, config: dict, bound: float):
    from tools.quantize_gguf import quantize_dit

    source = make_dit(tmp_path, dtype="bf16", prefix=True, seed=6, config=config)
    lines: list[str] = []
    path = quantize_dit(source, tmp_path / "out" / f"q-{preset}.gguf", preset, log=lines.append)
    assert path.is_file() and any("img_in.weight" in line for line in lines)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["img_in.weight"] == "BF16" and types["proj_out.weight"] == "BF16"
    assert types["txt_norm.weight"] == "F32"
    if preset == "Q4_K_M":
        assert types["transformer_blocks.0.attn.to_q.weight"] == "Q5_K"  # first block: one level higher
        assert types["transformer_blocks.1.attn.to_v.weight"] == "Q5_K"
    x, t, ctx, ref = dit_inputs(config)
    with torch.no_grad():
        ours = load_diffusion_model(path)(x, t, ctx, ref_latents=[ref])
        exact = load_diffusion_model(source)(x, t, ctx, ref_latents=[ref])
    error = rel_l2(ours, exact)
    print(f"tool {preset}: relative L2 vs bf16 source = {error:.2e}")
    assert error < bound


def test_quantize_tool_keeps_the_edit_2511_flag(tmp_path: Path):
    from tools.quantize_gguf import quantize_dit

    source = make_dit(tmp_path, dtype="bf16", variant="edit2511", seed=7)
    path = quantize_dit(source, tmp_path / "edit.gguf", "Q8_0", log=lambda line: None)
    assert load_diffusion_model(path).config.zero_cond_t
