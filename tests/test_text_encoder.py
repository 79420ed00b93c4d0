"""models.encoders.qwen25vl.encoder: parity with transformers' Qwen2_5_VLForConditionalGeneration (3D positions via
mm_token_type_ids) and with the diffusers Qwen-Image pipelines' prompt encoding, on identical tiny weights; loading
of every checkpoint layout; image preprocessing vs the HF image processor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from models import WeightFileError, load_text_encoder
from tiny_models.configs import TINY_DIT, TINY_TEXT, TINY_VAE, TINY_VISION
from tiny_models.factory import make_dit, make_text_encoder, make_vae
from models.encoders.qwen25vl.encoder import build_text_encoder, canonical_name, detect_configs
from models.qwen_image.templates import QWEN_IMAGE_TEMPLATES as TEMPLATES
from models.encoders.vision_preprocess import MAX_PIXELS, MIN_PIXELS, preprocess_image, smart_resize
from models.io.weights import open_checkpoint
from references import host_tokenizer_dir, passing_token_types, reference_text_encoder

ATOL = 1e-5
PROMPT = "Turn the red car blue, keep the 背景 unchanged. 🚗"


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints (the shared factory), the transformers reference on the same weights
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir():
    return host_tokenizer_dir()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("te")
    return {
        "fp32": make_text_encoder(root, layout="comfy", dtype="fp32", seed=3),
        "bf16": make_text_encoder(root, layout="comfy", dtype="bf16", seed=3),
        "fp8": make_text_encoder(root, layout="comfy", dtype="fp8_e4m3fn_scaled", seed=3),
        "hf": make_text_encoder(root, layout="hf", dtype="fp32", seed=3, tokenizer_dir=tokenizer_dir),
        "root": root,
    }


@pytest.fixture(scope="module")
def reference(files):
    return reference_text_encoder(files["fp32"])


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                            tokenizer=Qwen2Tokenizer.from_pretrained(str(tokenizer_dir)),
                            video_processor=Qwen2VLVideoProcessor())


@pytest.fixture(scope="module")
def encoder(files, tokenizer_dir):
    return load_text_encoder(files["fp32"], tokenizer=tokenizer_dir)


def _images(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _floats(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(a).float() / 255.0 for a in arrays]


def _reference_encode(model, processor, prompt, arrays, template, token_types=True) -> torch.Tensor:
    """The template run through the HF processor and model; hidden states after the dropped prefix."""
    spec = TEMPLATES[template]
    inputs = processor(text=[spec.format(prompt, len(arrays))],
                       images=[Image.fromarray(a) for a in arrays] or None, return_tensors="pt")
    assert "mm_token_type_ids" in inputs
    if not token_types:
        inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    return hidden[:, spec.drop:]


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Hidden-state parity with transformers (3D M-RoPE positions)
# ---------------------------------------------------------------------------------------------------------------
def test_text_only_matches_transformers(encoder, reference, processor):
    emb, mask = encoder.encode(PROMPT, template="t2i")
    expected = _reference_encode(reference, processor, PROMPT, [], "t2i")
    assert _max_error(emb, expected) <= ATOL
    assert emb.shape == (1, expected.shape[1], TINY_TEXT["hidden_size"]) and emb.dtype == torch.float32
    assert mask.shape == emb.shape[:2] and mask.dtype == torch.long and bool(mask.all())


def test_one_image_matches_transformers(encoder, reference, processor):
    arrays = _images([(28 * 6, 28 * 10)])  # 3x5 merge windows -> partial attention windows
    emb, _ = encoder.encode(PROMPT, _floats(arrays), template="edit")
    expected = _reference_encode(reference, processor, PROMPT, arrays, "edit")
    assert _max_error(emb, expected) <= ATOL
    # the 3D positions matter: without mm_token_type_ids transformers falls back to 1D positions
    flat = _reference_encode(reference, processor, PROMPT, arrays, "edit", token_types=False)
    assert _max_error(emb, flat) > 1e-3


def test_three_images_matches_transformers(encoder, reference, processor):
    arrays = _images([(28 * 12, 28 * 20), (28 * 18, 28 * 8), (56, 56)], seed=1)  # wide, tall, square
    emb, _ = encoder.encode(PROMPT, _floats(arrays), template="edit_plus")
    expected = _reference_encode(reference, processor, PROMPT, arrays, "edit_plus")
    assert _max_error(emb, expected) <= ATOL
    tokens_per_image = [12 * 20, 18 * 8, 2 * 2]  # one token per 28x28 pixels
    assert emb.shape[1] == len(encoder.tokenizer.encode(TEMPLATES["edit_plus"].format(PROMPT, 3))) - 64 + sum(
        n - 1 for n in tokens_per_image)


def test_dropped_prefix_is_the_system_prompt(encoder):
    for name, spec in TEMPLATES.items():
        ids = encoder.tokenizer.encode(spec.format("xyz", 1))
        prefix = encoder.tokenizer.decode(ids[:spec.drop])
        assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_end|>\n<|im_start|>user\n"), name
        assert encoder.tokenizer.decode(ids[-5:]) == "<|im_end|>\n<|im_start|>assistant\n"


def test_bf16_close_to_fp32(files, tokenizer_dir, encoder):
    low = load_text_encoder(files["fp32"], tokenizer=tokenizer_dir, dtype=torch.bfloat16)
    assert low.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    images = _floats(_images([(28 * 8, 28 * 6), (28 * 4, 28 * 9)], seed=2))
    for template, imgs in (("t2i", None), ("edit_plus", images)):
        exact, _ = encoder.encode(PROMPT, imgs, template=template)
        approx, _ = low.encode(PROMPT, imgs, template=template)
        assert approx.dtype == torch.bfloat16
        approx = approx.float()
        relative = ((approx - exact).norm() / exact.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(approx.flatten(), exact.flatten(), dim=0).item()
        assert relative < 3e-2 and cosine > 0.999, (template, relative, cosine)


def test_template_errors(encoder):
    image = torch.rand(56, 56, 3)
    with pytest.raises(ValueError, match="no images"):
        encoder.encode("x", [image], template="t2i")
    with pytest.raises(ValueError, match="exactly one"):
        encoder.encode("x", [image, image], template="edit")
    with pytest.raises(ValueError, match="unknown template"):
        encoder.encode("x", template="video")
    with pytest.raises(ValueError, match="placeholder"):
        encoder.encode("look <|image_pad|>", [image], template="edit")


# ---------------------------------------------------------------------------------------------------------------
# Several prompts with the same images; progress and interrupts per decoder layer
# ---------------------------------------------------------------------------------------------------------------
def _counting(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _module, _args, _out: calls.append(1))


def test_prompts_sharing_images_run_the_vision_tower_once_per_image(encoder):
    images = _floats(_images([(28 * 6, 28 * 4), (56, 84)], seed=13))
    prompts = [PROMPT, " ", "Picture 2 only."]
    calls = []
    handle = _counting(encoder.model.visual, calls)
    try:
        together = encoder.encode_prompts(prompts, images, template="edit_plus")
        assert len(calls) == len(images)
        separate = [encoder.encode(prompt, images, template="edit_plus") for prompt in prompts]
        assert len(calls) == len(images) * (1 + len(prompts))
    finally:
        handle.remove()
    for (emb, mask), (expected, expected_mask) in zip(together, separate):
        assert torch.equal(emb, expected) and torch.equal(mask, expected_mask)


def test_progress_is_reported_once_per_decoder_layer(encoder):
    updates = []
    images = _floats(_images([(56, 56)], seed=14))
    encoder.encode_prompts([PROMPT, " "], images, template="edit", progress=lambda *update: updates.append(update))
    layers = len(encoder.model.model.layers)
    assert updates == [(done, 2 * layers) for done in range(1, 2 * layers + 1)]


def test_raising_from_the_progress_callback_stops_encoding(encoder):
    class Interrupted(Exception):
        pass

    def interrupt(done: int, total: int) -> None:
        raise Interrupted

    calls = []
    handles = [_counting(layer, calls) for layer in encoder.model.model.layers]
    try:
        with pytest.raises(Interrupted):
            encoder.encode(PROMPT, template="t2i", progress=interrupt)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 1  # the first layer ran; the rest never did


# ---------------------------------------------------------------------------------------------------------------
# Parity with the diffusers pipelines' prompt encoding
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_parts(reference, processor):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKLQwenImage(**TINY_VAE).eval(),
                text_encoder=reference, tokenizer=processor.tokenizer,
                transformer=QwenImageTransformer2DModel(**TINY_DIT).eval())


def test_t2i_pipeline_prompt_embeds(pipeline_parts, encoder):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**pipeline_parts)
    long_prompt = "a very detailed scene with many objects, " * 150  # truncated to 1024 + 34 tokens
    for prompt in (PROMPT, long_prompt):
        with torch.no_grad():
            expected, _ = pipe.encode_prompt(prompt, device="cpu")
        emb, _ = encoder.encode(prompt, template="t2i")
        assert _max_error(emb, expected) <= ATOL
    assert emb.shape[1] == 1024


def test_edit_pipeline_prompt_embeds(pipeline_parts, processor, encoder):
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline(**pipeline_parts, processor=processor)
    arrays = _images([(28 * 10, 28 * 7)], seed=4)
    with torch.no_grad(), passing_token_types(pipe.text_encoder):
        expected, _ = pipe.encode_prompt(PROMPT, image=Image.fromarray(arrays[0]), device="cpu")
    emb, _ = encoder.encode(PROMPT, _floats(arrays), template="edit")
    assert _max_error(emb, expected) <= ATOL


def test_edit_plus_pipeline_prompt_embeds(pipeline_parts, processor, encoder):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(**pipeline_parts, processor=processor)
    # two sizes that need no resize, and 384x352 (multiples of 32, as the pipeline's condition images are): the
    # processor resizes it to 392x364, which the vision preprocessing reproduces
    arrays = _images([(28 * 8, 28 * 12), (28 * 14, 28 * 4), (384, 352)], seed=5)
    with torch.no_grad(), passing_token_types(pipe.text_encoder):
        expected, _ = pipe.encode_prompt(PROMPT, image=[Image.fromarray(a) for a in arrays], device="cpu")
    emb, _ = encoder.encode(PROMPT, _floats(arrays), template="edit_plus")
    assert _max_error(emb, expected) <= ATOL


# ---------------------------------------------------------------------------------------------------------------
# Loading: layouts, dtypes, lm_head, wrong files
# ---------------------------------------------------------------------------------------------------------------
def test_hf_folder_with_its_own_tokenizer(files, encoder, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    loaded = load_text_encoder(files["hf"])  # sharded, legacy names, config.json; tokenizer found beside
    assert loaded.tokenizer.source == str(files["hf"])
    image = _floats(_images([(56, 112)], seed=6))
    assert torch.equal(loaded.encode(PROMPT, image, "edit")[0], encoder.encode(PROMPT, image, "edit")[0])


def test_transformers5_names(files, tokenizer_dir, encoder, tmp_path):
    renamed = {}
    for name, tensor in load_file(str(files["fp32"])).items():
        if name.startswith("lm_head."):
            continue
        renamed[("model.language_model." + name[6:]) if name.startswith("model.") else ("model." + name)] = tensor
    save_file(renamed, str(tmp_path / "model.safetensors"))
    loaded = load_text_encoder(tmp_path, tokenizer=tokenizer_dir)
    image = _floats(_images([(84, 56)], seed=7))
    assert torch.equal(loaded.encode(PROMPT, image, "edit_plus")[0], encoder.encode(PROMPT, image, "edit_plus")[0])


def test_bf16_file(files, tokenizer_dir, processor):
    loaded = load_text_encoder(files["bf16"], tokenizer=tokenizer_dir)  # upcast to fp32 on load
    assert loaded.model.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32
    arrays = _images([(28 * 4, 28 * 6)], seed=8)
    emb, _ = loaded.encode(PROMPT, _floats(arrays), template="edit")
    expected = _reference_encode(reference_text_encoder(files["bf16"]), processor, PROMPT, arrays, "edit")
    assert _max_error(emb, expected) <= ATOL


def test_scaled_fp8_stays_fp8(files, tokenizer_dir, processor):
    loaded = load_text_encoder(files["fp8"], tokenizer=tokenizer_dir)
    attn = loaded.model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.float8_e4m3fn and attn.q_proj.scale_weight.dtype == torch.float32
    assert loaded.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    arrays = _images([(28 * 6, 28 * 4), (56, 84)], seed=9)
    emb, _ = loaded.encode(PROMPT, _floats(arrays), template="edit_plus")
    expected = _reference_encode(reference_text_encoder(files["fp8"]), processor, PROMPT, arrays, "edit_plus")
    assert _max_error(emb, expected) <= ATOL


class _Recording(dict):
    """A checkpoint view that records which tensors were read."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint, self.read = checkpoint, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.checkpoint[key]

    def __iter__(self):
        return iter(self.checkpoint)

    def __len__(self):
        return len(self.checkpoint)

    def shape(self, key):
        return self.checkpoint.shape(key)


