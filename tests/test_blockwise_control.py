"""DiffSynth blockwise ControlNets (models.qwen_image.blockwise_control) against ComfyUI 0.3.75's own implementation: its
QwenImageBlockWiseControlNet module and its QwenImageDiffsynthControlnet node's patch inside its DiT (subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from env import comfyui_path
from models.qwen_image.blockwise_control import blockwise_inpaint_latent, load_blockwise_control
from models.qwen_image.dit_loader import load_diffusion_model
from tiny_models.configs import TINY_BLOCKWISE, TINY_DIT
from tiny_models.factory import (_LATENTS_MEAN, _LATENTS_STD, make_blockwise_control, make_controlnet, make_dit)
from models.io.weights import WeightFileError
from references import comfy_tensors

ATOL = 1e-5
WIDTH = TINY_BLOCKWISE["dim"]
MEAN = torch.tensor(_LATENTS_MEAN).view(1, 16, 1, 1)
STD = torch.tensor(_LATENTS_STD).view(1, 16, 1, 1)

# (variant, latent size, strength, pixel mask?) for the guided DiT; latent grids even so ComfyUI's DiT maths
# equals ours (see tests/test_dit.py).
GUIDED = {
    "canny": [((8, 12), 1.0, False), ((12, 8), 0.55, False)],
    "depth": [((8, 8), -0.7, False)],
    "inpaint": [((8, 12), 0.9, True), ((8, 8), 1.2, False)],
}


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """The Qwen-Image latent normalization ComfyUI's Wan21 format applies (4-D from 5-D single-frame raw)."""
    return (raw[:, :16, 0] - MEAN) / STD


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    dit_path = make_dit(root, dtype="fp32")
    g = torch.Generator().manual_seed(11)
    data = {"dit_config": dict(TINY_DIT), "dit_state": comfy_tensors(dit_path), "patches": []}
    for variant, cases in GUIDED.items():
        path = make_blockwise_control(root, variant=variant, dtype="fp32")
        extra = 1 if variant == "inpaint" else 0
        modules = [{"raw": torch.randn(1, 16 + extra, 1, 8, 12, generator=g) * 2,
                    "img": torch.randn(2, 24, WIDTH, generator=g) * 3, "block": block} for block in (0, 1)]
        guided = []
        for (h, w), strength, with_mask in cases:
            mask = (torch.rand(1, h * 8, w * 8, generator=g) > 0.5).float() if with_mask else None
            guided.append({"x": torch.randn(2, 16, h, w, generator=g),
                           "timestep": torch.rand(2, generator=g) * 0.9 + 0.05,
                           "context": torch.randn(2, 7, TINY_DIT["joint_attention_dim"], generator=g) * 2,
                           "raw": torch.randn(1, 16, 1, h, w, generator=g) * 2, "strength": strength, "mask": mask})
        config = {**TINY_BLOCKWISE, "additional_in_dim": 4 * extra}
        data["patches"].append({"variant": variant, "path": str(path), "config": config,
                                "state": comfy_tensors(path), "modules": modules, "guided": guided})
    io_file = root / "io.pt"
    torch.save(data, io_file)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_blockwise_oracle.py")),
                           str(comfyui_path()), str(io_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(io_file)
    return {"root": root, "dit": load_diffusion_model(dit_path), "dit_path": dit_path,
            "patches": {entry["variant"]: entry for entry in out["patches"]}}


def assert_close(ours, ref, atol=ATOL, floor=0.1):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.abs().max() > floor, "reference output too small to be a meaningful comparison"
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("variant", list(GUIDED))
def test_encode_and_blocks_match_comfy(setup, variant):
    entry = setup["patches"][variant]
    control = load_blockwise_control(entry["path"])
    assert control.config.depth == TINY_DIT["num_layers"] and control.config.width == WIDTH
    for case, (tokens_ref, block_ref) in zip(entry["modules"], entry["module_outputs"]):
        raw = case["raw"]
        latent = torch.cat([normalize(raw), raw[:, 16:, 0]], dim=1)  # the mask channel is not normalized
        tokens = control.encode(latent)
        assert_close(tokens, tokens_ref)
        assert_close(control.block_residual(case["block"], case["img"], tokens), block_ref)


@pytest.mark.parametrize("variant,index", [(v, i) for v, cases in GUIDED.items() for i in range(len(cases))])
def test_guided_dit_matches_comfy(setup, variant, index):
    """Our DiT with the blockwise patch == ComfyUI's DiT with the patch its QwenImageDiffsynthControlnet node
    builds (strength, batch-1 control image for a batch-2 latent, inpaint mask resized bilinearly)."""
    entry = setup["patches"][variant]
    case, expected = entry["guided"][index], entry["guided_outputs"][index]
    control = load_blockwise_control(entry["path"])
    latent = normalize(case["raw"])
    if variant == "inpaint":
        latent = blockwise_inpaint_latent(latent, case["mask"])
    dit = setup["dit"]
    patch = control.patch(control.encode(latent), case["strength"])
    got = dit(case["x"], case["timestep"], case["context"], block_patches=[patch])
    assert_close(got, expected, floor=0.5)
    assert (dit(case["x"], case["timestep"], case["context"]) - expected).abs().max() > 1e-3  # the patch matters


def test_strength_zero_gives_the_uncontrolled_output(setup):
    control = load_blockwise_control(setup["patches"]["canny"]["path"])
    dit = setup["dit"]
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, TINY_DIT["joint_attention_dim"], generator=g)
    tokens = control.encode(torch.randn(1, 16, 8, 8, generator=g))
    torch.testing.assert_close(dit(x, 0.4, ctx, block_patches=[control.patch(tokens, 0.0)]), dit(x, 0.4, ctx),
                               atol=0, rtol=0)


