"""The InstantX Qwen-Image ControlNet (models.qwen_image.controlnet) against diffusers' QwenImageControlNetModel, and the
guided DiT (our DiT + our residuals) against diffusers' QwenImageTransformer2DModel fed the reference samples."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet_inpaint import QwenImageControlNetInpaintPipeline
from safetensors.torch import save_file

from models.qwen_image.controlnet import controlnet_from_tensors, controlnet_inpaint_latent, load_controlnet
from models.qwen_image.latent import QWEN_IMAGE_LATENT
from models.qwen_image.dit_loader import load_diffusion_model
from models.io.gguf import load_gguf_state_dict
from tiny_models.configs import TINY_CONTROLNET, TINY_DIT
from tiny_models.factory import (_LATENTS_MEAN, _LATENTS_STD, make_blockwise_control, make_controlnet,
                                    make_controlnet_gguf, make_dit, make_vae)
from tiny_models.gguf_factory import make_dit_gguf
from models.io.weights import WeightFileError
from references import reference_controlnet, reference_dit
from test_dit import run_reference

ATOL = 1e-5
WIDTH = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {
        "union": make_controlnet(root, dtype="fp32"),
        "inpaint": make_controlnet(root, variant="inpaint", dtype="fp32"),
        "union_bf16": make_controlnet(root, dtype="bf16"),
        "union_comfy": make_controlnet(root, layout="comfy", dtype="fp16"),
        "union_gguf": make_controlnet_gguf(root, qtype="Q8_0"),
        "dit": make_dit(root / "dit", dtype="fp32"),
        "dit5": make_dit(root / "dit5", dtype="fp32", config={**TINY_DIT, "num_layers": 5}),
        "root": root,
    }


@pytest.fixture(scope="module")
def union(files):
    return reference_controlnet(files["union"]), load_controlnet(files["union"])


@pytest.fixture(scope="module")
def inpaint(files):
    return reference_controlnet(files["inpaint"]), load_controlnet(files["inpaint"])


def inputs(batch=1, height=8, width=8, text=7, channels=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, height, width, generator=g)
    timestep = torch.rand(batch, generator=g) * 0.9 + 0.05
    context = torch.randn(batch, text, TINY_DIT["joint_attention_dim"], generator=g) * 2
    hint = torch.randn(batch, channels, height, width, generator=g)
    return x, timestep, context, hint


def run_reference_controlnet(reference, x, timestep, context, hint, mask=None, scale=1.0) -> list[torch.Tensor]:
    """diffusers' ControlNet called as QwenImageControlNetPipeline calls it (packed latents, sigma timestep)."""
    batch, _, height, width = x.shape
    with torch.no_grad():
        return reference(hidden_states=QWEN_IMAGE_LATENT.pack(x), controlnet_cond=QWEN_IMAGE_LATENT.pack(hint), conditioning_scale=scale,
                         encoder_hidden_states=context, encoder_hidden_states_mask=mask, timestep=timestep,
                         img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False)


def assert_samples_close(ours, ref, atol=ATOL):
    assert len(ours) == len(ref)
    for mine, theirs in zip(ours, ref):
        assert mine.shape == theirs.shape
        assert theirs.abs().max() > 0.1, "reference sample too small to be a meaningful comparison"
        err = (mine - theirs).abs().max().item()
        assert err <= atol, f"max abs error {err:.3g} > {atol}"


# --- ControlNet parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,size,scale", [(1, (8, 8), 1.0), (2, (8, 12), 0.65), (2, (12, 6), 1.3)])
def test_union_matches_diffusers(union, batch, size, scale):
    reference, ours = union
    x, t, ctx, hint = inputs(batch, *size)
    assert_samples_close(ours(x, t, ctx, hint, conditioning_scale=scale),
                         run_reference_controlnet(reference, x, t, ctx, hint, scale=scale))


def test_union_padded_text_and_broadcast_hint(union):
    reference, ours = union
    x, t, ctx, hint = inputs(2, 10, 8, text=9)
    mask = torch.ones(2, 9)
    mask[1, 5:] = 0
    expected = run_reference_controlnet(reference, x, t, ctx, hint[:1].expand(2, -1, -1, -1), mask)
    assert_samples_close(ours(x, t, ctx, hint[:1], context_mask=mask), expected)


