"""Configurations of the tiny random-weight models: the real Qwen-Image topology, small widths.

Every tiny file the factory writes, and every parity test, is built from these dictionaries (diffusers /
transformers config names), so a change here changes all of them consistently.  Rules that the loaders rely on to
detect a config from tensors alone (no config.json in single files):

* DiT RoPE axes: ``(head_dim // 8, (head_dim - head_dim // 8) // 2, same)``; 128 -> (16, 56, 56) as in the real
  model, 32 -> (4, 14, 14) here.
* The DiT's ``joint_attention_dim`` equals the text encoder's hidden size, so tiny models compose end to end.
"""

from __future__ import annotations

# diffusers QwenImageTransformer2DModel(**TINY_DIT)
TINY_DIT: dict = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 14, 14),
}

# diffusers AutoencoderKLQwenImage(**TINY_VAE); real: base_dim 96
TINY_VAE: dict = {
    "base_dim": 16,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}

# transformers Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=TINY_VISION); the real vocabulary size is
# kept so the real tokenizer (ids up to 151668) works with the tiny model.
TINY_TEXT: dict = {
    "vocab_size": 152064,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 128000,
    "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

TINY_VISION: dict = {
    "depth": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_chans": 3,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1, 3],
    "hidden_act": "silu",
}

# Qwen-Image-Layered: the same DiT with the additional timestep condition and layer-3D RoPE, and the RGBA VAE.
TINY_LAYERED_DIT: dict = {**TINY_DIT, "use_additional_t_cond": True, "use_layer3d_rope": True}
TINY_RGBA_VAE: dict = {**TINY_VAE, "input_channels": 4}

# The real Qwen-Image 1.x sizes, for benchmarks with full-width synthetic weights.
FULL_DIT: dict = {**TINY_DIT, "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24,
                  "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56)}
FULL_VAE: dict = {**TINY_VAE, "base_dim": 96}

# diffusers QwenImageControlNetModel(**TINY_CONTROLNET): the InstantX Union shape (real: 5 blocks, extra 0) at the
# tiny DiT's width, heads and text width, so its residuals plug into the tiny DiT.
TINY_CONTROLNET: dict = {
    **{k: v for k, v in TINY_DIT.items() if k != "guidance_embeds"},
    "num_layers": 3,
    "extra_condition_channels": 0,
}
# The Inpainting variant: the packed control input has 4 more channels (the keep mask), 68 instead of 64.
TINY_CONTROLNET_INPAINT: dict = {**TINY_CONTROLNET, "extra_condition_channels": 4}

# ComfyUI QwenImageBlockWiseControlNet(**TINY_BLOCKWISE): DiffSynth blockwise control, one block per tiny DiT block
# (real: num_layers 60, dim 3072; additional_in_dim 4 for Inpaint).
TINY_BLOCKWISE: dict = {
    "num_layers": TINY_DIT["num_layers"],
    "in_dim": 64,
    "additional_in_dim": 0,
    "dim": TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"],
}
