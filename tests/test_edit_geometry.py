"""The edit size policy: consistent sizes for every branch, and no translation or edge copy on the round trip;
the reference pipelines' Lanczos resize, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from models.common.image_sizing import resize_images
from models.qwen_image.edit_geometry import REFERENCE_AREA, lanczos_resize, latent_size, policy_size
from tiny_models.images import photo_like

SIZES = [(1000, 750), (1328, 800), (777, 1231), (4000, 3000), (512, 2048), (640, 480), (1, 1)]


@pytest.mark.parametrize("width,height", SIZES)
def test_policy_sizes_are_consistent(width, height):
    new_width, new_height = policy_size(width, height)
    assert (new_width, new_height) == calculate_dimensions(REFERENCE_AREA, width / height)[:2] or (width, height) == (1, 1)
    assert new_width % 32 == 0 and new_height % 32 == 0
    latent_w, latent_h = latent_size(new_width, new_height)
    assert latent_w % 2 == 0 and latent_h % 2 == 0  # even latent sides: the DiT never pads
    if min(width, height) > 32:
        assert abs((new_width / new_height) / (width / height) - 1) < 0.06  # aspect kept up to the rounding
        assert abs(new_width * new_height / REFERENCE_AREA - 1) < 0.1
    native = policy_size(width, height, area=None)
    assert native[0] % 32 == 0 and native[1] % 32 == 0
    assert abs(native[0] - width) <= 16 or width < 32


def _phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Sub-pixel translation of ``b`` relative to ``a`` by phase correlation (parabolic peak refinement)."""
    cross = np.fft.fft2(a) * np.conj(np.fft.fft2(b))
    surface = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-12)))
    peak = np.unravel_index(np.argmax(surface), surface.shape)
    shift = []
    for axis, size in enumerate(surface.shape):
        index = list(peak)
        neighbours = []
        for step in (-1, 1):
            index[axis] = (peak[axis] + step) % size
            neighbours.append(surface[tuple(index)])
        centre = surface[peak]
        denominator = neighbours[0] - 2 * centre + neighbours[1]
        offset = 0.5 * (neighbours[0] - neighbours[1]) / denominator if denominator else 0.0
        position = peak[axis] + offset
        shift.append(position - size if position > size / 2 else position)
    return shift[0], shift[1]


@pytest.mark.parametrize("width,height", [(1000, 750), (1328, 800), (777, 1231), (4000, 3000), (512, 2048)])
def test_round_trip_has_no_shift_and_no_edge_copy(width, height):
    original = torch.from_numpy(photo_like(width, height, seed=3))[None]
    sized = resize_images(original, *policy_size(width, height))
    back = resize_images(sized, width, height)[0].numpy()
    source = original[0].numpy()
    dy, dx = _phase_shift(source.mean(-1), back.mean(-1))
    assert abs(dy) < 0.5 and abs(dx) < 0.5, (dy, dx)
    # No border row/column is a copy of the opposite edge (what wrap-around padding produces).
    for edge, opposite, own in ((back[0], source[-1], source[0]), (back[-1], source[0], source[-1]),
                                (back[:, 0], source[:, -1], source[:, 0]), (back[:, -1], source[:, 0], source[:, -1])):
        assert np.abs(edge - own).mean() < np.abs(edge - opposite).mean() * 0.5


def test_the_shift_detector_sees_a_one_pixel_shift():
    image = photo_like(256, 192, seed=1).mean(-1)
    dy, dx = _phase_shift(image, np.roll(image, 1, axis=1))
    assert abs(dx + 1) < 0.1 and abs(dy) < 0.1


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="impossible"):
        policy_size(0, 10)
    with pytest.raises(ValueError, match="multiple of 16 "):
        policy_size(100, 100, multiple=24)


@pytest.mark.parametrize("size,target", [((1024, 1024), (384, 384)), ((1184, 896), (448, 320)),
                                         ((777, 1231), (320, 480)), ((300, 200), (1024, 704)), ((64, 64), (64, 32)),
                                         ((13, 7), (5, 3)), ((4000, 3000), (448, 320))])
def test_lanczos_resize_equals_pillow(size, target):
    """The reference pipelines' resize (PIL Lanczos via VaeImageProcessor.resize), bit for bit, both directions."""
    from PIL import Image

    width, height = size
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize(target, resample=Image.LANCZOS))
    ours = lanczos_resize(torch.from_numpy(pixels)[None].float() / 255.0, *target)
    assert ours.shape == (1, target[1], target[0], 3) and ours.dtype == torch.float32
    assert np.array_equal((ours[0] * 255.0).round().to(torch.uint8).numpy(), expected)


def test_lanczos_resize_keeps_an_unchanged_size():
    image = torch.from_numpy(photo_like(96, 64, seed=2))[None]
    assert torch.equal(lanczos_resize(image, 96, 64), (image * 255.0).round() / 255.0)
