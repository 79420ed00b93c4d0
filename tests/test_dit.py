"""Parity of models.qwen_image.dit (the Qwen-Image DiT) with diffusers' QwenImageTransformer2DModel and ComfyUI 0.3.75."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from models.qwen_image.latent import QWEN_IMAGE_LATENT
from models.qwen_image.dit_loader import dit_from_tensors
from models.qwen_image.rope import apply_rope, msrope_positions, rope_angles, rope_table
from tiny_models.configs import TINY_DIT

from env import comfyui_path  # noqa: E402

COMFYUI_DIR = comfyui_path()  # the host the tests run: COMFYUI_PATH or the pinned 0.3.75
ATOL = 1e-5


def make_reference(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    """diffusers model with random weights; norm weights re-randomised so a scale/name mix-up cannot hide."""
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY_DIT, **overrides}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    return model


def ours_from(reference: QwenImageTransformer2DModel, dtype: torch.dtype = torch.float32):
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    marker = {"__index_timestep_zero__": torch.empty(0)} if reference.config.zero_cond_t else {}
    return dit_from_tensors({**state, **marker}, dtype=dtype)


def run_reference(reference, x, timestep, context, mask=None, refs=None, control=None) -> torch.Tensor:
    """diffusers' transformer called the way its pipelines call it; returns the unpacked target velocity."""
    batch, _, height, width = x.shape
    images = [x] + list(refs or [])
    shapes = [[(1, im.shape[2] // 2, im.shape[3] // 2) for im in images]] * batch
    hidden = torch.cat([QWEN_IMAGE_LATENT.pack(im) for im in images], dim=1)
    with torch.no_grad():
        out = reference(hidden_states=hidden, encoder_hidden_states=context, encoder_hidden_states_mask=mask,
                        timestep=timestep, img_shapes=shapes, controlnet_block_samples=control,
                        return_dict=False)[0]
    return QWEN_IMAGE_LATENT.unpack(out[:, : (height // 2) * (width // 2)], height, width)


def inputs(batch=1, height=8, width=8, text=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, height, width, generator=g)
    timestep = torch.rand(batch, generator=g) * 0.9 + 0.05
    context = torch.randn(batch, text, TINY_DIT["joint_attention_dim"], generator=g) * 2
    return x, timestep, context


def assert_close(ours, ref, atol=ATOL):
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.5, "reference output too small to be a meaningful comparison"
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def pair():
    reference = make_reference()
    return reference, ours_from(reference)


@pytest.fixture(scope="module")
def pair_2511():
    reference = make_reference(seed=3, zero_cond_t=True)
    return reference, ours_from(reference)


# --- RoPE -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grids", [[(4, 4)], [(5, 7)], [(4, 6), (8, 3), (2, 2)], [(3, 3), (9, 12)]])
def test_rope_table_matches_diffusers(grids):
    axes = TINY_DIT["axes_dims_rope"]
    text_len = 11
    vid, txt = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)(
        [[(1, h, w) for h, w in grids]], max_txt_seq_len=text_len, device=torch.device("cpu"))
    text_pos, image_pos = msrope_positions(grids, text_len)
    for positions, freqs in ((text_pos, txt), (image_pos, vid)):
        table = rope_table(rope_angles(positions, axes), torch.float32)[:, 0]  # complex [L, D/2]
        torch.testing.assert_close(table, freqs, atol=1e-6, rtol=0)


def test_real_and_complex_rotation_agree():
    """The real-arithmetic path (half types) computes the same rotation as the complex one (float32)."""
    angles = rope_angles(msrope_positions([(4, 6), (2, 2)], 5)[1], (4, 14, 14)) * 1.7
    x = torch.randn(2, angles.shape[0], 3, 32, dtype=torch.float64)
    out_complex = apply_rope(x.float(), rope_table(angles, torch.float32), torch.empty(2, angles.shape[0], 3, 32))
    buffer = torch.empty(2, 3, angles.shape[0], 32, dtype=torch.float64).transpose(1, 2)  # strided destination
    out_real = apply_rope(x, rope_table(angles, torch.float64), buffer)
    torch.testing.assert_close(out_real.float(), out_complex, atol=1e-5, rtol=0)
    assert (out_complex - x.float()).abs().max() > 0.1


def test_msrope_positions_rule():
    text, images = msrope_positions([(3, 4), (6, 2)], 2)
    target = images[:12].view(3, 4, 3)
    assert target[..., 0].eq(0).all() and images[12:, 0].eq(1).all()
    assert target[:, 0, 1].tolist() == [-2, -1, 0] and target[0, :, 2].tolist() == [-2, -1, 0, 1]
    assert text.tolist() == [[3, 3, 3], [4, 4, 4]]  # max over all images of max(h//2, w//2): 6//2


# --- diffusers parity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(8, 8), (8, 12), (12, 6), (10, 14), (6, 6)])
def test_parity_target_only(pair, size):
    reference, ours = pair
    x, t, ctx = inputs(height=size[0], width=size[1])
    assert_close(ours(x, t, ctx), run_reference(reference, x, t, ctx))


def test_parity_padded_text_mask(pair):
    reference, ours = pair
    x, t, ctx = inputs(batch=2, height=8, width=10, text=9)
    mask = torch.ones(2, 9)
    mask[1, 5:] = 0
    expected = run_reference(reference, x, t, ctx, mask)
    assert_close(ours(x, t, ctx, context_mask=mask), expected)
    # the mask matters: padding tokens are not attended
    assert (ours(x, t, ctx)[1] - expected[1]).abs().max() > 1e-3
    # an all-ones mask equals no mask
    torch.testing.assert_close(ours(x, t, ctx, context_mask=torch.ones(2, 9)), ours(x, t, ctx), atol=0, rtol=0)


REF_SETS = {
    "one": [(8, 8)],
    "larger_than_target": [(16, 12)],
    "three_mixed": [(6, 10), (12, 16), (4, 4)],
    "odd_grids": [(10, 6), (6, 14)],
}


@pytest.mark.parametrize("zero_cond", [False, True], ids=["2509", "2511"])
@pytest.mark.parametrize("ref_sizes", list(REF_SETS.values()), ids=list(REF_SETS))
def test_parity_with_references(pair, pair_2511, zero_cond, ref_sizes):
    reference, ours = pair_2511 if zero_cond else pair
    assert ours.config.zero_cond_t == zero_cond
    x, t, ctx = inputs(height=8, width=10)
    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(1, 16, h, w, generator=g) for h, w in ref_sizes]
    assert_close(ours(x, t, ctx, ref_latents=refs), run_reference(reference, x, t, ctx, refs=refs))


def test_parity_2511_batch_mask_references(pair_2511):
    reference, ours = pair_2511
    x, t, ctx = inputs(batch=2, height=10, width=6, text=8)
    mask = torch.ones(2, 8)
    mask[0, 6:] = 0
    g = torch.Generator().manual_seed(6)
    refs = [torch.randn(2, 16, 12, 8, generator=g), torch.randn(2, 16, 4, 6, generator=g)]
    expected = run_reference(reference, x, t, ctx, mask, refs)
    assert_close(ours(x, t, ctx, context_mask=mask, ref_latents=refs), expected)
    # zero_cond_t changes the result (references modulated with t = 0)
    plain = make_reference(seed=3)
    assert (run_reference(plain, x, t, ctx, mask, refs) - expected).abs().max() > 1e-3


def test_2511_without_references_equals_plain_model(pair_2511):
    reference, ours = pair_2511
    x, t, ctx = inputs()
    assert_close(ours(x, t, ctx), run_reference(reference, x, t, ctx))


@pytest.mark.parametrize("samples", [2, 3, 5])
def test_parity_controlnet_residuals(samples):
    reference = make_reference(seed=7, num_layers=5)
    ours = ours_from(reference)
    x, t, ctx = inputs(batch=2, height=8, width=6)
    g = torch.Generator().manual_seed(8)
    width = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]
    control = [torch.randn(2, 12, width, generator=g) for _ in range(samples)]
    expected = run_reference(reference, x, t, ctx, control=control)
    assert_close(ours(x, t, ctx, control=control), expected)
    assert (ours(x, t, ctx) - expected).abs().max() > 1e-3


def test_timestep_scalar_and_batch_broadcast(pair):
    _, ours = pair
    x, _, ctx = inputs(batch=2)
    torch.testing.assert_close(ours(x, 0.4, ctx), ours(x, torch.tensor([0.4, 0.4]), ctx), atol=0, rtol=0)
    ref = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(ours(x, 0.4, ctx, ref_latents=[ref]),
                               ours(x, 0.4, ctx, ref_latents=[ref.expand(2, -1, -1, -1)]), atol=0, rtol=0)


def test_rejects_odd_latent(pair):
    _, ours = pair
    x, t, ctx = inputs(height=8, width=8)
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(x[..., :7], t, ctx)


# --- bf16 ---------------------------------------------------------------------------------------------------------
def test_bf16_close_to_fp32(pair_2511):
    reference, ours32 = pair_2511
    ours16 = ours_from(reference, dtype=torch.bfloat16)
    assert ours16.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    x, t, ctx = inputs(batch=2, height=10, width=12, text=9)
    refs = [torch.randn(2, 16, 8, 8)]
    mask = torch.ones(2, 9)
    mask[1, 4:] = 0
    expected = ours32(x, t, ctx, context_mask=mask, ref_latents=refs)
    got = ours16(x, t, ctx, context_mask=mask, ref_latents=refs)
    assert got.dtype == torch.float32  # returned in the input's dtype
    rel = ((got - expected).norm() / expected.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    assert rel < 3e-2 and cos > 0.999, (rel, cos)


# --- ComfyUI 0.3.75 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_outputs(pair, tmp_path_factory):
    """Run ComfyUI's native QwenImageTransformer2DModel on the same weights for the cases below."""
    assert (COMFYUI_DIR / "comfy/ldm/qwen_image/model.py").is_file(), "ComfyUI 0.3.75 source tree missing"
    reference, ours = pair
    cases = {}
    x, t, ctx = inputs(batch=2, height=8, width=12)
    cases["even"] = dict(x=x, timestep=t, context=ctx, mask=None, refs=None)
    x, t, ctx = inputs(height=10, width=14)
    cases["odd_grid"] = dict(x=x, timestep=t, context=ctx, mask=None, refs=None)
    x, t, ctx = inputs(height=12, width=12)
    cases["smaller_ref"] = dict(x=x, timestep=t, context=ctx, mask=None, refs=[torch.randn(1, 16, 8, 4)])
    x, t, ctx = inputs(height=8, width=8)
    cases["larger_ref"] = dict(x=x, timestep=t, context=ctx, mask=None, refs=[torch.randn(1, 16, 16, 12)])
    x, t, ctx = inputs(batch=2, height=8, width=8, text=9)
    mask = torch.ones(2, 9)
    mask[1, 4:] = 0
    cases["mask"] = dict(x=x, timestep=t, context=ctx, mask=mask, refs=None)
    io_file = tmp_path_factory.mktemp("comfy") / "io.pt"
    torch.save({"config": dict(reference.config), "state_dict": reference.state_dict(),
                "cases": list(cases.values())}, io_file)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_dit_oracle.py")), str(COMFYUI_DIR),
                           str(io_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = torch.load(io_file)["outputs"]
    return {name: (case, out) for (name, case), out in zip(cases.items(), outputs)}


def _ours(ours, case, mask="case"):
    return ours(case["x"], case["timestep"], case["context"], context_mask=case["mask"] if mask == "case" else mask,
                ref_latents=case["refs"])


@pytest.mark.parametrize("name", ["even", "smaller_ref"])
def test_comfy_agrees_where_maths_is_the_same(pair, comfy_outputs, name):
    case, comfy_out = comfy_outputs[name]
    assert_close(_ours(pair[1], case), comfy_out)


def test_comfy_differs_on_odd_grids(pair, comfy_outputs):
    """ComfyUI centres an odd grid as -(h//2)..h//2; diffusers (and we) use -(h - h//2)..h//2 - 1."""
    case, comfy_out = comfy_outputs["odd_grid"]
    ours = _ours(pair[1], case)
    assert_close(ours, run_reference(pair[0], case["x"], case["timestep"], case["context"]))
    assert (ours - comfy_out).abs().max() > 1e-3


def test_comfy_differs_on_text_positions_with_larger_reference(pair, comfy_outputs):
    """ComfyUI starts the text positions after the target only; diffusers uses the largest image."""
    case, comfy_out = comfy_outputs["larger_ref"]
    ours = _ours(pair[1], case)
    assert_close(ours, run_reference(pair[0], case["x"], case["timestep"], case["context"], refs=case["refs"]))
    assert (ours - comfy_out).abs().max() > 1e-3


def test_comfy_ignores_the_text_mask(pair, comfy_outputs):
    """ComfyUI 0.3.75 accepts attention_mask but never applies it: it equals our unmasked run."""
    case, comfy_out = comfy_outputs["mask"]
    assert_close(_ours(pair[1], case, mask=None), comfy_out)
    masked = _ours(pair[1], case)
    assert_close(masked[0], comfy_out[0])  # the unpadded sample agrees
    assert (masked[1] - comfy_out[1]).abs().max() > 1e-3
