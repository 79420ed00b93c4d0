"""Qwen-Image-Layered in the library: the DiT's two flags (additional timestep condition, layer-3D RoPE) and the
RGBA VAE, against diffusers' QwenImageTransformer2DModel(use_additional_t_cond, use_layer3d_rope) and
AutoencoderKLQwenImage(input_channels=4) on identical weights; loading from every layout; clear refusals."""

from __future__ import annotations

import pytest
import torch

from models import QWEN_IMAGE_LATENT, WeightFileError, load_diffusion_model, load_vae
from references import reference_vae
from test_dit import ATOL, assert_close, make_reference, ours_from
from tiny_models.configs import TINY_DIT, TINY_RGBA_VAE
from tiny_models.factory import make_dit, make_vae
from tiny_models.gguf_factory import make_dit_gguf

LAYERED = {"use_additional_t_cond": True, "use_layer3d_rope": True}
# Relative L2 of a file's output against the fp32 file's (the bounds tests/test_dit_loading.py holds plain DiTs to).
PRECISION_TOLERANCE = {"fp32": ATOL, "bf16": 3e-2, "fp8_e4m3fn": 0.15, "fp8_e4m3fn_scaled": 0.15, "Q8_0": 3e-2}


def _layered_inputs(batch: int, frames: int, height: int, width: int, text: int = 9, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, height, width, generator=g)
    condition = torch.randn(batch, 16, height, width, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    context = torch.randn(batch, text, TINY_DIT["joint_attention_dim"], generator=g) * 2
    return x, condition, sigma, context


def run_layered_reference(reference, x, condition, sigma, context, mask=None) -> torch.Tensor:
    """diffusers' transformer called as QwenImageLayeredPipeline calls it: the frames packed frame-major, then the
    condition; one (1, h, w) entry per frame and one for the condition; additional_t_cond 0 (RGBA)."""
    batch, _, frames, height, width = x.shape
    hidden = torch.cat([QWEN_IMAGE_LATENT.pack(x[:, :, f]) for f in range(frames)]
                       + [QWEN_IMAGE_LATENT.pack(condition)], dim=1)
    shapes = [[(1, height // 2, width // 2)] * (frames + 1)] * batch
    with torch.no_grad():
        out = reference(hidden_states=hidden, encoder_hidden_states=context, encoder_hidden_states_mask=mask,
                        timestep=sigma, img_shapes=shapes, additional_t_cond=torch.zeros(batch, dtype=torch.long),
                        return_dict=False)[0]
    tokens = (height // 2) * (width // 2)
    return torch.stack([QWEN_IMAGE_LATENT.unpack(out[:, f * tokens:(f + 1) * tokens], height, width)
                        for f in range(frames)], dim=2)


@pytest.fixture(scope="module")
def pair():
    reference = make_reference(seed=3, **LAYERED)
    return reference, ours_from(reference)


def test_the_flags_are_read_from_the_weights(pair):
    _, ours = pair
    assert ours.config.additional_t_cond and ours.config.layer3d_rope and not ours.config.zero_cond_t


@pytest.mark.parametrize("batch,frames,height,width", [(1, 5, 8, 8), (2, 3, 6, 10), (1, 2, 10, 6)])
def test_forward_matches_diffusers(pair, batch, frames, height, width):
    reference, ours = pair
    x, condition, sigma, context = _layered_inputs(batch, frames, height, width)
    assert_close(ours(x, sigma, context, ref_latents=[condition]),
                 run_layered_reference(reference, x, condition, sigma, context))


def test_forward_with_a_padded_prompt_matches_diffusers(pair):
    reference, ours = pair
    x, condition, sigma, context = _layered_inputs(2, 3, 8, 8, text=11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    assert_close(ours(x, sigma, context, context_mask=mask, ref_latents=[condition]),
                 run_layered_reference(reference, x, condition, sigma, context, mask))


def test_the_layer_rope_matters(pair):
    """The same weights with the plain MSRoPE give another answer: the test above would notice a wrong RoPE."""
    reference, ours = pair
    x, condition, sigma, context = _layered_inputs(1, 3, 8, 8)
    plain = make_reference(seed=3, use_additional_t_cond=True)
    plain.load_state_dict(reference.state_dict())
    assert (run_layered_reference(plain, x, condition, sigma, context)
            - ours(x, sigma, context, ref_latents=[condition])).abs().max() > 1e-3


def test_refusals(pair):
    _, ours = pair
    x, condition, sigma, context = _layered_inputs(1, 3, 8, 8)
    with pytest.raises(ValueError, match="Layered Encode"):
        ours(x[:, :, 0], sigma, context)  # text-to-image on a Layered DiT
    plain = ours_from(make_reference(seed=3))
    with pytest.raises(ValueError, match="needs a Qwen-Image-Layered DiT"):
        plain(x, sigma, context, ref_latents=[condition])


@pytest.mark.parametrize("layout,dtype", [("comfy", "fp32"), ("comfy_prefixed", "bf16"), ("diffusers", "fp32"),
                                          ("comfy", "fp8_e4m3fn"), ("comfy", "fp8_e4m3fn_scaled"), ("gguf", "Q8_0")])
def test_layered_files_load_from_every_layout(tmp_path, layout, dtype):
    if layout == "gguf":
        path = make_dit_gguf(tmp_path, qtype=dtype, seed=5, config={**TINY_DIT, **LAYERED})
    else:
        path = make_dit(tmp_path, layout=layout.removesuffix("_prefixed"), dtype=dtype, variant="layered",
                        prefix=layout.endswith("_prefixed"), seed=5)
    dit = load_diffusion_model(path)
    assert dit.config.additional_t_cond and dit.config.layer3d_rope
    exact = load_diffusion_model(make_dit(tmp_path / "ref", dtype="fp32", variant="layered", seed=5))
    x, condition, sigma, context = _layered_inputs(1, 3, 8, 8)
    got, expected = dit(x, sigma, context, ref_latents=[condition]), exact(x, sigma, context, ref_latents=[condition])
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < PRECISION_TOLERANCE[dtype], rel


# -- the RGBA VAE ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgba_vae(tmp_path_factory):
    path = make_vae(tmp_path_factory.mktemp("rgba"), dtype="fp32", variant="rgba", seed=6)
    return load_vae(path), reference_vae(path, TINY_RGBA_VAE)


def _rgba(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, height, width, 4, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("batch,height,width", [(2, 48, 64), (1, 40, 72)])
def test_rgba_vae_matches_diffusers(rgba_vae, batch, height, width):
    ours, reference = rgba_vae
    images = _rgba(batch, height, width)
    with torch.no_grad():
        expected_z = reference.encode(images.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1).latent_dist.mode()[:, :, 0]
        z = ours.encode(images)
        assert (z - expected_z).abs().max() <= 1e-5
        expected = ((reference.decode(z.unsqueeze(2)).sample[:, :, 0].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    decoded = ours.decode(z)
    assert decoded.shape == (batch, height, width, 4)
    assert (decoded - expected).abs().max() <= 1e-5


def test_rgba_vae_tiles_exactly_and_takes_rgb(rgba_vae):
    ours, _ = rgba_vae
    images = _rgba(1, 64, 96)
    z = ours.encode(images)
    assert (ours.encode(images, tiled=True, tile_size=32) - z).abs().max() <= 1e-5
    assert (ours.decode(z, tiled=True, tile_size=4) - ours.decode(z)).abs().max() <= 1e-5
    opaque = images.clone()
    opaque[..., 3] = 1.0
    assert torch.equal(ours.encode(opaque[..., :3]), ours.encode(opaque))  # RGB gets an opaque alpha


def test_rgba_vae_in_the_diffusers_layout(tmp_path):
    comfy = load_vae(make_vae(tmp_path, dtype="fp32", variant="rgba", seed=8))
    folder = load_vae(make_vae(tmp_path, layout="diffusers", dtype="fp32", variant="rgba", seed=8))
    images = _rgba(1, 32, 32)
    assert torch.equal(comfy.encode(images), folder.encode(images))
    assert comfy.image_channels == folder.image_channels == 4


def test_the_plain_vae_is_not_the_rgba_one(tmp_path):
    assert load_vae(make_vae(tmp_path, seed=9)).image_channels == 3
    with pytest.raises(WeightFileError, match="Layered"):
        load_diffusion_model(make_vae(tmp_path / "rgba", variant="rgba"))
