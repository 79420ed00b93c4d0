"""models.common.attention: every attention call of the DiT, the text encoder and the VAE goes through one function,
and a kernel supplied through the run options reaches all of them (the seam a host plugs its backends into)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from models import load_diffusion_model, load_text_encoder, load_vae
from models.common.attention import ATTENTION_KERNEL
from references import host_tokenizer_dir
from tiny_models.configs import TINY_DIT
from tiny_models.factory import make_dit, make_text_encoder, make_vae


class RecordingKernel:
    """SDPA, counting calls by the shape of the query (which tells the calling model apart)."""

    def __init__(self, scale: float = 1.0):
        self.calls: Counter = Counter()
        self.scale = scale

    def __call__(self, q, k, v, *, mask, causal, options):
        assert options[ATTENTION_KERNEL] is self  # the caller's options reach the kernel untouched
        self.calls["causal" if causal else "full"] += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal) * self.scale


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("seam")
    return {"dit": make_dit(root, dtype="fp32", seed=1), "vae": make_vae(root, dtype="fp32", seed=1),
            "te": make_text_encoder(root, dtype="fp32", seed=1)}


def _dit_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 16, 8, 10, generator=g)
    ref = torch.randn(batch, 16, 6, 6, generator=g)
    context = torch.randn(batch, 7, TINY_DIT["joint_attention_dim"], generator=g)
    return x, torch.tensor([0.7] * batch), context, [ref]


def test_dit_attention_goes_through_the_options(files):
    dit = load_diffusion_model(files["dit"])
    x, t, context, refs = _dit_inputs()
    plain = dit(x, t, context, ref_latents=refs)
    kernel = RecordingKernel()
    seamed = dit(x, t, context, ref_latents=refs, options={ATTENTION_KERNEL: kernel})
    assert torch.equal(plain, seamed)  # SDPA through the seam is bit-identical
    assert kernel.calls == Counter(full=TINY_DIT["num_layers"])  # one joint attention per block
    changed = dit(x, t, context, ref_latents=refs, options={ATTENTION_KERNEL: RecordingKernel(scale=0.5)})
    assert not torch.allclose(plain, changed)  # the kernel's output is what the blocks use


def test_text_encoder_attention_goes_through_the_options(files):
    encoder = load_text_encoder(files["te"], tokenizer=host_tokenizer_dir())
    image = torch.rand(56, 84, 3, generator=torch.Generator().manual_seed(2))
    plain, _ = encoder.encode("a cat", images=[image], template="edit")
    kernel = RecordingKernel()
    seamed, _ = encoder.encode("a cat", images=[image], template="edit", options={ATTENTION_KERNEL: kernel})
    assert torch.equal(plain, seamed)
    text_layers = encoder.model.model.config.num_layers
    vision_blocks = encoder.model.visual.config.depth
    assert kernel.calls["causal"] == text_layers
    assert kernel.calls["full"] >= vision_blocks  # one call per block and group of equally long windows
    changed, _ = encoder.encode("a cat", images=[image], template="edit",
                                options={ATTENTION_KERNEL: RecordingKernel(scale=0.5)})
    assert not torch.allclose(plain, changed)


def test_vae_attention_goes_through_the_options(files):
    vae = load_vae(files["vae"])
    images = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(3))
    kernel = RecordingKernel()
    latent = vae.encode(images)
    assert torch.equal(latent, vae.encode(images, options={ATTENTION_KERNEL: kernel}))
    assert torch.equal(vae.decode(latent), vae.decode(latent, options={ATTENTION_KERNEL: kernel}))
    assert kernel.calls == Counter(full=2)  # the encoder's and the decoder's mid-block
    tiled = vae.decode(latent, tiled=True, tile_size=16, options={ATTENTION_KERNEL: kernel})
    assert torch.allclose(tiled, vae.decode(latent), atol=1e-5) and kernel.calls["full"] == 3
    halved = RecordingKernel(scale=0.5)
    assert not torch.allclose(vae.decode(latent, options={ATTENTION_KERNEL: halved}), vae.decode(latent))


def test_a_block_hook_sees_every_block_and_can_replace_one(files):
    from models import BLOCK_HOOK

    dit = load_diffusion_model(files["dit"])
    x, t, context, refs = _dit_inputs()
    plain = dit(x, t, context, ref_latents=refs)
    seen = []

    def passthrough(call):
        seen.append(call.index)
        return call.run(call.img, call.txt, call.temb, call.rope)

    assert torch.equal(dit(x, t, context, ref_latents=refs, options={BLOCK_HOOK: passthrough}), plain)
    assert seen == list(range(TINY_DIT["num_layers"]))

    def skip_last(call):
        if call.index == TINY_DIT["num_layers"] - 1:
            return call.img, call.txt  # the block replaced by the identity
        return call.run(call.img, call.txt, call.temb, call.rope)

    assert not torch.allclose(dit(x, t, context, ref_latents=refs, options={BLOCK_HOOK: skip_last}), plain)


def test_the_dit_traces_under_torch_compile(files):
    """The RoPE no longer writes through a complex view of a strided slice, which torch.compile could not trace
    (ComfyUI's TorchCompileModel failed at the first step in fp32)."""
    dit = load_diffusion_model(files["dit"])
    x, t, context, refs = _dit_inputs()
    compiled = torch.compile(dit, backend="aot_eager", fullgraph=False)
    assert torch.allclose(compiled(x, t, context, ref_latents=refs), dit(x, t, context, ref_latents=refs), atol=1e-6)
