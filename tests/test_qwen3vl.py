"""models.encoders.qwen3vl + models.qwen_image_2_1 (text encoder, templates): parity with transformers'
Qwen3VLForConditionalGeneration and with ``QwenImage21Pipeline.encode_prompt`` on identical tiny weights; the
image preprocessing vs the HF processor with Qwen3-VL's settings; loading of both file layouts; refusals."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from models import WeightFileError, load_text_encoder
from models.common.attention import ATTENTION_KERNEL
from models.common.ops import CastOps
from models.encoders.qwen3vl.encoder import (MAX_PIXELS, MIN_PIXELS, build_encoder, canonical_name,
                                             detect_configs)
from models.encoders.vision_preprocess import preprocess_image, smart_resize
from models.io.gguf.reader import GGMLType
from models.io.gguf.writer import GGUFWriter
from models.io.weights import open_checkpoint
from models.qwen_image_2_1.templates import QWEN_IMAGE_2_1_TEMPLATES as TEMPLATES
from models.qwen_image_2_1.text_encoder import load_text_encoder_2_1
from references import comfy_tensors, host_tokenizer_dir
from tiny_models.factory import make_dit, make_text_encoder
from tiny_models.qwen3vl import TINY_QWEN3VL_TEXT, TINY_QWEN3VL_VISION, make_qwen3vl, transformers_name

ATOL = 1e-5
PROMPT = "A red fox reading a newspaper, the headline says “背景” 🦊"
# Qwen3-VL's chat_template reduced to what the pipeline renders with it (a system message, no tools): each turn
# as "<|im_start|>{role}\n{text}<|im_end|>\n".  The pipeline tokenizes the system turn to count the dropped prefix.
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
                 "{%- if message.content is string %}{{- message.content }}{%- else %}"
                 "{%- for part in message.content %}{%- if 'text' in part %}{{- part.text }}{%- endif %}{%- endfor %}"
                 "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}")
# Sizes in pixels: multiples of 32 (one token per 32 x 32) inside the processor's pixel range, as the 2.1 pipeline
# hands them over; 300 x 250 needs the processor's resize.
WIDE, TALL, ODD = (256, 320), (288, 256), (300, 250)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints, the transformers reference and the diffusers pipeline on the same weights
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir():
    return host_tokenizer_dir()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("qwen3vl")
    return {"fp32": make_qwen3vl(root, dtype="fp32", seed=5), "bf16": make_qwen3vl(root, dtype="bf16", seed=5),
            "fp8": make_qwen3vl(root, dtype="fp8_e4m3fn_scaled", seed=5),
            "hf": make_qwen3vl(root, layout="hf", dtype="fp32", seed=5, tokenizer_dir=tokenizer_dir), "root": root}


def reference_model(path, text: dict = TINY_QWEN3VL_TEXT, vision: dict = TINY_QWEN3VL_VISION):
    """transformers' Qwen3-VL in fp32 with a Comfy-style file's weights (fp8 dequantized), loaded strictly."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision))
    model.load_state_dict({transformers_name(n): t for n, t in comfy_tensors(path).items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference(files):
    return reference_model(files["fp32"])


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    return Qwen3VLProcessor(image_processor=images, tokenizer=Qwen2Tokenizer.from_pretrained(str(tokenizer_dir)),
                            video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def pipeline(reference, processor):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=reference,
                               processor=processor, transformer=None)


@pytest.fixture(scope="module")
def encoder(files, tokenizer_dir):
    return load_text_encoder_2_1(files["fp32"], tokenizer=tokenizer_dir)


def _images(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _floats(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(a).float() / 255.0 for a in arrays]


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _reference_hidden(model, processor, arrays, prompt=PROMPT, final_norm=False, flat=False) -> torch.Tensor:
    """transformers on the 2.1 template: the last decoder layer's output (before the final norm unless
    ``final_norm``; with 1-D positions for image tokens too if ``flat``), the whole sequence."""
    text = TEMPLATES["default"].format(prompt, len(arrays))
    inputs = processor(text=[text], images=[Image.fromarray(a) for a in arrays] or None, return_tensors="pt")
    if flat:
        inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand(3, 1, -1)
    norm = model.model.language_model.norm
    handle = None if final_norm else norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        if handle is not None:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers (hidden states, vision tower, DeepStack, 3D positions)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[], [WIDE], [WIDE, TALL]], ids=["text", "one_image", "two_images"])
def test_hidden_states_match_transformers(sizes, encoder, reference, processor):
    arrays = _images(sizes, seed=len(sizes))
    cond = encoder.encode(PROMPT, _floats(arrays))
    expected = _reference_hidden(reference, processor, arrays)
    drop = TEMPLATES["default"].drop_count(encoder.tokenizer.encode)
    assert _max_error(cond.embeds, expected[:, drop:]) <= ATOL
    tokens = sum((h // 32) * (w // 32) for h, w in sizes)
    assert int(cond.image_mask.sum()) == tokens and cond.image_grids == tuple((h // 32, w // 32) for h, w in sizes)
    assert cond.embeds.dtype == torch.float32 and cond.embeds.shape[-1] == TINY_QWEN3VL_TEXT["hidden_size"]
    if arrays:  # what the comparison is sensitive to: the 3D positions, and the condition taken before the norm
        assert _max_error(cond.embeds, _reference_hidden(reference, processor, arrays, flat=True)[:, drop:]) > 1e-3
    assert _max_error(cond.embeds, _reference_hidden(reference, processor, arrays, final_norm=True)[:, drop:]) > 1e-2


def test_vision_tower_and_deepstack_match_transformers(encoder, reference, processor):
    arrays = _images([TALL, WIDE], seed=7)
    inputs = processor.image_processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
    with torch.no_grad():
        expected = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    for index, image in enumerate(_floats(arrays)):
        patches, grid = preprocess_image(image, patch_size=16, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                         mean=(0.5,) * 3, std=(0.5,) * 3)
        tokens, deepstack = encoder.model.visual(patches, grid)
        assert _max_error(tokens, expected.pooler_output[index]) <= ATOL
        assert len(deepstack) == len(TINY_QWEN3VL_VISION["deepstack_visual_indexes"])
        for ours, theirs in zip(deepstack, expected.deepstack_features):
            assert _max_error(ours, theirs[index]) <= ATOL


def test_deepstack_changes_the_condition(files, encoder, processor):
    """The DeepStack features matter: the reference without them (mergers zeroed) is far from our output."""
    model = reference_model(files["fp32"])
    for merger in model.model.visual.deepstack_merger_list:
        torch.nn.init.zeros_(merger.linear_fc2.weight)
        torch.nn.init.zeros_(merger.linear_fc2.bias)
    arrays = _images([WIDE], seed=8)
    cond = encoder.encode(PROMPT, _floats(arrays))
    drop = TEMPLATES["default"].drop_count(encoder.tokenizer.encode)
    assert _max_error(cond.embeds, _reference_hidden(model, processor, arrays)[:, drop:]) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Parity with QwenImage21Pipeline's prompt encoding (template, dropped prefix, image-pad mask, RGBA)
# ---------------------------------------------------------------------------------------------------------------
def _pipeline_encode(pipeline, prompt, images):
    with torch.no_grad():
        return pipeline.encode_prompt(prompt, image=images, device="cpu")


@pytest.mark.parametrize("prompt", [PROMPT, ""], ids=["prompt", "empty"])
def test_t2i_prompt_embeds(prompt, pipeline, encoder):
    expected, mask, image_mask = _pipeline_encode(pipeline, prompt, None)
    cond = encoder.encode(prompt)
    assert _max_error(cond.embeds, expected) <= ATOL
    assert mask is None and bool(cond.mask.all()) and cond.mask.dtype == torch.long  # nothing padded
    assert torch.equal(cond.image_mask, image_mask) and not cond.image_mask.any()


def test_two_image_prompt_embeds(pipeline, encoder):
    arrays = _images([TALL, WIDE], seed=9)
    expected, _, image_mask = _pipeline_encode(pipeline, PROMPT, [Image.fromarray(a) for a in arrays])
    cond = encoder.encode(PROMPT, _floats(arrays))
    assert _max_error(cond.embeds, expected) <= ATOL
    assert torch.equal(cond.image_mask, image_mask)
    text = encoder.tokenizer.decode(encoder.tokenizer.encode(TEMPLATES["default"].format(PROMPT, 2)))
    assert "<image1><|vision_start|><|image_pad|><|vision_end|> <image2><|vision_start|>" in text


def test_rgba_images_are_composited_over_white(pipeline, encoder):
    rng = np.random.default_rng(10)
    rgba = np.concatenate([_images([WIDE], seed=10)[0], rng.choice([0, 255], (*WIDE, 1)).astype(np.uint8)], -1)
    expected, _, _ = _pipeline_encode(pipeline, PROMPT, [Image.fromarray(rgba, "RGBA")])
    cond = encoder.encode(PROMPT, torch.from_numpy(rgba).float()[None] / 255.0)  # a [1, H, W, 4] batch
    assert _max_error(cond.embeds, expected) <= ATOL


def test_dropped_prefix_is_the_system_turn(pipeline, encoder):
    spec = TEMPLATES["default"]
    drop = spec.drop_count(encoder.tokenizer.encode)
    assert drop == pipeline._drop_idx == 14
    ids = encoder.tokenizer.encode(spec.format("xyz", 0))
    system = "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
    assert encoder.tokenizer.decode(ids[:drop]) == system
    assert encoder.tokenizer.decode(ids[drop:]) == "<|im_start|>user\nxyz<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_errors(encoder):
    with pytest.raises(ValueError, match="placeholder"):
        encoder.encode("look <|image_pad|> here")
    with pytest.raises(ValueError, match="unknown template"):
        encoder.encode("x", template="t2i")
    with pytest.raises(ValueError, match=r"\[H, W, 3\] or \[H, W, 4\]"):
        encoder.encode("x", [torch.rand(256, 256)])


# ---------------------------------------------------------------------------------------------------------------
# Precision, attention seam, ops
# ---------------------------------------------------------------------------------------------------------------
def test_bf16_close_to_fp32(files, tokenizer_dir, encoder):
    low = load_text_encoder_2_1(files["fp32"], tokenizer=tokenizer_dir, dtype=torch.bfloat16)
    assert low.model.model.layers[0].self_attn.q_norm.weight.dtype == torch.bfloat16
    images = _floats(_images([WIDE, TALL], seed=11))
    for imgs in (None, images):
        exact, approx = encoder.encode(PROMPT, imgs).embeds, low.encode(PROMPT, imgs).embeds
        assert approx.dtype == torch.bfloat16
        relative = ((approx.float() - exact).norm() / exact.norm()).item()
        cosine = F.cosine_similarity(approx.float().flatten(), exact.flatten(), dim=0).item()
        assert relative < 3e-2 and cosine > 0.999, (relative, cosine)


class _RecordingKernel:
    def __init__(self):
        self.calls = Counter()

    def __call__(self, q, k, v, *, mask, causal, options):
        assert options[ATTENTION_KERNEL] is self
        self.calls["causal" if causal else "full"] += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def test_every_attention_goes_through_the_options(encoder):
    images = _floats(_images([WIDE, TALL], seed=12))
    kernel = _RecordingKernel()
    seamed = encoder.encode(PROMPT, images, options={ATTENTION_KERNEL: kernel})
    assert torch.equal(seamed.embeds, encoder.encode(PROMPT, images).embeds)
    assert kernel.calls == Counter(full=2 * TINY_QWEN3VL_VISION["depth"], causal=TINY_QWEN3VL_TEXT["num_hidden_layers"])


def test_layers_come_from_the_ops_namespace(files, encoder):
    class Ops(CastOps):
        class Linear(CastOps.Linear):
            pass

        class LayerNorm(CastOps.LayerNorm):
            pass

    checkpoint = open_checkpoint(files["fp32"])
    names = {canonical_name(k): k for k in checkpoint if canonical_name(k)}
    text, vision = detect_configs(names, lambda n: checkpoint.shape(names[n]))
    built = build_encoder(checkpoint, text, vision, encoder.tokenizer, TEMPLATES, ops=Ops)
    kinds = Counter(type(m) for m in built.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    assert set(kinds) == {Ops.Linear, Ops.LayerNorm}
    assert torch.equal(built.encode(PROMPT).embeds, encoder.encode(PROMPT).embeds)


# ---------------------------------------------------------------------------------------------------------------
# Loading: layouts, dtypes, what is never read, shape rules
# ---------------------------------------------------------------------------------------------------------------
def test_hf_folder_with_processor_tokenizer(files, encoder, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    loaded = load_text_encoder_2_1(files["hf"].parent)  # the pipeline folder; tokenizer from its processor/
    assert loaded.tokenizer.source == str(files["hf"].parent / "processor")
    images = _floats(_images([TALL], seed=13))
    assert torch.equal(loaded.encode(PROMPT, images).embeds, encoder.encode(PROMPT, images).embeds)


def test_hf_folder_loads_in_transformers(files):
    from transformers import Qwen3VLForConditionalGeneration

    _, info = Qwen3VLForConditionalGeneration.from_pretrained(str(files["hf"]), output_loading_info=True)
    assert not any(info.values()), info


def test_bf16_and_scaled_fp8_files(files, tokenizer_dir, processor):
    arrays = _images([WIDE], seed=14)
    for kind in ("bf16", "fp8"):
        loaded = load_text_encoder_2_1(files[kind], tokenizer=tokenizer_dir)
        attn = loaded.model.model.layers[1].self_attn
        assert attn.q_proj.weight.dtype == (torch.float8_e4m3fn if kind == "fp8" else torch.float32)
        assert loaded.model.visual.blocks[0].attn.qkv.weight.dtype == attn.q_proj.weight.dtype
        cond = loaded.encode(PROMPT, _floats(arrays))
        expected = _reference_hidden(reference_model(files[kind]), processor, arrays)
        drop = TEMPLATES["default"].drop_count(loaded.tokenizer.encode)
        assert _max_error(cond.embeds, expected[:, drop:]) <= ATOL, kind


class _Guarded(dict):
    """A checkpoint's tensors in memory; reading the LM head or the final norm fails the test."""

    def __getitem__(self, key):
        assert key not in ("lm_head.weight", "model.language_model.norm.weight"), f"{key} was read"
        return super().__getitem__(key)


def test_lm_head_and_final_norm_are_never_read(files, encoder):
    checkpoint = open_checkpoint(files["hf"])
    tensors = _Guarded({name: tensor for shard in sorted(files["hf"].glob("*.safetensors"))
                        for name, tensor in load_file(str(shard)).items()})
    names = {canonical_name(k): k for k in tensors if canonical_name(k)}
    assert len(names) == len(tensors) - 2
    text, vision = detect_configs(names, lambda n: checkpoint.shape(names[n]), checkpoint.config)
    built = build_encoder(tensors, text, vision, encoder.tokenizer, TEMPLATES)
    assert sum(p.numel() for p in built.model.parameters()) == sum(tensors[n].numel() for n in names.values())


def test_detected_config(encoder):
    text, vision = encoder.model.model.config, encoder.model.visual.config
    assert (text.hidden_size, text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim, text.rope_theta) == (
        64, 3, 4, 2, 32, 5e6)
    assert text.sections == tuple(TINY_QWEN3VL_TEXT["rope_parameters"]["mrope_section"])
    assert (vision.depth, vision.num_heads, vision.patch_size, vision.num_position_embeddings) == (5, 2, 16, 64)
    assert vision.deepstack_indexes == tuple(TINY_QWEN3VL_VISION["deepstack_visual_indexes"])


def test_config_json_wins(files, tokenizer_dir, processor):
    """Settings the tensors cannot tell (rope theta and sections, DeepStack blocks) come from config.json."""
    text = {**TINY_QWEN3VL_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                                                     "mrope_section": [8, 4, 4], "mrope_interleaved": True}}
    vision = {**TINY_QWEN3VL_VISION, "deepstack_visual_indexes": [0, 3]}
    folder = make_qwen3vl(files["root"] / "other", layout="hf", dtype="fp32", seed=6, text=text, vision=vision)
    loaded = load_text_encoder_2_1(folder, tokenizer=tokenizer_dir)
    assert loaded.model.visual.config.deepstack_indexes == (0, 3) and loaded.model.model.config.sections == (8, 4, 4)
    reference = reference_model(make_qwen3vl(files["root"] / "other", dtype="fp32", seed=6, text=text,
                                             vision=vision), text, vision)
    arrays = _images([WIDE], seed=15)
    drop = TEMPLATES["default"].drop_count(loaded.tokenizer.encode)
    expected = _reference_hidden(reference, processor, arrays)[:, drop:]
    assert _max_error(loaded.encode(PROMPT, _floats(arrays)).embeds, expected) <= ATOL


def test_full_size_shape_rules():
    """The real Qwen3-VL-8B shapes give its real config without config.json."""
    shapes = {"model.embed_tokens.weight": (151936, 4096), "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
              "model.layers.0.self_attn.k_proj.weight": (1024, 4096), "model.layers.0.self_attn.q_norm.weight": (128,),
              "model.layers.0.mlp.gate_proj.weight": (12288, 4096),
              "visual.patch_embed.proj.weight": (1152, 3, 2, 16, 16), "visual.pos_embed.weight": (2304, 1152),
              "visual.blocks.0.attn.qkv.weight": (3456, 1152), "visual.blocks.0.mlp.linear_fc1.weight": (4304, 1152),
              "visual.merger.linear_fc1.weight": (4608, 4608), "visual.merger.linear_fc2.weight": (4096, 4608),
              "visual.deepstack_merger_list.0.linear_fc1.weight": (4608, 4608)}
    names = (set(shapes) | {f"model.layers.{i}.x" for i in range(36)} | {f"visual.blocks.{i}.x" for i in range(27)}
             | {f"visual.deepstack_merger_list.{i}.x" for i in range(3)})
    text, vision = detect_configs(names, lambda n: shapes[n])
    assert (text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim, text.intermediate_size) == (
        36, 32, 8, 128, 12288)
    assert (text.sections, text.rope_theta) == ((24, 20, 20), 5e6)
    assert (vision.depth, vision.num_heads, vision.deepstack_indexes, vision.spatial_merge_size) == (
        27, 16, (8, 16, 24), 2)


# ---------------------------------------------------------------------------------------------------------------
# Wrong files and tokenizers
# ---------------------------------------------------------------------------------------------------------------
def test_qwen25vl_file_is_refused_naming_both(files, tokenizer_dir):
    path = make_text_encoder(files["root"] / "qwen25", dtype="bf16")
    with pytest.raises(WeightFileError) as info:
        load_text_encoder_2_1(path, tokenizer=tokenizer_dir)
    message = str(info.value)
    assert str(path) in message and "Qwen2.5-VL" in message and "Qwen3-VL" in message and "q_norm" in message


def test_qwen3vl_file_is_refused_by_the_1x_loader(files, tokenizer_dir):
    with pytest.raises(WeightFileError) as info:
        load_text_encoder(files["bf16"], tokenizer=tokenizer_dir, family="qwen_image")  # pinned to 1.x
    message = str(info.value)
    assert str(files["bf16"]) in message and "Qwen3-VL" in message and "Qwen2.5-VL" in message


def test_other_files_are_refused(files, tokenizer_dir):
    dit = make_dit(files["root"] / "dit")
    with pytest.raises(WeightFileError, match="diffusion model"):
        load_text_encoder_2_1(dit, tokenizer=tokenizer_dir)
    for arch, words in (("qwen3vl", "not supported yet"), ("qwen2vl", "Qwen2.5-VL")):
        writer = GGUFWriter(files["root"] / f"{arch}.gguf", arch=arch)
        writer.add_tensor("token_embd.weight", torch.zeros(4, 32), GGMLType.F32, (4, 32))
        with pytest.raises(WeightFileError, match=words):
            load_text_encoder_2_1(writer.write(), tokenizer=tokenizer_dir)


def test_tokenizer_with_other_ids_is_refused(files, tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    added = config["added_tokens_decoder"]
    added["151655"], added["151656"] = added["151656"], added["151655"]  # <|image_pad|> <-> <|video_pad|>
    config_path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(WeightFileError, match=r"<\|image_pad\|> the id 151656.*expects 151655"):
        load_text_encoder_2_1(files["bf16"], tokenizer=tmp_path / "tok")


# ---------------------------------------------------------------------------------------------------------------
# Image preprocessing vs the HF processor with Qwen3-VL's settings
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [WIDE, TALL, ODD, (100, 80), (32 * 5, 32 * 70)])
def test_pixel_values_match_hf(size, processor):
    array = _images([size], seed=16)[0]
    expected = processor.image_processor(images=[Image.fromarray(array)], return_tensors="pt")
    patches, grid = preprocess_image(torch.from_numpy(array).float() / 255.0, patch_size=16, min_pixels=MIN_PIXELS,
                                     max_pixels=MAX_PIXELS, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert list(grid) == expected["image_grid_thw"][0, 1:].tolist()
    assert _max_error(patches, expected["pixel_values"]) <= 1e-6
    assert smart_resize(*size, 32, MIN_PIXELS, MAX_PIXELS) == (grid[0] * 16, grid[1] * 16)
