"""The Qwen-Image VAE against diffusers' AutoencoderKLQwenImage on identical (tiny, random) weights; loading,
refusal of other VAEs, tiling and its automatic selection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models import WeightFileError, load_vae
from tiny_models.factory import make_vae
from models.qwen_image.vae import DECODE_MIN_OVERLAP, ENCODE_MIN_OVERLAP
from models.common.tiling import plan_axis, plan_tiles, run_tiled


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {
        "comfy": make_vae(root, layout="comfy", dtype="fp32", seed=3),
        "diffusers": make_vae(root, layout="diffusers", dtype="fp32", seed=3),
        "bf16": make_vae(root, layout="comfy", dtype="bf16", seed=3),
        "fp16": make_vae(root, layout="comfy", dtype="fp16", seed=3),
        "root": root,
    }


@pytest.fixture(scope="module")
def vae(files):
    return load_vae(files["comfy"])


@pytest.fixture(scope="module")
def reference(files):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage.from_pretrained(files["diffusers"]).eval()


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def _smooth_images(batch: int, height: int, width: int) -> torch.Tensor:
    """Low-frequency colour fields (gradients and slow waves) in 0..1."""
    y = torch.linspace(0, 1, height).reshape(1, height, 1, 1)
    x = torch.linspace(0, 1, width).reshape(1, 1, width, 1)
    phase = torch.arange(3 * batch, dtype=torch.float32).reshape(batch, 1, 1, 3)
    return 0.5 + 0.4 * torch.sin(2.5 * x + 1.7 * y + phase) * torch.cos(1.3 * y - 0.8 * x + 0.5 * phase)


def _reference_encode(reference, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1  # [B, C, T=1, H, W] in [-1, 1]
        return reference.encode(x).latent_dist.mode()[:, :, 0]


def _reference_decode(reference, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = reference.decode(latents.unsqueeze(2)).sample[:, :, 0]
    return ((out + 1) / 2).permute(0, 2, 3, 1)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,height,width", [(3, 64, 64), (1, 48, 80), (2, 72, 40)])
def test_encode_matches_diffusers(vae, reference, batch, height, width):
    images = _images(batch, height, width)
    z = vae.encode(images, tiled=False)
    expected = _reference_encode(reference, images)
    assert z.shape == (batch, 16, height // 8, width // 8) and z.dtype == torch.float32
    assert (z - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("batch,height,width", [(3, 8, 8), (1, 6, 10), (2, 9, 5)])
def test_decode_matches_diffusers(vae, reference, batch, height, width):
    latents = torch.randn(batch, 16, height, width, generator=torch.Generator().manual_seed(1))
    images = vae.decode(latents, tiled=False)
    expected = _reference_decode(reference, latents)
    assert images.shape == (batch, height * 8, width * 8, 3) and images.dtype == torch.float32
    assert (images - expected).abs().max().item() <= 1e-5
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0


def test_batch_images_are_independent(vae):
    images = _images(3, 40, 56, seed=5)
    batch_latents = vae.encode(images, tiled=False)
    batch_images = vae.decode(batch_latents, tiled=False)
    for k in range(3):
        alone = vae.encode(images[k:k + 1], tiled=False)
        assert (batch_latents[k:k + 1] - alone).abs().max().item() <= 1e-5
        decoded = vae.decode(batch_latents[k:k + 1], tiled=False)
        assert (batch_images[k:k + 1] - decoded).abs().max().item() <= 1e-5


def test_decode_accepts_one_frame_video_latents(vae):
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(vae.decode(latents.unsqueeze(2)), vae.decode(latents))
    with pytest.raises(ValueError, match="frames"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))


def test_image_size_must_be_multiple_of_8(vae):
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 20, 16, 3))


def test_normalize_uses_the_diffusers_statistics(vae, reference):
    z = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(4))
    mean = torch.tensor(reference.config.latents_mean).reshape(1, 16, 1, 1)
    std = torch.tensor(reference.config.latents_std).reshape(1, 16, 1, 1)
    assert torch.allclose(vae.normalize(z), (z - mean) / std, atol=1e-6)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def test_comfy_and_diffusers_layouts_give_identical_outputs(vae, files, tmp_path):
    from_folder = load_vae(files["diffusers"])
    from_pipeline = load_vae(files["diffusers"].parent)  # the pipeline folder holding vae/
    # A single file with diffusers names (as some single-file VAE releases are).
    single = tmp_path / "diffusers_named_vae.safetensors"
    folder = files["diffusers"]
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    from_single = load_vae(single)
    images = _images(1, 32, 48, seed=7)
    latents = vae.encode(images)
    for other in (from_folder, from_pipeline, from_single):
        assert torch.equal(other.encode(images), latents)
        assert torch.equal(other.decode(latents), vae.decode(latents))


def test_half_precision_files(vae, files):
    images = _smooth_images(2, 48, 64)
    latents = vae.encode(images)
    decoded = vae.decode(latents)
    bf16 = load_vae(files["bf16"], dtype=torch.bfloat16)
    assert bf16.conv2.weight.dtype == torch.bfloat16
    for got, want in ((bf16.encode(images), latents), (bf16.decode(latents), decoded)):
        assert got.dtype == torch.float32
        assert _rel_l2(got, want) < 3e-2 and _cosine(got, want) > 0.999
    # An fp16 file upcast to fp32 at load time.
    fp16 = load_vae(files["fp16"], dtype=torch.float32)
    assert _rel_l2(fp16.decode(latents), decoded) < 1e-2


def test_weights_cast_at_compute_time(files):
    # bf16 storage computed in fp32 (the layers cast their weights per call, as a host's manual-cast ops do)
    # equals the same bf16 weights upcast once at load.
    stored = load_vae(files["bf16"], dtype=torch.bfloat16)
    stored.dtype = torch.float32
    upcast = load_vae(files["bf16"], dtype=torch.float32)
    assert stored.decoder.conv1.weight.dtype == torch.bfloat16
    images = _smooth_images(1, 32, 40)
    latents = upcast.encode(images)
    assert (stored.encode(images) - latents).abs().max().item() <= 1e-5
    assert (stored.decode(latents) - upcast.decode(latents)).abs().max().item() <= 1e-5


def _write(path, tensors: dict[str, tuple[int, ...]]):
    # ones, not zeros: a file ending in zero-filled tensors is what an interrupted download leaves (refused)
    save_file({name: torch.ones(shape) for name, shape in tensors.items()}, str(path))
    return path


def test_refuses_other_vaes(tmp_path):
    sd = _write(tmp_path / "sd_vae.safetensors", {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1), "decoder.conv_in.weight": (512, 4, 3, 3)})
    flux = _write(tmp_path / "ae.safetensors", {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.conv_out.weight": (32, 512, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)})
    sd_diffusers = _write(tmp_path / "sdxl_vae_diffusers.safetensors", {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1), "post_quant_conv.weight": (4, 4, 1, 1)})
    wan22 = _write(tmp_path / "wan2.2_vae.safetensors", {
        "encoder.conv1.weight": (160, 12, 3, 3, 3), "conv1.weight": (96, 96, 1, 1, 1),
        "conv2.weight": (48, 48, 1, 1, 1), "decoder.conv1.weight": (1024, 48, 3, 3, 3)})
    dit = _write(tmp_path / "qwen_image_bf16.safetensors", {
        "transformer_blocks.0.attn.to_q.weight": (8, 8), "img_in.weight": (8, 64)})
    cases = [(sd, "SD 1.x / SDXL-style VAE (4 latent channels"), (flux, "Flux / SD3-style VAE (16 latent channels"),
             (sd_diffusers, "SD 1.x / SDXL-style VAE (4 latent channels"), (wan22, "Wan 2.2 VAE (48 latent channels)"),
             (dit, "found no VAE tensors")]
    for path, found in cases:
        with pytest.raises(WeightFileError) as error:
            load_vae(path)
        message = str(error.value)
        assert found in message and "qwen_image_vae.safetensors in models/vae" in message, message


def test_refuses_incomplete_vae(files, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(files["comfy"]))
    del tensors["decoder.head.2.weight"]
    path = tmp_path / "broken_vae.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightFileError, match="missing .*decoder.head.2.weight"):
        load_vae(path)


# ---------------------------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------------------------
def test_plan_axis_covers_the_axis_with_aligned_balanced_cores():
    tiles = plan_axis(200, 64, 24, align=8)
    assert [t.core_start for t in tiles][0] == 0 and tiles[-1].core_end == 200
    assert all(a.core_end == b.core_start for a, b in zip(tiles, tiles[1:]))
    assert all(t.core_start % 8 == 0 and t.core_end % 8 == 0 for t in tiles)
    assert max(t.core_end - t.core_start for t in tiles) <= 64
    assert all(t.window_start == max(0, t.core_start - 24) and t.window_end == min(200, t.core_end + 24)
               for t in tiles)
    assert len(plan_axis(40, 64, 13)) == 1


def _seam_steps(images: torch.Tensor, rows: list[int], cols: list[int]) -> tuple[float, float]:
    """Mean |pixel step| across the given tile borders (rows: vertical steps, cols: horizontal steps) and across
    all other lines of the same phase modulo 8 (the decoder's output has an 8-pixel periodic texture, so compare
    like with like).  ``images`` [B, H, W, C]."""
    vertical = (images[:, 1:] - images[:, :-1]).abs().mean(dim=(0, 2, 3))  # step between row r-1 and r
    horizontal = (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(0, 1, 3))
    at = [vertical[r - 1] for r in rows] + [horizontal[c - 1] for c in cols]
    other = [vertical[r - 1] for r in range(8, images.shape[1], 8) if r not in rows]
    other += [horizontal[c - 1] for c in range(8, images.shape[2], 8) if c not in cols]
    return torch.stack(at).mean().item(), torch.stack(other).mean().item()


def _smooth_latents(height: int, width: int) -> torch.Tensor:
    """Low-frequency latent fields, one phase per channel, amplitude ~2 (like real latents)."""
    y = torch.linspace(0, 1, height).reshape(1, 1, height, 1)
    x = torch.linspace(0, 1, width).reshape(1, 1, 1, width)
    phase = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1, 1)
    return 2 * torch.sin(3 * x + 2 * y + phase) * torch.cos(2 * y - x + 0.7 * phase)


def test_tiled_decode_matches_untiled_without_seams(vae):
    latents = _smooth_latents(36, 32)
    untiled = vae.decode(latents, tiled=False)
    calls = []
    tiled = vae.decode(latents, tiled=True, tile_size=18, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 x 2 tiles
    # Tiled decoding is exact here (the overlap covers the receptive field), far inside the 2e-2 allowed.
    assert (tiled - untiled).abs().max().item() <= 1e-5
    rows = [t.core_start * 8 for t in plan_axis(36, 18, 0)[1:]]
    cols = [t.core_start * 8 for t in plan_axis(32, 18, 0)[1:]]
    at_border, elsewhere = _seam_steps(tiled, rows, cols)
    assert at_border <= 1.25 * elsewhere
    # The metric does see seams: tiles decoded without context leave visible steps at the same borders.
    with torch.no_grad():
        features = vae.decoder.trunk(vae.conv2(latents.contiguous(memory_format=torch.channels_last)))
        naive = run_tiled(vae.decoder.tail, features, plan_tiles(36, 32, 18, 0), (8, 1))
    naive = naive.clamp(-1, 1).add(1).mul(0.5).permute(0, 2, 3, 1)
    at_border_naive, elsewhere_naive = _seam_steps(naive, rows, cols)
    assert at_border_naive > 1.5 * elsewhere_naive


def test_tiled_encode_matches_untiled(vae):
    images = _smooth_images(1, 256, 192)
    untiled = vae.encode(images, tiled=False)
    calls = []
    tiled = vae.encode(images, tiled=True, tile_size=128, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 x 2 tiles
    assert (tiled - untiled).abs().max().item() <= 1e-5


def test_overlap_below_the_receptive_field_is_raised(vae):
    images = _smooth_images(1, 192, 96)
    latents = vae.encode(images)
    exact = vae.decode(latents, tiled=False)
    assert (vae.decode(latents, tiled=True, tile_size=12, tile_overlap=2) - exact).abs().max().item() <= 1e-5
    assert (vae.encode(images, tiled=True, tile_size=96, tile_overlap=8) - latents).abs().max().item() <= 1e-5
    assert DECODE_MIN_OVERLAP >= 13 and ENCODE_MIN_OVERLAP % 8 == 0


class _Recorder:
    """Wraps a bound method, recording the spatial size of each input; the first ``failures`` calls raise a
    simulated out-of-memory error instead of computing."""

    def __init__(self, fn, failures: int = 0, error: Exception | None = None):
        self.fn, self.failures, self.sizes = fn, failures, []
        self.error = error or torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def __call__(self, x, *args, **kwargs):
        self.sizes.append(tuple(x.shape[2:]))
        if len(self.sizes) <= self.failures:
            raise self.error
        return self.fn(x, *args, **kwargs)


def test_automatic_tiling_follows_the_memory_estimate(vae, monkeypatch):
    images = _smooth_images(2, 128, 128)
    latents = vae.encode(images, tiled=False)
    decoded = vae.decode(latents, tiled=False)
    tail = _Recorder(vae.decoder.tail)
    tiled = _Recorder(vae._decode_tiled)
    monkeypatch.setattr(vae.decoder, "tail", tail)
    monkeypatch.setattr(vae, "_decode_tiled", tiled)
    both = vae.estimate_decode_bytes(2, 128, 128)
    one = vae.estimate_decode_bytes(1, 128, 128)
    assert one < both
    # Plenty of memory: one untiled call for the batch.
    monkeypatch.setattr(vae, "memory_budget", lambda device: both)
    assert (vae.decode(latents) - decoded).abs().max().item() <= 1e-5
    assert tail.sizes == [(16, 16)] and tiled.sizes == []
    # Room for one image: untiled, image by image.
    tail.sizes.clear()
    calls = []
    monkeypatch.setattr(vae, "memory_budget", lambda device: one)
    assert (vae.decode(latents, progress=lambda done, total: calls.append((done, total))) - decoded).abs().max() <= 1e-5
    assert tail.sizes == [(16, 16)] * 2 and tiled.sizes == [] and calls == [(1, 2), (2, 2)]
    # Not even one image: tiled, image by image.
    monkeypatch.setattr(vae, "memory_budget", lambda device: one - 1)
    assert (vae.decode(latents) - decoded).abs().max().item() <= 1e-5
    assert tiled.sizes == [(16, 16)] * 2
    # The same for encoding.
    encode_tiled = _Recorder(vae._encode_tiled)
    monkeypatch.setattr(vae, "_encode_tiled", encode_tiled)
    monkeypatch.setattr(vae, "memory_budget", lambda device: vae.estimate_encode_bytes(1, 128, 128) - 1)
    assert (vae.encode(images) - latents).abs().max().item() <= 1e-5
    assert encode_tiled.sizes == [(128, 128)] * 2


def test_out_of_memory_falls_back_to_tiles(vae, monkeypatch):
    monkeypatch.setattr(vae, "memory_budget", lambda device: 1 << 60)
    images = _smooth_images(1, 256, 256)
    latents = vae.encode(images, tiled=False)
    decoded = vae.decode(latents, tiled=False)
    # Untiled runs out of memory -> one 32-tile, which runs out of memory too -> 16-tiles (2 x 2).
    tail = _Recorder(vae.decoder.tail, failures=2)
    monkeypatch.setattr(vae.decoder, "tail", tail)
    assert (vae.decode(latents, tile_size=32) - decoded).abs().max().item() <= 1e-5
    assert tail.sizes[:2] == [(32, 32), (32, 32)] and len(tail.sizes) == 2 + 4
    assert all(size[1] < 32 for size in tail.sizes[2:])
    # Forced untiled does not fall back.
    tail.sizes.clear()
    tail.failures = 1
    with pytest.raises(torch.OutOfMemoryError):
        vae.decode(latents, tiled=False)
    # Other errors are not taken for a lack of memory.
    tail.sizes.clear()
    tail.error = RuntimeError("Expected all tensors to be on the same device")
    with pytest.raises(RuntimeError, match="same device"):
        vae.decode(latents)
    assert len(tail.sizes) == 1
    # The CPU allocator's failure is a plain RuntimeError, recognised by its message.
    cpu_failure = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 35184372088832 bytes.")
    local = _Recorder(vae.encoder.local_features, failures=1, error=cpu_failure)
    monkeypatch.setattr(vae.encoder, "local_features", local)
    assert (vae.encode(images, tile_size=128) - latents).abs().max().item() <= 1e-5
    assert local.sizes[0] == (256, 256) and len(local.sizes) == 1 + 4