def test_inpaint_variant_matches_diffusers(inpaint):
    reference, ours = inpaint
    assert ours.config.extra_channels == 4 and ours.config.control_channels == 17
    x, t, ctx, hint = inputs(2, 8, 10, channels=16)
    mask = (torch.rand(2, 1, 64, 80, generator=torch.Generator().manual_seed(3)) > 0.6).float()
    control = controlnet_inpaint_latent(hint, mask)
    assert_samples_close(ours(x, t, ctx, control, conditioning_scale=0.8),
                         run_reference_controlnet(reference, x, t, ctx, control, scale=0.8))


def test_controlnet_inpaint_latent_matches_diffusers_pipeline():
    """The 68 packed channels equal those of QwenImageControlNetInpaintPipeline.prepare_image_with_mask (its VAE
    replaced by one returning a known raw latent)."""
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(2, 16, 1, 6, 10, generator=g) * 2
    pixel_mask = (torch.rand(2, 1, 48, 80, generator=g) > 0.5).float()

    class FixedVAE:
        config = types.SimpleNamespace(latents_mean=_LATENTS_MEAN, latents_std=_LATENTS_STD, z_dim=16)
        temperal_downsample = [False, True, True]
        dtype = torch.float32

        def encode(self, image):
            assert image[:, :, 0][pixel_mask.expand(-1, 3, -1, -1) > 0.5].eq(-1).all()  # repainted pixels black
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: raw))

    pipe = types.SimpleNamespace(vae=FixedVAE(), _pack_latents=QwenImageControlNetInpaintPipeline._pack_latents)
    expected = QwenImageControlNetInpaintPipeline.prepare_image_with_mask(
        pipe, image=torch.rand(2, 3, 48, 80, generator=g) * 2 - 1, mask=pixel_mask, width=80, height=48,
        batch_size=2, num_images_per_prompt=1, device=torch.device("cpu"), dtype=torch.float32)
    mean, std = torch.tensor(_LATENTS_MEAN).view(1, 16, 1, 1), torch.tensor(_LATENTS_STD).view(1, 16, 1, 1)
    ours = QWEN_IMAGE_LATENT.pack(controlnet_inpaint_latent((raw[:, :, 0] - mean) / std, pixel_mask))
    assert ours.shape == expected.shape == (2, 15, 68)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


# --- the guided DiT -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dit_key,size", [("dit", (8, 12)), ("dit5", (10, 6))])
def test_guided_dit_matches_diffusers(files, union, dit_key, size):
    """Our DiT + our residuals == diffusers' transformer + diffusers' ControlNet samples, target tokens only; the
    5-block DiT takes the 3 samples as [0, 0, 1, 1, 2] (i // ceil(5 / 3))."""
    ref_cn, ours_cn = union
    config = {**TINY_DIT, "num_layers": 5} if dit_key == "dit5" else TINY_DIT
    ref_dit, ours_dit = reference_dit(files[dit_key], config), load_diffusion_model(files[dit_key])
    x, t, ctx, hint = inputs(2, *size)
    expected = run_reference(ref_dit, x, t, ctx, control=run_reference_controlnet(ref_cn, x, t, ctx, hint, scale=0.9))
    got = ours_dit(x, t, ctx, control=ours_cn(x, t, ctx, hint, conditioning_scale=0.9))
    assert expected.abs().max() > 0.5
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, err
    assert (ours_dit(x, t, ctx) - expected).abs().max() > 1e-3  # the control changes the output


def test_scale_zero_gives_the_uncontrolled_output(files, union):
    _, ours_cn = union
    dit = load_diffusion_model(files["dit"])
    x, t, ctx, hint = inputs(2, 8, 8)
    plain = dit(x, t, ctx)
    torch.testing.assert_close(dit(x, t, ctx, control=ours_cn(x, t, ctx, hint, conditioning_scale=0.0)), plain,
                               atol=0, rtol=0)


