"""EliGen entity control for the Qwen-Image DiT: a global prompt plus (entity prompt, region) pairs.

EliGen (DiffSynth-Studio) places entities: each entity prompt is encoded on its own with the text-to-image template
and its tokens join the text stream before the global prompt's, ``[entity 1, ..., entity n, global, image]``.  The
joint attention is masked (the rule of DiffSynth's ``QwenImageDiT.process_entity_masks``, which the EliGen LoRAs
were trained with):

* text tokens of one prompt attend to the tokens of that prompt only, never to another prompt's;
* an entity's text tokens and the image tokens inside its region attend to each other; outside, not at all;
* the global prompt's region is the whole image; image tokens attend to every image token.

A region is an image-space mask (any resolution; inside where the value > 0.5, for an RGB mask the mean of the
channels): resized with nearest-neighbour sampling (pixel centres, as PIL) to the latent, and an image token is
inside when any latent pixel of its patch is.  Reference-image tokens (edit models) get the region resized to their
grid the same way (DiffSynth tiles the target's mask, which is the same for references of the target's size).

Each prompt's text tokens take the text RoPE positions a prompt of its length would have on its own (they all start
right after the image positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Entities", "region_tokens", "entity_attention_mask", "entity_rope"]


@dataclass(frozen=True, eq=False)
class Entities:
    """The entity conditioning of one prompt.

    ``contexts``: each entity prompt's embeddings ``[1 or B, L_i, joint_dim]`` (no padding); ``masks``: each
    entity's region ``[H_i, W_i]`` in image space (values in [0, 1]; > 0.5 is inside; each of any size).  Compared
    by identity (the host batches two conditionings only when they share the same entities)."""

    contexts: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.contexts:
            raise ValueError("EliGen needs at least one entity (a prompt and its mask).")
        if len(self.masks) != len(self.contexts) or any(m.ndim != 2 or not m.numel() for m in self.masks):
            raise ValueError(f"EliGen needs one mask [H, W] per entity prompt: {len(self.contexts)} prompts, "
                             f"masks of shapes {[tuple(m.shape) for m in self.masks]}")
        for context in self.contexts:
            if context.ndim != 3 or context.shape[1] == 0:
                raise ValueError(f"an entity prompt's embeddings must be [B, L, D] with L > 0, got "
                                 f"{tuple(context.shape)}")

    def __len__(self) -> int:
        return len(self.contexts)


def _nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``[N, H, W]`` sampling pixel centres (PIL's NEAREST), as float."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest-exact")[:, 0]


def region_tokens(masks: Sequence[torch.Tensor], latent_size: tuple[int, int], patch_size: int,
                  reference_grids: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Boolean ``[N, image_tokens]``: which image tokens lie in each entity's region.

    ``masks``: ``[H_i, W_i]`` each (image space), ``latent_size`` the target latent's ``(height, width)``
    (multiples of ``patch_size``); the target's tokens first (row-major), then each reference grid's
    ``(rows, columns)``."""
    inside = torch.cat([_nearest((mask.float() > 0.5)[None], latent_size) for mask in masks])
    tokens = F.max_pool2d(inside[:, None], patch_size)[:, 0]  # a token is inside if any pixel of it is
    parts = [tokens] + [_nearest(tokens, grid) for grid in reference_grids]
    return torch.cat([part.flatten(1) for part in parts], dim=1) > 0.5


def entity_attention_mask(text_lengths: Sequence[int], regions: torch.Tensor,
                          global_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean SDPA mask ``[B or 1, 1, S, S]`` (True = attend) of the joint sequence ``[entity texts, global text,
    image]``.

    ``text_lengths``: the entity prompts' lengths, then the global prompt's; ``regions [N, image_tokens]``
    (:func:`region_tokens`, one row per entity); ``global_keep [B, L_global]`` hides padded global-prompt tokens
    (1 keep, 0 padding)."""
    if regions.shape[0] != len(text_lengths) - 1:
        raise ValueError(f"{len(text_lengths) - 1} entity prompts but {regions.shape[0]} regions")
    device = regions.device
    lengths = torch.as_tensor(list(text_lengths), device=device)
    segment = torch.repeat_interleave(torch.arange(len(text_lengths), device=device), lengths)
    image_tokens = regions.shape[1]
    regions = torch.cat([regions, regions.new_ones(1, image_tokens)])  # the global prompt sees the whole image
    text_image = regions[segment]  # [L_text, image_tokens]
    text_text = segment[:, None] == segment[None, :]
    mask = torch.cat([torch.cat([text_text, text_image], dim=1),
                      torch.cat([text_image.T, text_image.new_ones(image_tokens, image_tokens)], dim=1)])[None]
    if global_keep is not None and not bool(global_keep.bool().all()):
        keys = torch.cat([global_keep.new_ones(global_keep.shape[0], int(lengths[:-1].sum())), global_keep,
                          global_keep.new_ones(global_keep.shape[0], image_tokens)], dim=1).to(device, torch.bool)
        mask = mask & keys[:, None, :]
    return mask[:, None]


def entity_rope(table: torch.Tensor, text_lengths: Sequence[int]) -> torch.Tensor:
    """The joint rotation table for ``[entity texts, global text, image]`` from a table computed for one text of
    ``max(text_lengths)`` tokens: every prompt takes the first positions of the text block (sequence is dim -3)."""
    longest = max(text_lengths)
    text = table.narrow(-3, 0, longest)
    image = table.narrow(-3, longest, table.shape[-3] - longest)
    return torch.cat([text.narrow(-3, 0, length) for length in text_lengths] + [image], dim=-3)
