"""The Qwen-Image 2.1 VAE against diffusers' AutoencoderKLQwenImage21 on identical (tiny, random) weights; its
latent spec, loading from every layout, refusal of other VAEs, exact tiling and its automatic selection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import WeightFileError, identify
from models.common.attention import ATTENTION_KERNEL, attention
from models.common.tiling import plan_tiles, run_tiled
from models.io.weights import open_checkpoint
from models.qwen_image_2_1.latent import QWEN_IMAGE_2_1_LATENT
from models.qwen_image_2_1.vae import DECODE_MIN_OVERLAP, ENCODE_MIN_OVERLAP, _build, load_vae_2_1
from models.qwen_image_2_1.vae_keys import comfy_shape, diffusers_to_comfy
from tiny_models.factory import make_vae
from tiny_models.qwen_image_2_1_vae import TINY_VAE_2_1, _spec, make_vae_2_1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_2_1")
    return {
        "diffusers": make_vae_2_1(root, layout="diffusers", dtype="fp32", seed=3),
        "comfy": make_vae_2_1(root, layout="comfy", dtype="fp32", seed=3),
        "bf16": make_vae_2_1(root, layout="diffusers", dtype="bf16", seed=3),
        "root": root,
    }


@pytest.fixture(scope="module")
def vae(files):
    return load_vae_2_1(files["diffusers"])


@pytest.fixture(scope="module")
def reference(files):
    from diffusers import AutoencoderKLQwenImage21

    return AutoencoderKLQwenImage21.from_pretrained(files["diffusers"]).eval()


def _images(batch: int, height: int, width: int, channels: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


def _latents(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(batch, 64, height, width, generator=torch.Generator().manual_seed(seed))


def _reference_encode(reference, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1  # [B, 4, T=1, H, W] in [-1, 1]
        return reference.encode(x).latent_dist.mode()[:, :, 0]


def _reference_decode(reference, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = reference.decode(latents.unsqueeze(2)).sample[:, :, 0]
    return ((out + 1) / 2).permute(0, 2, 3, 1)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# ---------------------------------------------------------------------------------------------------------------
# The tiny files are the reference's layout
# ---------------------------------------------------------------------------------------------------------------
def test_tiny_files_hold_exactly_the_reference_tensors(files, reference):
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert {name: shape for name, (shape, _) in _spec(TINY_VAE_2_1).items()} == expected
    assert set(load_file(str(files["diffusers"] / "diffusion_pytorch_model.safetensors"))) == set(expected)
    # Norm weights are not all ones (a missing norm would go unnoticed otherwise).
    assert not torch.equal(reference.encoder.norm_out.gamma, torch.ones_like(reference.encoder.norm_out.gamma))
    # The Comfy-Org file: the same values under Wan 2.2 names, with the temporal axis of the causal convolutions.
    comfy = load_file(str(files["comfy"]))
    names = {diffusers_to_comfy(name): name for name in expected}
    assert len(names) == len(expected) and set(comfy) == set(names)
    for comfy_name, name in names.items():
        assert comfy[comfy_name].shape == comfy_shape(name, expected[name])
        assert torch.equal(comfy[comfy_name].reshape(expected[name]), reference.state_dict()[name])
    assert comfy["encoder.conv1.weight"].shape == (8, 4, 1, 3, 3)
    assert comfy["decoder.upsamples.0.upsamples.3.resample.1.weight"].ndim == 4
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in comfy


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,height,width", [(2, 64, 64), (1, 48, 80), (2, 32, 96)])
def test_encode_matches_diffusers(vae, reference, batch, height, width):
    images = _images(batch, height, width)
    z = vae.encode(images, tiled=False)
    expected = _reference_encode(reference, images)
    assert z.shape == (batch, 64, height // 16, width // 16) and z.dtype == torch.float32
    assert _max_error(z, expected) <= 1e-5
    assert expected.abs().max().item() > 0.5  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("batch,height,width", [(2, 4, 4), (1, 3, 5), (2, 6, 2)])
def test_decode_matches_diffusers(vae, reference, batch, height, width):
    latents = _latents(batch, height, width)
    images = vae.decode(latents, tiled=False)
    expected = _reference_decode(reference, latents)
    assert images.shape == (batch, height * 16, width * 16, 4) and images.dtype == torch.float32
    assert _max_error(images, expected) <= 1e-5
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0
    assert ((expected > 0.001) & (expected < 0.999)).float().mean().item() > 0.5  # mostly not clamped


def test_rgb_images_get_an_opaque_alpha(vae, reference):
    rgb = _images(2, 32, 48, channels=3, seed=4)
    opaque = torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)
    z = vae.encode(rgb)
    assert torch.equal(z, vae.encode(opaque))
    assert _max_error(z, _reference_encode(reference, opaque)) <= 1e-5
    assert _max_error(z, vae.encode(torch.cat([rgb, 0.5 * torch.ones_like(rgb[..., :1])], dim=-1))) > 1e-3


def test_batch_images_are_independent(vae):
    images = _images(2, 32, 32, seed=5)
    latents = vae.encode(images)
    decoded = vae.decode(latents)
    for k in range(2):
        assert _max_error(latents[k:k + 1], vae.encode(images[k:k + 1])) <= 1e-5
        assert _max_error(decoded[k:k + 1], vae.decode(latents[k:k + 1])) <= 1e-5


def test_input_checks(vae):
    latents = _latents(2, 2, 3)
    assert torch.equal(vae.decode(latents.unsqueeze(2)), vae.decode(latents))
    with pytest.raises(ValueError, match="frames"):
        vae.decode(torch.zeros(1, 64, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 64, h, w\]"):
        vae.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        vae.encode(torch.zeros(1, 40, 32, 3))
    with pytest.raises(ValueError, match="3 or 4"):
        vae.encode(torch.zeros(1, 32, 32, 1))


def test_attention_options_reach_both_middle_blocks(vae):
    calls = []

    def kernel(q, k, v, *, mask, causal, options):
        calls.append(q.shape)
        return attention(q, k, v, mask=mask, causal=causal)

    images = _images(1, 32, 48, seed=6)
    latents = vae.encode(images)
    assert torch.equal(vae.encode(images, options={ATTENTION_KERNEL: kernel}), latents)
    assert torch.equal(vae.decode(latents, options={ATTENTION_KERNEL: kernel}), vae.decode(latents))
    assert calls == [(1, 1, 6, 64), (1, 1, 6, 96)]  # one head, 2 x 3 latent cells, the widest levels


# ---------------------------------------------------------------------------------------------------------------
# The latent space
# ---------------------------------------------------------------------------------------------------------------
def test_latent_spec_is_the_references(vae, reference):
    spec = QWEN_IMAGE_2_1_LATENT
    assert (spec.family, spec.channels, spec.spatial_factor, spec.patch_size) == ("qwen_image_2_1", 64, 16, 1)
    assert (spec.host_format, spec.frame_axis) == ("QwenImage21", False)
    import inspect

    from diffusers import AutoencoderKLQwenImage21

    defaults = inspect.signature(AutoencoderKLQwenImage21.__init__).parameters
    assert list(spec.mean) == defaults["latents_mean"].default and list(spec.std) == defaults["latents_std"].default
    z = _latents(2, 3, 5, seed=7)
    mean = torch.tensor(reference.config.latents_mean).reshape(1, 64, 1, 1)
    std = torch.tensor(reference.config.latents_std).reshape(1, 64, 1, 1)
    assert torch.allclose(vae.normalize(z), (z - mean) / std, atol=1e-6)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-5)
    assert spec.empty(1, 96, 64).shape == (1, 64, 4, 6)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def test_every_diffusers_layout_loads_the_same_model(vae, files, tmp_path):
    from_pipeline = load_vae_2_1(files["diffusers"].parent)  # the pipeline folder holding vae/
    single = tmp_path / "qwen_image_2.1_vae_diffusers_names.safetensors"
    single.write_bytes((files["diffusers"] / "diffusion_pytorch_model.safetensors").read_bytes())
    from_single = load_vae_2_1(single)
    prefixed = tmp_path / "qwen_image_2.1_vae_prefixed.safetensors"
    tensors = load_file(str(single))
    save_file({f"vae.{name}": tensor for name, tensor in tensors.items()}, str(prefixed))
    from_prefixed = load_vae_2_1(prefixed)
    images = _images(1, 32, 48, seed=8)
    latents = vae.encode(images)
    for other in (from_pipeline, from_single, from_prefixed):
        assert torch.equal(other.encode(images), latents)
        assert torch.equal(other.decode(latents), vae.decode(latents))
    assert not any(".time_conv." in name for name in vae.state_dict())  # unused on one frame: not loaded


def test_comfy_names_load_the_same_model(vae, files):
    tensors = open_checkpoint(files["comfy"])
    comfy = _build(tensors, "", torch.float32, "cpu", None, str(files["comfy"]))
    images = _images(1, 32, 48, seed=9)
    latents = vae.encode(images)
    assert torch.equal(comfy.encode(images), latents)
    assert torch.equal(comfy.decode(latents), vae.decode(latents))


def test_comfy_single_file_loads(vae, files):
    assert identify(files["comfy"]).family == "qwen_image_2_1"
    images = _images(1, 32, 32, seed=10)
    assert torch.equal(load_vae_2_1(files["comfy"]).encode(images), vae.encode(images))


def test_bf16_within_bounds_of_fp32(vae, files):
    images = _images(2, 48, 64, seed=11)
    latents = vae.encode(images)
    decoded = vae.decode(latents)
    bf16 = load_vae_2_1(files["bf16"], dtype=torch.bfloat16)
    assert bf16.post_quant_conv.weight.dtype == torch.bfloat16
    for got, want in ((bf16.encode(images), latents), (bf16.decode(latents), decoded)):
        assert got.dtype == torch.float32
        assert _rel_l2(got, want) < 3e-2 and _cosine(got, want) > 0.999


def _write(path, tensors: dict[str, tuple[int, ...]]):
    save_file({name: torch.ones(shape) for name, shape in tensors.items()}, str(path))
    return path


def test_refuses_other_vaes(files, tmp_path):
    root = files["root"]
    sd = _write(tmp_path / "sd_vae.safetensors", {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1), "decoder.conv_in.weight": (512, 4, 3, 3)})
    cases = [(make_vae(root, layout="comfy", dtype="fp32"), "the Qwen-Image VAE,"),
             (make_vae(root, layout="diffusers", dtype="fp32"), "the Qwen-Image VAE,"),
             (make_vae(root, layout="comfy", dtype="fp32", variant="rgba"), "the Qwen-Image-Layered RGBA VAE"),
             (sd, "an SD 1.x / SDXL-style VAE (4 latent channels")]
    for path, found in cases:
        with pytest.raises(WeightFileError) as error:
            load_vae_2_1(path)
        message = str(error.value)
        assert found in message and "not the Qwen-Image 2.1 VAE" in message, message
        assert "encoder.conv_in.weight" in message, message


def test_refuses_incomplete_files(files, tmp_path):
    tensors = load_file(str(files["diffusers"] / "diffusion_pytorch_model.safetensors"))
    del tensors["decoder.up_blocks.1.resnets.2.conv2.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightFileError, match=r"missing .*decoder.up_blocks.1.resnets.2.conv2.bias"):
        load_vae_2_1(path)
    del tensors["post_quant_conv.weight"]
    save_file(tensors, str(path))
    with pytest.raises(WeightFileError, match="incomplete Qwen-Image 2.1 VAE: post_quant_conv.weight missing"):
        load_vae_2_1(path)


# ---------------------------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------------------------
def test_tiled_decode_equals_untiled(vae):
    latents = _latents(1, 30, 10, seed=12)
    untiled = vae.decode(latents, tiled=False)
    calls = []
    # The overlap asked for (2) is raised to the receptive field (13): windows of 28 of the 30 rows.
    tiled = vae.decode(latents, tiled=True, tile_size=15, tile_overlap=2,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert _max_error(tiled, untiled) <= 1e-5
    # The margin is what makes it exact: tiles with less context than the receptive field differ.
    with torch.no_grad():
        features = vae.decoder.trunk(vae.post_quant_conv(latents.contiguous(memory_format=torch.channels_last)))
        short = run_tiled(vae.decoder.tail, features, plan_tiles(30, 10, 15, 4), (16, 1))
    assert _max_error(short.clamp(-1, 1).add(1).mul(0.5).permute(0, 2, 3, 1), untiled) > 1e-3


def test_tiled_encode_equals_untiled(vae):
    images = _images(1, 384, 96, seed=13)
    untiled = vae.encode(images, tiled=False)
    calls = []
    tiled = vae.encode(images, tiled=True, tile_size=144, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # cores of 128 rows, windows of up to 288
    assert _max_error(tiled, untiled) <= 1e-5
    # One latent cell less context than the receptive field (76 px) is not exact.
    with torch.no_grad():
        x = (images.permute(0, 3, 1, 2) * 2 - 1).contiguous(memory_format=torch.channels_last)
        short = run_tiled(vae.encoder.local_features, x, plan_tiles(384, 96, 144, ENCODE_MIN_OVERLAP - 16, 16),
                          (1, 16))
        assert _max_error(vae._encode_finish(short, None), untiled) > 1e-5
    assert DECODE_MIN_OVERLAP == 13 and ENCODE_MIN_OVERLAP == 80


class _Recorder:
    """Wraps a bound method, recording the spatial size of each input; the first ``failures`` calls raise a
    simulated out-of-memory error instead of computing."""

    def __init__(self, fn, failures: int = 0):
        self.fn, self.failures, self.sizes = fn, failures, []

    def __call__(self, x, *args, **kwargs):
        self.sizes.append(tuple(x.shape[2:]))
        if len(self.sizes) <= self.failures:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.fn(x, *args, **kwargs)


def test_memory_estimates_choose_tiling_and_out_of_memory_falls_back(vae, monkeypatch):
    latents = _latents(2, 8, 6, seed=15)
    decoded = vae.decode(latents, tiled=False)
    one = vae.estimate_decode_bytes(1, 128, 96)
    assert one < vae.estimate_decode_bytes(2, 128, 96)
    assert vae.estimate_decode_bytes(1, 128, 96) > vae.estimate_encode_bytes(1, 128, 96)
    tail = _Recorder(vae.decoder.tail)
    monkeypatch.setattr(vae.decoder, "tail", tail)
    # Room for one image: untiled, image by image.
    monkeypatch.setattr(vae, "memory_budget", lambda device: one)
    assert _max_error(vae.decode(latents), decoded) <= 1e-5
    assert tail.sizes == [(8, 6)] * 2
    # Not even one: tiles (windows of tile + margin, clipped to the 8 x 6 latent).
    tail.sizes.clear()
    monkeypatch.setattr(vae, "memory_budget", lambda device: one - 1)
    assert _max_error(vae.decode(latents, tile_size=4), decoded) <= 1e-5
    assert len(tail.sizes) == 2 * 4
    # Untiled runs out of memory: tiled instead.
    tail.sizes.clear()
    tail.failures = 1
    monkeypatch.setattr(vae, "memory_budget", lambda device: 1 << 60)
    assert _max_error(vae.decode(latents[:1], tile_size=4), decoded[:1]) <= 1e-5
    assert tail.sizes[0] == (8, 6) and len(tail.sizes) == 1 + 4