def test_residuals_only_reach_the_target_tokens(files, union):
    """With edit references our DiT adds the residuals to the target tokens only: diffusers (which adds samples
    to every image token) agrees when its samples are zero on the reference tokens."""
    ref_cn, ours_cn = union
    ref_dit, ours_dit = reference_dit(files["dit"]), load_diffusion_model(files["dit"])
    x, t, ctx, hint = inputs(2, 8, 8)
    refs = [torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(9))]
    samples = run_reference_controlnet(ref_cn, x, t, ctx, hint)
    padded = [torch.cat([s, s.new_zeros(2, 15, WIDTH)], dim=1) for s in samples]
    expected = run_reference(ref_dit, x, t, ctx, refs=[refs[0].expand(2, -1, -1, -1)], control=padded)
    got = ours_dit(x, t, ctx, ref_latents=refs, control=ours_cn(x, t, ctx, hint))
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, err
    assert (ours_dit(x, t, ctx, ref_latents=refs) - expected).abs().max() > 1e-3


# --- dtypes and formats ----------------------------------------------------------------------------------------------
def test_bf16_and_fp16_files_close_to_fp32(files, union):
    _, ours32 = union
    x, t, ctx, hint = inputs(2, 8, 8)
    expected = torch.cat([s.flatten() for s in ours32(x, t, ctx, hint)])
    for path, dtype in ((files["union_bf16"], torch.bfloat16), (files["union_comfy"], torch.float32)):
        model = load_controlnet(path, dtype=dtype)
        assert model.transformer_blocks[0].attn.to_q.weight.dtype == dtype
        got = torch.cat([s.float().flatten() for s in model(x, t, ctx, hint)])
        rel = ((got - expected).norm() / expected.norm()).item()
        cos = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
        assert rel < 3e-2 and cos > 0.999, (path.name, rel, cos)


def test_gguf_controlnet_matches_its_dequantized_weights(files, union):
    path = files["union_gguf"]
    quantized = load_controlnet(path)
    assert type(quantized.transformer_blocks[0].attn.to_q).__module__.endswith("gguf.layers")
    dense = controlnet_from_tensors(load_gguf_state_dict(path, dequantize=True, dtype=torch.float32))
    x, t, ctx, hint = inputs(2, 8, 6)
    got = quantized(x, t, ctx, hint)
    assert_samples_close(got, dense(x, t, ctx, hint))
    exact = torch.cat([s.flatten() for s in union[1](x, t, ctx, hint)])
    rel = ((torch.cat([s.flatten() for s in got]) - exact).norm() / exact.norm()).item()
    assert rel < 3e-2, rel  # Q8_0 of the same values as the fp32 file


def test_single_file_loads_strictly_in_diffusers(files):
    reference = reference_controlnet(files["union_comfy"], TINY_CONTROLNET)
    ours = load_controlnet(files["union_comfy"])
    x, t, ctx, hint = inputs(1, 8, 8)
    assert_samples_close(ours(x, t, ctx, hint), run_reference_controlnet(reference, x, t, ctx, hint))


def test_rejects_wrong_inputs(union):
    _, ours = union
    x, t, ctx, hint = inputs(1, 8, 8)
    with pytest.raises(ValueError, match="control latent"):
        ours(x, t, ctx, hint[:, :, :6])
    with pytest.raises(ValueError, match=r"\[B, 16, 8, 8\]"):
        ours(x, t, ctx, torch.randn(1, 17, 8, 8))


def _flux_controlnet(path):
    tensors = {"controlnet_blocks.0.weight": torch.zeros(8, 8), "controlnet_x_embedder.weight": torch.zeros(8, 64),
               "transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8),
               "controlnet_single_blocks.0.weight": torch.zeros(8, 8), "x_embedder.weight": torch.zeros(8, 64)}
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("kind,expected", [
    ("dit", "diffusion model"), ("dit_gguf", "diffusion model"), ("blockwise", "DiffSynth blockwise"),
    ("flux", "Flux ControlNet"), ("vae", "VAE")])
def test_refuses_other_files(files, kind, expected):
    root = files["root"]
    path = {"dit": lambda: files["dit"], "dit_gguf": lambda: make_dit_gguf(root / "gguf"),
            "blockwise": lambda: make_blockwise_control(root / "patches"),
            "flux": lambda: _flux_controlnet(root / "flux_controlnet.safetensors"),
            "vae": lambda: make_vae(root / "vae")}[kind]()
    with pytest.raises(WeightFileError, match=expected) as error:
        load_controlnet(path)
    assert "InstantX Qwen-Image ControlNet" in str(error.value)

