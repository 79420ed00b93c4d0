"""EliGen entity control (models/qwen_image/eligen.py and the DiT's ``entities``) against DiffSynth-Studio
(``diffsynth`` 2.1.12, the reference implementation) on tiny weights, fp32 on the CPU.

DiffSynth's Qwen-Image DiT is built here from DiffSynth's own classes at the tiny widths and loaded with the same
weights as ours.  One deviation of DiffSynth from the Qwen-Image reference is not EliGen's: its feed-forward uses
the sigmoid approximation of GELU (``x * sigmoid(1.702 x)``) where Qwen-Image (diffusers, the Qwen team's
reference, and ComfyUI core) uses the tanh one.  We follow the model's reference; the forward parity runs DiffSynth
with the tanh GELU, and the size of that deviation is printed beside it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from models.qwen_image.eligen import Entities, entity_attention_mask, region_tokens
from test_dit import make_reference, ours_from
from tiny_models.configs import TINY_DIT

ds_dit = pytest.importorskip("diffsynth.models.qwen_image_dit", reason="the EliGen reference (pip install diffsynth)")
from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings  # noqa: E402
from diffsynth.pipelines.qwen_image import (QwenImagePipeline, QwenImageUnit_EntityControl,  # noqa: E402
                                            model_fn_qwen_image)

JOINT = TINY_DIT["joint_attention_dim"]


def diffsynth_dit(state: dict) -> torch.nn.Module:
    """DiffSynth's ``QwenImageDiT`` at the tiny widths (its constructor hard-codes the 20 B sizes), from its own
    layer classes, loaded strictly with ``state`` (diffusers names, which DiffSynth uses as they are)."""
    width = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]
    dit = ds_dit.QwenImageDiT.__new__(ds_dit.QwenImageDiT)
    torch.nn.Module.__init__(dit)
    dit.pos_embed = ds_dit.QwenEmbedRope(theta=10000, axes_dim=list(TINY_DIT["axes_dims_rope"]), scale_rope=True)
    dit.time_text_embed = TimestepEmbeddings(256, width, diffusers_compatible_format=True, scale=1000,
                                             align_dtype_to_timestep=False, use_additional_t_cond=False)
    dit.txt_norm = RMSNorm(JOINT, eps=1e-6)
    dit.img_in = torch.nn.Linear(TINY_DIT["in_channels"], width)
    dit.txt_in = torch.nn.Linear(JOINT, width)
    dit.transformer_blocks = torch.nn.ModuleList(
        ds_dit.QwenImageTransformerBlock(width, TINY_DIT["num_attention_heads"], TINY_DIT["attention_head_dim"])
        for _ in range(TINY_DIT["num_layers"]))
    dit.norm_out = AdaLayerNorm(width, single=True)
    dit.proj_out = torch.nn.Linear(width, TINY_DIT["in_channels"])
    dit.load_state_dict(state, strict=True)
    return dit.eval()


@contextlib.contextmanager
def tanh_gelu():
    """DiffSynth's feed-forward with Qwen-Image's GELU (tanh approximation) instead of ``x * sigmoid(1.702 x)``."""
    original = ds_dit.ApproximateGELU.forward
    ds_dit.ApproximateGELU.forward = lambda self, x: F.gelu(self.proj(x), approximate="tanh")
    try:
        yield
    finally:
        ds_dit.ApproximateGELU.forward = original


def mask_image(size: tuple[int, int], boxes: list[tuple[int, int, int, int]], ellipse: bool = False) -> Image.Image:
    """An RGB mask (white inside) as users draw them; DiffSynth takes RGB masks."""
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for box in boxes:
        (draw.ellipse if ellipse else draw.rectangle)(box, fill=(255, 255, 255))
    return image


def as_mask(image: Image.Image) -> torch.Tensor:
    """``[H, W]`` in [0, 1]: the mean of the channels (what our node makes of an IMAGE mask)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).mean(-1)


# (image width, height), the masks' own size and their shapes: masks need not have the image's size.
CASES = [
    ((128, 96), (128, 96), [[(0, 0, 60, 40)], [(50, 30, 127, 95)]], False),
    ((64, 160), (101, 77), [[(10, 5, 60, 30)], [(0, 40, 100, 76)], [(30, 20, 70, 60)]], True),
    ((96, 96), (512, 512), [[(100, 100, 300, 420)], [(0, 0, 511, 120)]], False),
]