def test_lm_head_is_never_read(files, encoder):
    checkpoint = open_checkpoint(files["fp32"])
    assert "lm_head.weight" in checkpoint
    names = {canonical_name(k): k for k in checkpoint if canonical_name(k)}
    text, vision = detect_configs(names, lambda n: checkpoint.shape(names[n]))
    recording = _Recording(checkpoint)
    built = build_text_encoder(recording, text, vision, encoder.tokenizer, TEMPLATES)
    assert "lm_head.weight" not in recording.read and len(recording.read) == len(checkpoint) - 1
    assert not any("lm_head" in name for name, _ in built.model.named_parameters())
    expected = sum(t.numel() for k, t in load_file(str(files["fp32"])).items() if not k.startswith("lm_head"))
    assert sum(p.numel() for p in encoder.model.parameters()) == expected


def test_detected_config(encoder):
    text, vision = encoder.model.model.config, encoder.model.visual.config
    assert (text.hidden_size, text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim) == (
        TINY_TEXT["hidden_size"], TINY_TEXT["num_hidden_layers"], TINY_TEXT["num_attention_heads"],
        TINY_TEXT["num_key_value_heads"], TINY_TEXT["head_dim"])
    assert text.sections == tuple(TINY_TEXT["rope_scaling"]["mrope_section"])
    assert (vision.depth, vision.num_heads, vision.fullatt_block_indexes, vision.window_size) == (
        TINY_VISION["depth"], TINY_VISION["num_heads"], tuple(TINY_VISION["fullatt_block_indexes"]), 112)


