"""Photo-like test images (deterministic from a seed): smooth shading, blobs, hard-edged shapes and fine texture.

Used by the geometry tests (a shift or an edge copy shows up in them) and as the example inputs the demo and the
host tests put in ComfyUI's input folder for the edit workflows.
"""

from __future__ import annotations

import numpy as np

# File names the edit workflows load (LoadImage); the masked one carries its mask in the alpha channel.
EXAMPLE_INPUTS = ("qwen_edit_input_1.png", "qwen_edit_input_2.png", "qwen_edit_input_3.png",
                  "qwen_edit_input_masked.png", "qwen_control_photo.png", "qwen_control_depth.png")


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A ``[height, width, 3]`` float32 image in 0..1."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    image = np.stack([0.3 + 0.4 * u, 0.2 + 0.5 * v, 0.6 - 0.3 * u * v], axis=-1)
    for _ in range(8):  # soft blobs
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * max(width, height)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))[..., None]
        image = image * (1 - 0.6 * weight) + 0.6 * weight * rng.uniform(0, 1, 3)
    for _ in range(6):  # hard-edged rectangles
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(width // 20 + 1, width // 4 + 2), y0 + rng.integers(height // 20 + 1, height // 4 + 2)
        image[y0:y1, x0:x1] = rng.uniform(0, 1, 3)
    image += 0.03 * np.sin(x * 0.9 + y * 0.4)[..., None]  # fine texture
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def example_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """The edit workflows' example inputs as uint8 arrays (RGB, or RGBA with the mask as transparency)."""
    sizes = [(640, 480), (512, 512), (480, 640)]
    inputs = {name: (photo_like(w, h, seed + i) * 255).round().astype(np.uint8)
              for i, (name, (w, h)) in enumerate(zip(EXAMPLE_INPUTS, sizes))}
    masked = (photo_like(640, 480, seed + 7) * 255).round().astype(np.uint8)
    alpha = np.full((480, 640, 1), 255, np.uint8)
    alpha[120:360, 200:440] = 0  # transparent = the area to edit (LoadImage's mask is 1 - alpha)
    inputs[EXAMPLE_INPUTS[3]] = np.concatenate([masked, alpha], axis=-1)
    inputs[EXAMPLE_INPUTS[4]] = (photo_like(768, 512, seed + 11) * 255).round().astype(np.uint8)
    inputs[EXAMPLE_INPUTS[5]] = depth_like(768, 512, seed + 12)
    return inputs


def depth_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A depth-map-like uint8 RGB image: a receding floor with a few nearer boxes (brighter = nearer)."""
    rng = np.random.default_rng(seed)
    y = np.mgrid[0:height, 0:width][0].astype(np.float32)
    depth = 0.15 + 0.7 * y / max(height - 1, 1)
    for _ in range(4):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(height // 4, height * 3 // 4)
        depth[y0:y0 + height // 5, x0:x0 + width // 6] = rng.uniform(0.6, 1.0)
    gray = (np.clip(depth, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
