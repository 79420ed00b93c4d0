"""Temp PNG previews a node reports after a run (the host's frontend shows a node's ``images`` ui output)."""

from __future__ import annotations

import os
import struct
import uuid
import zlib

import torch

import folder_paths

PREVIEW_SIDE = 512  # longest side of a preview (nodes report true sizes beside them where they matter)


def png_bytes(pixels: torch.Tensor) -> bytes:
    """A ``[H, W, 3]`` uint8 tensor as PNG bytes (stdlib zlib: no image library needed for previews)."""
    height, width = pixels.shape[:2]
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.reshape(height, width * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 1))
            + chunk(b"IEND", b""))


def temp_previews(images: list[torch.Tensor], prefix: str) -> list[dict]:
    """Write ``[H, W, 3]`` images in [0, 1] as temp PNGs at most :data:`PREVIEW_SIDE` px; returns the host's
    ``images`` ui entries, in order."""
    folder, run = folder_paths.get_temp_directory(), uuid.uuid4().hex[:12]
    os.makedirs(folder, exist_ok=True)
    entries = []
    for index, image in enumerate(images):
        height, width = int(image.shape[0]), int(image.shape[1])
        preview = image[..., :3].detach().float().cpu().clamp(0, 1)
        scale = PREVIEW_SIDE / max(width, height)
        if scale < 1:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            preview = torch.nn.functional.interpolate(preview.permute(2, 0, 1)[None], size=size,
                                                      mode="area")[0].permute(1, 2, 0)
        name = f"{prefix}_{run}_{index}.png"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(png_bytes((preview * 255).round().to(torch.uint8).contiguous()))
        entries.append({"filename": name, "subfolder": "", "type": "temp"})
    return entries