def test_full_size_shape_rules():
    """The real Qwen2.5-VL-7B shapes give its real config without config.json."""
    shapes = {"model.embed_tokens.weight": (152064, 3584), "model.norm.weight": (3584,),
              "model.layers.0.self_attn.q_proj.weight": (3584, 3584), "model.layers.0.self_attn.q_proj.bias": (3584,),
              "model.layers.0.self_attn.k_proj.weight": (512, 3584), "model.layers.0.mlp.gate_proj.weight": (18944, 3584),
              "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14), "visual.blocks.0.mlp.gate_proj.weight": (3420, 1280),
              "visual.merger.mlp.0.weight": (5120, 5120), "visual.merger.mlp.2.weight": (3584, 5120)}
    names = set(shapes) | {f"model.layers.{i}.x" for i in range(28)} | {f"visual.blocks.{i}.x" for i in range(32)}
    text, vision = detect_configs(names, lambda n: shapes[n])
    assert (text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim, text.sections) == (28, 28, 4, 128, (16, 24, 24))
    assert (vision.depth, vision.num_heads, vision.fullatt_block_indexes, vision.spatial_merge_size) == (
        32, 16, (7, 15, 23, 31), 2)


def test_text_only_qwen25_file(files, tokenizer_dir, encoder, tmp_path):
    tensors = {k: v for k, v in load_file(str(files["fp32"])).items() if not k.startswith("visual.")}
    save_file(tensors, str(tmp_path / "qwen2.5_7b.safetensors"))
    loaded = load_text_encoder(tmp_path / "qwen2.5_7b.safetensors", tokenizer=tokenizer_dir)
    assert not loaded.has_vision
    assert torch.equal(loaded.encode(PROMPT)[0], encoder.encode(PROMPT)[0])
    with pytest.raises(WeightFileError, match="no vision tower"):
        loaded.encode(PROMPT, [torch.rand(56, 56, 3)], template="edit")


