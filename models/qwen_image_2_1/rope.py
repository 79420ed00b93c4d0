"""RoPE of the Qwen-Image 2.1 DiT: positions along the one joint sequence ``[prefix, target]``.

The sequence is a list of runs, in order: text runs and image blocks (the condition images where the encoder put
them, the target image last).  A cursor ``p`` starts at 0:

* a text run of ``n`` tokens takes positions ``p .. p + n - 1`` on all three axes (frame, row, column); ``p += n``;
* an image block on an ``h x w`` latent grid takes frame ``p`` and centred rows ``-(h - h//2) .. h//2 - 1`` and
  columns ``-(w - w//2) .. w//2 - 1`` (row-major), so its spatial positions do not depend on where it sits;
  ``p += max(h, w)``.

The rotation itself (interleaved pairs, one frequency band per axis) is the Qwen-Image one: see
:mod:`models.qwen_image.rope` (:func:`rope_angles`, :func:`rope_table`, :func:`apply_rope`), reused here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..qwen_image.rope import rope_angles, rope_table

__all__ = ["Run", "sequence_positions", "sequence_rope"]

# A text run (its token count) or an image block (its latent grid ``(h, w)``).
Run = int | tuple[int, int]


def sequence_positions(runs: Sequence[Run]) -> torch.Tensor:
    """Integer positions ``[L, 3]`` (frame, row, column) of the tokens of ``runs`` in order."""
    parts, cursor = [], 0
    for run in runs:
        if isinstance(run, int):
            parts.append(torch.arange(cursor, cursor + run, dtype=torch.int64)[:, None].expand(run, 3))
            cursor += run
            continue
        h, w = run
        rows = torch.arange(-(h - h // 2), h // 2, dtype=torch.int64)[:, None].expand(h, w)
        cols = torch.arange(-(w - w // 2), w // 2, dtype=torch.int64)[None, :].expand(h, w)
        frame = torch.full((h, w), cursor, dtype=torch.int64)
        parts.append(torch.stack([frame, rows, cols], dim=-1).reshape(h * w, 3))
        cursor += max(h, w)
    return torch.cat(parts)


def sequence_rope(runs: Sequence[Run], axes_dim: Sequence[int], theta: float, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The rotation table of the whole sequence ``runs`` (:func:`models.qwen_image.rope.rope_table` layout for
    ``dtype``; the sequence is its dimension -3, cut with :func:`models.qwen_image.rope.split_rope`)."""
    angles = rope_angles(sequence_positions(runs), axes_dim, theta)
    return rope_table(angles, dtype).to(device)
