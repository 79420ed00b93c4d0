"""Benchmark: Qwen2.5-VL condition encoding, models.encoders.qwen25vl.encoder vs transformers, same synthetic weights.

Full-width layers (LM hidden 3584, 28 heads / 4 KV heads, MLP 18944; vision 1280 wide, 16 heads) with few
blocks, random weights shared by both implementations (no copy).  Cases: a ~100-token t2i prompt, and an
edit_plus prompt with two 1024x1024 images (resized to 1036x1036 by both, 1369 tokens each).  Each case: one
warm-up, then one timed run per implementation, end to end (tokenize, preprocess, vision tower, LM).

The transformers column is what the diffusers pipelines call (processor + ``Qwen2_5_VLForConditionalGeneration``
with ``output_hidden_states``, which also computes the LM-head logits); the "base" column calls its
``model.model`` (no LM head), the fairer comparison of the encoder itself.

    python bench/bench_text_encoder.py [--layers 2] [--vision-depth 4] [--tokenizer DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.encoders.qwen25vl.model import TextConfig, VisionConfig  # noqa: E402
from models.encoders.qwen25vl.encoder import build_text_encoder  # noqa: E402
from models.qwen_image.templates import QWEN_IMAGE_TEMPLATES as TEMPLATES  # noqa: E402
from models.encoders.tokenizer import find_tokenizer  # noqa: E402
from models.encoders.vision_preprocess import MAX_PIXELS, MIN_PIXELS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from env import comfyui_path  # noqa: E402

HOST_TOKENIZER = comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--tokenizer", default=None, help="Qwen2.5 tokenizer folder (default: host / scratch copy)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tokenizer = find_tokenizer(explicit=args.tokenizer, host_dirs=[HOST_TOKENIZER])
    full_att = [args.vision_depth - 1]  # one full-attention block, the last (as blocks 7/15/23/31 end groups of 8)
    text_cfg = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=args.layers,
                    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=128000, tie_word_embeddings=True,
                    rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]})
    vision_cfg = dict(depth=args.vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
                      out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=full_att, hidden_act="silu")
    torch.manual_seed(0)
    t_build, reference = _timed(lambda: Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=True)).eval())
    ours = build_text_encoder(
        reference.state_dict(),  # shares the tensors: same weights, no copy
        TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=args.layers,
                   num_heads=28, num_kv_heads=4, head_dim=128),
        VisionConfig(hidden_size=1280, intermediate_size=3420, depth=args.vision_depth, num_heads=16,
                     out_hidden_size=3584, fullatt_block_indexes=tuple(full_att)),
        tokenizer, TEMPLATES)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=Qwen2Tokenizer.from_pretrained(tokenizer.source), video_processor=Qwen2VLVideoProcessor())

    words = "a small red fox with a fluffy tail sits on a mossy rock beside a quiet mountain lake at dawn".split()
    prompt_100 = " ".join(words[i % len(words)] for i in range(95))
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for _ in range(2)]
    cases = [("t2i, ~100-token prompt", prompt_100, []), ("edit_plus, 2 images 1024x1024", "make it snow", arrays)]

    def run_ours(prompt, imgs, template):
        return ours.encode(prompt, [torch.from_numpy(a).float() / 255.0 for a in imgs], template=template)[0]

    def run_reference(prompt, imgs, template, base: bool):
        spec = TEMPLATES[template]
        inputs = processor(text=[spec.format(prompt, len(imgs))], images=[Image.fromarray(a) for a in imgs] or None,
                           return_tensors="pt")
        with torch.no_grad():
            if base:
                hidden = reference.model(**inputs).last_hidden_state
            else:
                hidden = reference(**inputs, output_hidden_states=True).hidden_states[-1]
        return hidden[:, spec.drop:]

    print(f"device cpu, {torch.get_num_threads()} threads, LM {args.layers} layers x 3584, vision {args.vision_depth} "
          f"blocks x 1280 (full attention at {full_att}); built in {t_build:.1f} s")
    print(f"{'case':34s} {'tokens':>6s} {'ours s':>8s} {'hf s':>8s} {'hf base s':>9s} {'hf/ours':>8s} "
          f"{'base/ours':>9s} {'max|diff|':>10s}")
    for name, prompt, imgs in cases:
        template = "edit_plus" if imgs else "t2i"
        run_ours(prompt, imgs, template)  # warm-up
        run_reference(prompt, imgs, template, base=True)
        t_ours, emb = _timed(lambda: run_ours(prompt, imgs, template))
        t_base, _ = _timed(lambda: run_reference(prompt, imgs, template, base=True))
        t_ref, expected = _timed(lambda: run_reference(prompt, imgs, template, base=False))
        diff = (emb - expected).abs().max().item()
        print(f"{name:34s} {emb.shape[1]:6d} {t_ours:8.2f} {t_ref:8.2f} {t_base:9.2f} {t_ref / t_ours:8.2f} "
              f"{t_base / t_ours:9.2f} {diff:10.2e}")


if __name__ == "__main__":
    main()