def _tiny_file(path, names):
    save_file({name: torch.zeros(2, 2) for name in names}, str(path))
    return path


@pytest.mark.parametrize("kind", ["dit", "vae", "clip", "t5", "vision_only"])
def test_wrong_files_are_refused(kind, files, tokenizer_dir, tmp_path):
    root = files["root"]
    expected_words = {"dit": "diffusion model", "vae": "VAE", "clip": "CLIP", "t5": "T5", "vision_only": "vision tower only"}
    if kind == "dit":
        path = make_dit(root / "dit")
    elif kind == "vae":
        path = make_vae(root / "vae")
    elif kind == "clip":
        path = _tiny_file(tmp_path / "clip_l.safetensors", ["text_model.encoder.layers.0.self_attn.q_proj.weight",
                                                            "text_model.embeddings.token_embedding.weight"])
    elif kind == "t5":
        path = _tiny_file(tmp_path / "t5xxl.safetensors", ["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"])
    else:
        path = _tiny_file(tmp_path / "mmproj.safetensors", ["visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"])
    with pytest.raises(WeightFileError) as info:
        load_text_encoder(path, tokenizer=tokenizer_dir)
    message = str(info.value)
    assert expected_words[kind] in message and "model.embed_tokens.weight" in message and str(path) in message


