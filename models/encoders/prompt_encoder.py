"""What the Qwen-VL condition encoders (:mod:`.qwen25vl`, :mod:`.qwen3vl`) share: a loaded model with its
tokenizer and its family's templates, and the path from a prompt to input embeddings in which every image
placeholder becomes that image's merged vision tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .templates import IMAGE_PAD, PromptTemplate

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """Base of the condition encoders.  ``model.model`` is the language model (``config.hidden_size``,
    ``embed_tokens``), ``model.visual`` the vision tower; ``templates`` the family's prompt templates."""

    # A '<|image_pad|>' typed in a prompt without images is encoded as text, as the Qwen-Image 1.x pipelines do.
    text_image_pads = True

    def __init__(self, model: nn.Module, tokenizer, templates: Mapping[str, PromptTemplate],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", source: str = "<memory>"):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = dict(templates)
        self.dtype = dtype
        self.device = torch.device(device)
        self.source = source
        self.image_pad_id = tokenizer.token_id(IMAGE_PAD)

    @property
    def hidden_size(self) -> int:
        return self.model.model.config.hidden_size

    @staticmethod
    def _image_list(images: Sequence[torch.Tensor] | torch.Tensor | None) -> list[torch.Tensor]:
        """``None``, one ``[H, W, C]`` image, a ``[B, H, W, C]`` batch or a sequence of images -> a list."""
        if images is None:
            return []
        if isinstance(images, torch.Tensor):
            images = [images] if images.ndim == 3 else list(images.unbind(0))
        return list(images)

    def _prompt_ids(self, spec: PromptTemplate, prompt: str, image_count: int) -> tuple[list[int], list[int]]:
        """(token ids of the templated prompt, indices of its image placeholders, one per image)."""
        ids = self.tokenizer.encode(spec.format(prompt, image_count))
        if spec.max_tokens is not None:
            ids = ids[:spec.max_tokens]
        pads = [i for i, token in enumerate(ids) if token == self.image_pad_id]
        if len(pads) != image_count and (image_count or not self.text_image_pads):
            raise ValueError(f"the prompt has {len(pads) - image_count} extra '{IMAGE_PAD}' placeholder(s) "
                             f"beyond the {image_count} image(s); remove them from the prompt text.")
        return ids, pads

    def _embed_prompt(self, ids: list[int], pads: list[int], images: Sequence[torch.Tensor],
                      grids: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """Input embeddings ``[L, hidden]`` (encoder dtype) with placeholder ``pads[i]`` replaced by ``images[i]``
        ``[rows * cols, hidden]`` (merged grid ``grids[i]``), and the image spans ``(start, rows, cols)``."""
        spans, expanded, cursor = [], [], 0
        for pad, (rows, cols) in zip(pads, grids):
            expanded += ids[cursor:pad]
            spans.append((len(expanded), rows, cols))
            expanded += [self.image_pad_id] * (rows * cols)
            cursor = pad + 1
        expanded += ids[cursor:]
        token_ids = torch.tensor(expanded, dtype=torch.long, device=self.device)
        embeds = self.model.model.embed_tokens(token_ids, out_dtype=self.dtype).to(self.dtype)
        for (start, rows, cols), tokens in zip(spans, images):
            embeds[start:start + rows * cols] = tokens.to(self.dtype)
        return embeds, spans
