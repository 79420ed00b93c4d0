"""The Qwen-Image 2.1 DiT (models.qwen_image_2_1): parity with diffusers' QwenImage21Transformer2DModel, the prefix
KV cache, and loading every layout of the tiny factory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImage21Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

import models.qwen_image_2_1.dit as dit_module
from models import WeightFileError, load_diffusion_model
from models.common.attention import ATTENTION_KERNEL
from models.io.gguf import GGUFError, QuantizedTensor
from models.io.weights import FLOAT8_DTYPES
from models.qwen_image_2_1.dit import AttentionPlan, DiT21Config, prefix_layout
from models.qwen_image_2_1.dit_loader import dit_2_1_from_tensors, load_diffusion_model_2_1
from models.qwen_image_2_1.prefix_cache import PrefixCache
from test_dit_loading import dequantized_state_dict
from tiny_models.factory import make_dit
from tiny_models.gguf_factory import make_dit_gguf
from tiny_models.qwen_image_2_1 import TINY_DIT_2_1, dit_2_1_weights, make_dit_2_1

ATOL = 1e-5
CACHE_ATOL = 1e-6
CHANNELS, CONTEXT = TINY_DIT_2_1["in_channels"], TINY_DIT_2_1["context_in_dim"]
# The joint sequence as runs: text token counts and condition-image latent grids, in order.
TWO_IMAGES = (3, (4, 4), 2, (2, 6), 5)
NEGATIVE = (3, (4, 4), 2, (2, 6), 1)


@dataclass
class Case:
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor | None
    slots: list[bool]
    refs: list[torch.Tensor]

    def ours(self, model, **kwargs) -> torch.Tensor:
        return model(self.x, self.t, self.context, context_mask=self.mask, ref_latents=self.refs,
                     image_slots=torch.tensor(self.slots), **kwargs)


def make_case(runs=TWO_IMAGES, batch: int = 1, pad: int = 0, height: int = 4, width: int = 6, seed: int = 1,
              x: torch.Tensor | None = None, refs: list[torch.Tensor] | None = None) -> Case:
    """Inputs laid out like the pipeline's: ``runs`` of text and condition images (h*w/4 slots each); ``pad``
    right-padded positions in the last sample."""
    g = torch.Generator().manual_seed(seed)
    slots = [s for run in runs for s in ([False] * run if isinstance(run, int) else [True] * (run[0] * run[1] // 4))]
    grids = [run for run in runs if not isinstance(run, int)]
    context = torch.randn(batch, len(slots), CONTEXT, generator=g) * 2
    mask = None
    if pad:
        mask = torch.ones(batch, len(slots), dtype=torch.bool)
        mask[-1, -pad:] = False
    if refs is None:
        refs = [torch.randn(batch, CHANNELS, h, w, generator=g) for h, w in grids]
    if x is None:
        x = torch.randn(batch, CHANNELS, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 0.9 + 0.05
    return Case(x, t, context, mask, slots, refs)


def run_reference(reference, case: Case, cache=None, mode=None) -> torch.Tensor:
    """diffusers' transformer called the way QwenImage21Pipeline calls it; the target velocity [B, C, H, W]."""
    batch, _, height, width = case.x.shape
    pack = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731 - 2.1 packs latents unpatched
    hidden = torch.cat([pack(r) for r in case.refs] + [pack(case.x)], dim=1)
    img_mask = torch.tensor(case.slots + [True] * (height * width // 4))[None].expand(batch, -1)
    shapes = [[(1, r.shape[2], r.shape[3]) for r in case.refs] + [(1, height, width)]] * batch
    with torch.no_grad():
        out = reference(hidden_states=hidden, encoder_hidden_states=case.context, timestep=case.t, img_shapes=shapes,
                        img_mask=img_mask, encoder_hidden_states_mask=case.mask, kv_cache=cache, kv_cache_mode=mode,
                        return_dict=False)[0]
    return out[:, -height * width:].transpose(1, 2).reshape(batch, -1, height, width)


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.5, "reference output too small to be a meaningful comparison"
    return (ours - ref).abs().max().item()


def reference_model(weights: dict, **overrides) -> QwenImage21Transformer2DModel:
    model = QwenImage21Transformer2DModel(**{**TINY_DIT_2_1, **overrides}).eval()
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def weights():
    return dit_2_1_weights(seed=0)


@pytest.fixture(scope="module")
def pair(weights):
    return reference_model(weights), dit_2_1_from_tensors(weights)


# -- parity ---------------------------------------------------------------------------------------------------------
PARITY_CASES = {
    "text only": dict(runs=(9,)),
    "one condition image": dict(runs=(3, (4, 6), 4)),
    "two images of different sizes": dict(runs=TWO_IMAGES, height=6, width=4),
    "two adjacent images": dict(runs=(2, (2, 2), (4, 2), 3)),  # one run of slots, two blocks
    "batch 2": dict(runs=TWO_IMAGES, batch=2),
    "batch 2, padded text": dict(runs=TWO_IMAGES, batch=2, pad=3),
    "text only, padded": dict(runs=(9,), batch=2, pad=4),
}


@pytest.mark.parametrize("name", PARITY_CASES)
def test_matches_reference(pair, name):
    reference, ours = pair
    case = make_case(**PARITY_CASES[name])
    assert max_error(case.ours(ours), run_reference(reference, case)) <= ATOL


def test_matches_reference_without_causal_condition(weights):
    reference = reference_model(weights, causal_condition=False)
    ours = dit_2_1_from_tensors(weights, config_json={**TINY_DIT_2_1, "causal_condition": False})
    assert not ours.config.causal_condition
    case = make_case(batch=2)
    assert max_error(case.ours(ours), run_reference(reference, case)) <= ATOL
    # control: the flag matters, so the parity tests see a wrong modulation of the prefix
    assert max_error(case.ours(dit_2_1_from_tensors(weights)), run_reference(reference, case)) > 100 * ATOL
    with pytest.raises(ValueError, match="causal_condition"):
        case.ours(ours, kv_cache=PrefixCache())


def naive_kernel(q, k, v, *, mask, causal, options):
    """Attention by a plain softmax, as some host kernels compute it: a query with no key left gives NaN."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_padding_anywhere_is_never_attended(pair):
    """Right padding (the pipeline's) is covered by the parity cases; padding at the start or in the middle must
    not reach the output either, and no query is left without keys (a NaN in host kernels)."""
    _, ours = pair
    case = make_case(batch=2)
    case.mask = torch.ones(2, len(case.slots), dtype=torch.bool)
    case.mask[1, :2] = False  # before the first image
    case.mask[1, -3] = False  # inside the last text run
    out = case.ours(ours)
    assert torch.isfinite(out).all()
    assert (case.ours(ours, options={ATTENTION_KERNEL: naive_kernel}) - out).abs().max().item() <= ATOL
    case.context[1, :2] = torch.randn(2, CONTEXT) * 5
    case.context[1, -3] = -case.context[1, -3]
    assert (case.ours(ours) - out).abs().max().item() <= CACHE_ATOL
    case.mask = None  # control: the padded positions do matter unmasked
    assert (case.ours(ours) - out)[1].abs().max().item() > 1e-3


def test_block_causal_mask_matters(pair, monkeypatch):
    """Control: the same model with a bidirectional prefix (one segment over all prefix keys) leaves the reference
    by far more than the tolerance, so the parity tests above see the mask."""
    reference, ours = pair
    case = make_case(batch=2)
    expected = run_reference(reference, case)
    plan = dit_module.attention_plan

    def bidirectional(pieces, *args):
        found = plan(pieces, *args)
        end = sum(p.length for p in pieces)
        return AttentionPlan([(0, end, None, False)] if found.segments else [], found.target_mask)

    monkeypatch.setattr(dit_module, "attention_plan", bidirectional)
    assert max_error(case.ours(ours), expected) > 100 * ATOL


def test_text_is_causal_and_images_see_their_whole_block(pair):
    """Changing the last text token leaves every earlier prefix key unchanged; changing a condition image's last
    token changes that image's first key (bidirectional block) but no earlier one."""
    _, ours = pair
    case = make_case()
    grids = [r.shape[-2:] for r in case.refs]
    prefix_len = len(case.slots) - sum(case.slots) + sum(h * w for h, w in grids)

    def block_1_keys(context, refs):
        """Block 1's prefix keys of sample 0 ``[heads, P, head_dim]`` (block 0's do not mix tokens yet)."""
        cache = PrefixCache()
        ours(case.x, case.t, context, ref_latents=refs, image_slots=torch.tensor(case.slots), kv_cache=cache)
        (entry,) = cache.entries
        return entry.layers[1][0][0]

    base = block_1_keys(case.context, case.refs)
    context = case.context.clone()
    context[:, -1] += 1.0
    changed = block_1_keys(context, case.refs)
    assert (changed[:, :prefix_len - 1] - base[:, :prefix_len - 1]).abs().max() <= CACHE_ATOL
    assert (changed[:, -1] - base[:, -1]).abs().max() > 1e-3

    first_image = case.refs[0].clone()
    first_image[..., -1, -1] += 1.0  # the last token of image 0, which starts after 3 text tokens
    changed = block_1_keys(case.context, [first_image, case.refs[1]])
    assert (changed[:, :3] - base[:, :3]).abs().max() <= CACHE_ATOL
    assert (changed[:, 3] - base[:, 3]).abs().max() > 1e-3


def test_every_attention_call_goes_through_the_options_kernel(pair):
    _, ours = pair
    case = make_case(batch=2, pad=2)
    calls = []

    def kernel(q, k, v, *, mask, causal, options):
        calls.append((q.shape[2], k.shape[2]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    options = {ATTENTION_KERNEL: kernel}
    expected = case.ours(ours)
    cache = PrefixCache()
    assert torch.equal(case.ours(ours, options=options, kv_cache=cache), expected)
    depth, runs, last = ours.config.depth, len(TWO_IMAGES), ours.config.depth - 1
    assert len(calls) == depth + runs * last  # the target in every block; the prefix runs except in the last
    calls.clear()
    case.ours(ours, options=options, kv_cache=cache)
    assert len(calls) == depth and all(q == 24 for q, _ in calls)  # cached: the target's 4x6 queries only


# -- the prefix cache -----------------------------------------------------------------------------------------------
def test_cache_over_a_cfg_sampling_run_matches_no_cache_and_the_reference(pair):
    """An 8-step Euler run with true CFG (different prompt lengths, two condition images, batch 2, padded
    positive prompt): one PrefixCache serves both branches; every step equals the uncached forward and diffusers'
    own extract-then-cached path, and only the first step computes a prefix."""
    reference, ours = pair
    positive = make_case(batch=2, pad=2, seed=3)
    negative = make_case(NEGATIVE, batch=2, seed=4, x=positive.x, refs=positive.refs)
    cache = PrefixCache()
    depth = TINY_DIT_2_1["num_layers"]
    reference_caches = {id(positive): QwenImage21KVCache(depth), id(negative): QwenImage21KVCache(depth)}
    prefix_runs = []
    hook = ours.txt_in.register_forward_hook(lambda *_: prefix_runs.append(1))
    sigmas = torch.linspace(1.0, 0.0, 9)
    x = positive.x.clone()
    try:
        for step in range(8):
            velocities = []
            for case in (positive, negative):
                case.x, case.t = x, sigmas[step].expand(2)
                uncached = case.ours(ours)
                prefix_runs.clear()
                cached = case.ours(ours, kv_cache=cache)
                assert bool(prefix_runs) == (step == 0)
                assert (cached - uncached).abs().max().item() <= CACHE_ATOL
                mode = "extract" if step == 0 else "cached"
                assert max_error(cached, run_reference(reference, case, reference_caches[id(case)], mode)) <= ATOL
                velocities.append(uncached)
            assert len(cache) == 2
            cond, uncond = velocities
            x = x + (sigmas[step + 1] - sigmas[step]) * (uncond + 4.0 * (cond - uncond))
    finally:
        hook.remove()


def test_cache_entries_follow_their_inputs(pair):
    """A changed prompt, condition image or mask makes a new entry, never a stale answer."""
    _, ours = pair
    case = make_case(batch=2)
    expected = case.ours(ours)
    cache = PrefixCache(max_entries=1)
    case.ours(ours, kv_cache=cache)
    other = make_case(batch=2, seed=7, x=case.x, refs=case.refs)  # another prompt, same layout
    assert max_error(other.ours(ours, kv_cache=cache), other.ours(ours)) <= CACHE_ATOL
    assert len(cache) == 1
    assert torch.equal(case.ours(ours, kv_cache=cache), expected)
    case.refs[0].add_(0.5)  # a host reusing its buffers in place: the cache owns copies of its keys
    assert max_error(case.ours(ours, kv_cache=cache), case.ours(ours)) <= CACHE_ATOL
    case.mask = torch.ones(2, len(case.slots), dtype=torch.bool)
    case.mask[0, -2:] = False
    assert max_error(case.ours(ours, kv_cache=cache), case.ours(ours)) <= CACHE_ATOL


def test_cache_storage_device_and_size(pair):
    _, ours = pair
    case = make_case(batch=2)
    expected = case.ours(ours)
    cache = PrefixCache(storage_device="cpu")
    case.ours(ours, kv_cache=cache)
    config = ours.config
    prefix = len(case.slots) - sum(case.slots) + sum(r.shape[2] * r.shape[3] for r in case.refs)
    assert cache.nbytes == config.depth * 2 * 2 * config.width * prefix * 4  # depth x (k, v) x B x width x P fp32
    assert cache.to("cpu") is cache and cache.storage_device == torch.device("cpu")
    assert torch.equal(case.ours(ours, kv_cache=cache), expected)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_bf16_matches_fp32_reference(pair, weights):
    reference, _ = pair
    ours = dit_2_1_from_tensors(weights, dtype=torch.bfloat16)
    case = make_case(batch=2, pad=2)
    expected = run_reference(reference, case)
    out = case.ours(ours)
    assert out.dtype == torch.float32
    rel = ((out - expected).norm() / expected.norm()).item()
    cos = F.cosine_similarity(out.flatten(), expected.flatten(), dim=0).item()
    assert rel < 3e-2 and cos > 0.999, (rel, cos)
    cache = PrefixCache()
    case.ours(ours, kv_cache=cache)
    assert (case.ours(ours, kv_cache=cache) - out).abs().max().item() <= CACHE_ATOL


# -- the layout of the joint sequence -------------------------------------------------------------------------------
def test_prefix_layout_and_its_errors():
    slots = [False] * 2 + [True] * 6 + [False]  # one run of 6 slots: a 4x4 (4 slots) and a 2x4 image (2 slots)
    pieces = prefix_layout(len(slots), slots, [(4, 4), (2, 4)])
    assert [(p.image, p.start, p.length) for p in pieces] == [(-1, 0, 2), (0, 2, 16), (1, 6, 8), (-1, 8, 1)]
    with pytest.raises(ValueError, match="needs 4 image slots, the context has 2 left"):
        prefix_layout(len(slots), slots, [(4, 4), (4, 4)])
    with pytest.raises(ValueError, match="more than the 1 condition latent"):
        prefix_layout(len(slots), slots, [(4, 4)])
    with pytest.raises(ValueError, match="3 condition latents but the context holds image slots for 2"):
        prefix_layout(len(slots), slots, [(4, 4), (2, 4), (2, 2)])
    with pytest.raises(ValueError, match="image_slots"):
        prefix_layout(4, None, [(2, 2)])
    with pytest.raises(ValueError, match="no condition latents"):
        prefix_layout(len(slots), slots, [])
    for grid in ((3, 3), (0, 4)):
        with pytest.raises(ValueError, match="whole number"):
            prefix_layout(len(slots), slots, [grid])


def test_forward_refuses_mismatched_inputs(pair):
    _, ours = pair
    case = make_case(batch=2)
    with pytest.raises(ValueError, match="same positions"):
        ours(case.x, case.t, case.context, ref_latents=case.refs,
             image_slots=torch.stack([torch.tensor(case.slots), torch.tensor(case.slots).roll(1)]))
    with pytest.raises(ValueError, match="latent"):
        ours(case.x[:, :16], case.t, case.context)
    with pytest.raises(ValueError, match="context"):
        ours(case.x, case.t, case.context[..., :16])


# -- loading --------------------------------------------------------------------------------------------------------
LAYOUTS = {
    "comfy bf16": dict(layout="comfy", dtype="bf16"),
    "comfy fp32 prefixed": dict(layout="comfy", dtype="fp32", prefix=True),
    "comfy fp16": dict(layout="comfy", dtype="fp16"),
    "comfy fp8_e4m3fn prefixed": dict(layout="comfy", dtype="fp8_e4m3fn", prefix=True),
    "comfy fp8_e5m2": dict(layout="comfy", dtype="fp8_e5m2"),
    "comfy fp8 scaled": dict(layout="comfy", dtype="fp8_e4m3fn_scaled", prefix=True),
    "diffusers bf16": dict(layout="diffusers", dtype="bf16"),
    "diffusers pipeline folder": dict(layout="diffusers", dtype="fp32"),
    "gguf Q8_0": dict(layout="gguf", dtype="Q8_0"),
}


def file_weights(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights a file stands for, read independently (safetensors itself; gguf-py for GGUF)."""
    if path.suffix == ".gguf":
        reader = gguf.GGUFReader(str(path))
        return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
                for t in reader.tensors}
    return dequantized_state_dict(path)


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_loads_and_matches_its_weights(tmp_path, name):
    spec = LAYOUTS[name]
    path = make_dit_2_1(tmp_path, seed=2, **spec)
    if name == "diffusers pipeline folder":
        path = path.parent
    model = load_diffusion_model_2_1(path)
    assert model.config == DiT21Config(depth=3, heads=2, head_dim=32, context_dim=CONTEXT, axes_dim=(4, 14, 14))
    q = model.transformer_blocks[0].attn.to_q
    if "fp8" in name:
        assert q.weight.dtype in FLOAT8_DTYPES and hasattr(q, "scale_weight") == ("scaled" in name)
    assert isinstance(q.weight, QuantizedTensor) == (spec["layout"] == "gguf")
    case = make_case()
    expected = run_reference(reference_model(file_weights(path)), case)
    assert max_error(case.ours(model), expected) <= ATOL


def test_fp8_weights_stay_fp8_and_bf16_compute_is_close(tmp_path):
    path = make_dit_2_1(tmp_path, dtype="fp8_e4m3fn", seed=2)
    model = load_diffusion_model_2_1(path, dtype=torch.bfloat16)
    linears = [p for n, p in model.named_parameters() if n.startswith("transformer_blocks") and p.ndim == 2]
    assert len(linears) == 3 * 7 and all(p.dtype == torch.float8_e4m3fn for p in linears)
    assert model.txt_in.text_norm.weight.dtype == torch.bfloat16
    case = make_case(batch=2)
    expected = run_reference(reference_model(file_weights(path)), case)
    out = case.ours(model)
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < 3e-2, rel


def test_config_json_wins_and_must_agree_with_the_shapes(tmp_path):
    folder = make_dit_2_1(tmp_path, layout="diffusers", dtype="fp32", seed=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [8, 12, 12]}))
    model = load_diffusion_model_2_1(folder)
    assert model.config.axes_dim == (8, 12, 12)
    case = make_case()
    expected = run_reference(reference_model(file_weights(folder), axes_dims_rope=(8, 12, 12)), case)
    assert max_error(case.ours(model), expected) <= ATOL
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(WeightFileError, match="num_attention_heads 4"):
        load_diffusion_model_2_1(folder)


def test_a_qwen_image_1_dit_is_refused_by_name(tmp_path):
    for path in (make_dit(tmp_path, dtype="bf16", prefix=True), make_dit(tmp_path, layout="diffusers")):
        with pytest.raises(WeightFileError) as error:
            load_diffusion_model_2_1(path)
        message = str(error.value)
        assert "this is a Qwen-Image diffusion model (DiT), not a Qwen-Image 2.1 diffusion model (DiT)" in message
        assert "txt_in.in_layer.weight" in message
    with pytest.raises(GGUFError, match="Qwen-Image diffusion model"):
        load_diffusion_model_2_1(make_dit_gguf(tmp_path, qtype="Q8_0"))


def test_the_1x_loader_names_a_2_1_file(tmp_path):
    path = make_dit_2_1(tmp_path)
    with pytest.raises(WeightFileError, match="this is a Qwen-Image 2.1 .*, not a Qwen-Image diffusion model"):
        load_diffusion_model(path, family="qwen_image")  # pinned to 1.x (unpinned, a 2.1 file loads)


def test_same_seed_same_bytes_and_layouts_agree(tmp_path):
    a = make_dit_2_1(tmp_path / "a", dtype="fp32", seed=5)
    b = make_dit_2_1(tmp_path / "b", dtype="fp32", seed=5)
    assert a.read_bytes() == b.read_bytes()
    folder = make_dit_2_1(tmp_path / "c", layout="diffusers", dtype="fp32", seed=5)
    single, sharded = file_weights(a), file_weights(folder)
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    norms = {k: v for k, v in single.items() if "norm" in k}
    assert norms and not any(torch.equal(v, torch.ones_like(v)) or torch.equal(v, torch.zeros_like(v))
                             for v in norms.values())