# ---------------------------------------------------------------------------------------------------------------
# Image preprocessing vs the HF image processor
# ---------------------------------------------------------------------------------------------------------------
def test_pixel_values_match_hf_without_resize(processor):
    sizes = [(56, 56), (28 * 3, 28 * 5), (28 * 20, 28 * 2), (28 * 9, 28 * 4), (28 * 37, 28 * 37)]
    for array in _images(sizes, seed=10):
        expected = processor.image_processor(images=[Image.fromarray(array)], return_tensors="pt")
        patches, grid = preprocess_image(torch.from_numpy(array).float() / 255.0)
        assert list(grid) == expected["image_grid_thw"][0, 1:].tolist()
        assert _max_error(patches, expected["pixel_values"]) <= 1e-6


def test_pixel_values_match_hf_with_resize(processor):
    """uint8-valued images: the resize (bicubic, antialiased, through uint8) equals the processor's."""
    for array in _images([(100, 150), (37, 300), (30, 30), (384, 384), (500, 333)], seed=11):
        expected = processor.image_processor(images=[Image.fromarray(array)], return_tensors="pt")
        patches, grid = preprocess_image(torch.from_numpy(array).float() / 255.0)
        assert list(grid) == expected["image_grid_thw"][0, 1:].tolist()
        assert _max_error(patches, expected["pixel_values"]) <= 1e-6


def test_smart_resize_matches_hf():
    rng = np.random.default_rng(12)
    sizes = [(1, 150), (20, 3000), (4000, 3300), (5000, 5000), (384, 384), (1024, 1024), (28, 28), (56, 55)]
    sizes += [tuple(int(v) for v in rng.integers(20, 4000, 2)) for _ in range(200)]
    for height, width in sizes:
        if max(height, width) / min(height, width) > 200:
            continue
        assert smart_resize(height, width) == hf_smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
    assert math.prod(smart_resize(5000, 5000)) <= MAX_PIXELS