def diffsynth_inputs(size, mask_size, shapes, ellipse, seed=0, text_lengths=(5, 9, 3, 7)):
    """Entity prompt embeddings and DiffSynth's preprocessed masks for one case."""
    width, height = size
    g = torch.Generator().manual_seed(seed)
    images = [mask_image(mask_size, boxes, ellipse) for boxes in shapes]
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    masks = QwenImageUnit_EntityControl().preprocess_masks(pipe, images, height // 8, width // 8, 1)
    contexts = [torch.randn(1, text_lengths[i % len(text_lengths)], JOINT, generator=g) for i in range(len(images))]
    return images, torch.cat(masks, dim=0).unsqueeze(0), contexts


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("references", [0, 1])
def test_attention_mask_equals_diffsynth(case, references):
    size, mask_size, shapes, ellipse = CASES[case]
    width, height = size
    images, ds_masks, contexts = diffsynth_inputs(size, mask_size, shapes, ellipse)
    global_len = 6
    latents = torch.zeros(1, 16, height // 8, width // 8)
    grid = (height // 16, width // 16)
    img_shapes = [(1, *grid)] * (1 + references)
    image = torch.zeros(1, grid[0] * grid[1] * (1 + references), 8)
    dit = diffsynth_dit(make_reference().state_dict())
    with torch.no_grad():
        _, _, theirs = dit.process_entity_masks(
            latents, torch.randn(1, global_len, JOINT), torch.ones(1, global_len, dtype=torch.long), contexts,
            [torch.ones(1, c.shape[1], dtype=torch.long) for c in contexts], ds_masks, height, width, image,
            img_shapes)
    regions = region_tokens([as_mask(m) for m in images], (height // 8, width // 8), 2,
                            [grid] * references)
    ours = entity_attention_mask([c.shape[1] for c in contexts] + [global_len], regions)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs == 0), f"{(ours != (theirs == 0)).sum()} entries differ"
    assert 0 < regions.float().mean() < 1  # the masks cut the image


def test_padded_global_tokens_are_hidden_from_every_query():
    regions = torch.tensor([[True, False, True, False]])
    keep = torch.tensor([[1, 1, 0]])
    mask = entity_attention_mask([2, 3], regions, keep)
    assert not mask[0, 0, :, 4].any()  # the padded global token (position 2 + 2) is nobody's key
    assert mask[0, 0, :, 3].sum() == 3 + 4  # the others see the global text: its 3 tokens and the 4 image tokens


def test_entities_need_one_mask_per_prompt():
    with pytest.raises(ValueError, match="one mask"):
        Entities((torch.zeros(1, 3, JOINT),), (torch.zeros(8, 8), torch.zeros(8, 8)))
    with pytest.raises(ValueError, match="at least one entity"):
        Entities((), ())


def _forward_pair(case: int, references: int, seed: int = 3):
    size, mask_size, shapes, ellipse = CASES[case]
    width, height = size
    images, ds_masks, contexts = diffsynth_inputs(size, mask_size, shapes, ellipse, seed=seed)
    reference = make_reference(seed)
    ours = ours_from(reference)
    theirs = diffsynth_dit(reference.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 16, height // 8, width // 8, generator=g)
    refs = [torch.randn(1, 16, height // 8, width // 8, generator=g) for _ in range(references)]
    context = torch.randn(1, 6, JOINT, generator=g) * 2
    sigma = torch.tensor([0.63])
    entities = Entities(tuple(contexts), tuple(as_mask(m) for m in images))

    def run_theirs():
        with torch.no_grad():
            return model_fn_qwen_image(
                dit=theirs, latents=x, timestep=sigma * 1000, prompt_emb=context,
                prompt_emb_mask=torch.ones(1, 6, dtype=torch.long), height=height, width=width,
                entity_prompt_emb=contexts, entity_prompt_emb_mask=[torch.ones(1, c.shape[1], dtype=torch.long)
                                                                    for c in contexts],
                entity_masks=ds_masks, edit_latents=refs or None)

    mine = ours(x, sigma, context, ref_latents=refs or None, entities=entities)
    plain = ours(x, sigma, context, ref_latents=refs or None)
    return mine, plain, run_theirs


@pytest.mark.parametrize("case,references", [(0, 0), (1, 0), (2, 1)])
def test_dit_forward_with_entities_equals_diffsynth(case, references):
    mine, plain, run_theirs = _forward_pair(case, references)
    with tanh_gelu():
        theirs = run_theirs()
    error = (mine - theirs).abs().max().item()
    sigmoid_gelu = (mine - run_theirs()).abs().max().item()
    print(f"EliGen DiT forward vs DiffSynth: max abs {error:.2e} (|out| max {theirs.abs().max():.2f}); "
          f"DiffSynth's own sigmoid GELU differs by {sigmoid_gelu:.2e}")
    assert error <= 1e-5
    assert (mine - plain).abs().max() > 1e-2  # the entities really changed the output


def test_entities_apply_to_every_item_of_a_batch():
    mine, _, _ = _forward_pair(0, 0)
    size, mask_size, shapes, ellipse = CASES[0]
    images, _, contexts = diffsynth_inputs(size, mask_size, shapes, ellipse, seed=3)
    reference = make_reference(3)
    ours = ours_from(reference)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 12, 16, generator=g)
    context = torch.randn(1, 6, JOINT, generator=g) * 2
    entities = Entities(tuple(contexts), tuple(as_mask(m) for m in images))
    batched = ours(x.expand(2, -1, -1, -1), torch.tensor([0.63, 0.63]), context.expand(2, -1, -1),
                   entities=entities)
    torch.testing.assert_close(batched[0], mine[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1], mine[0], rtol=0, atol=1e-5)