def test_inpaint_without_mask_keeps_everything():
    latent = torch.randn(2, 16, 6, 8)
    assert torch.equal(blockwise_inpaint_latent(latent)[:, 16], torch.ones(2, 6, 8))
    full = blockwise_inpaint_latent(latent, torch.ones(1, 48, 64))
    assert full.shape == (2, 17, 6, 8) and full[:, 16].eq(0).all()


def test_bf16_file_close_to_fp32(setup):
    root = setup["root"]
    fp32 = load_blockwise_control(setup["patches"]["depth"]["path"])
    bf16 = load_blockwise_control(make_blockwise_control(root / "bf16", variant="depth"), dtype=torch.bfloat16)
    assert bf16.controlnet_blocks[0].input_proj.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(6)
    latent, img = torch.randn(1, 16, 8, 8, generator=g), torch.randn(2, 16, WIDTH, generator=g)
    expected = fp32.block_residual(1, img, fp32.encode(latent))
    got = bf16.block_residual(1, img.bfloat16(), bf16.encode(latent)).float()
    rel = ((got - expected).norm() / expected.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    assert rel < 3e-2 and cos > 0.999, (rel, cos)


def test_rejects_wrong_inputs(setup):
    control = load_blockwise_control(setup["patches"]["canny"]["path"])
    tokens = control.encode(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="has 2 blocks"):
        control.block_residual(2, torch.randn(1, 16, WIDTH), tokens)
    with pytest.raises(ValueError, match="target latent's size"):
        control.block_residual(0, torch.randn(1, 12, WIDTH), tokens)
    with pytest.raises(ValueError, match=r"\[B, 16, H, W\]"):
        control.encode(torch.randn(1, 17, 8, 8))


@pytest.mark.parametrize("kind,expected", [("controlnet", "InstantX"), ("dit", "diffusion model")])
def test_refuses_other_files(setup, kind, expected):
    root = setup["root"]
    path = make_controlnet(root / "cn", layout="comfy") if kind == "controlnet" else setup["dit_path"]
    with pytest.raises(WeightFileError, match=expected) as error:
        load_blockwise_control(path)
    assert "blockwise" in str(error.value)
