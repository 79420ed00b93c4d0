"""Chat prompt templates for condition encoders: how a family wraps the user's prompt (and image placeholders)
before encoding, and how many leading tokens it drops from the embeddings.  Each family folder defines its own
templates with :class:`PromptTemplate`; :func:`resolve_template` picks one for an encoder call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PromptTemplate", "IMAGE_PLACEHOLDER", "IMAGE_PAD", "chat", "system_turn", "resolve_template"]

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def system_turn(system: str) -> str:
    """The Qwen chat format's system turn."""
    return f"<|im_start|>system\n{system}<|im_end|>\n"


def chat(system: str, user: str) -> str:
    """The Qwen chat format with one system and one user turn, open for the assistant's answer."""
    return f"{system_turn(system)}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template with ``{}`` for the user text; leading tokens (``drop``) are cut from the embeddings.

    ``drop``: a token count, or the text of the dropped prefix (e.g. :func:`system_turn`), whose token count under
    the encoder's tokenizer is dropped (:meth:`drop_count`).  ``images``: ``"none"``, ``"one"`` (the placeholder is
    inside ``text``) or ``"numbered"``: ``image_label.format(i)`` + the placeholder for images i = 1..n, joined by
    ``image_separator``, before the user text.  ``empty_prompt``: what an empty user text becomes.
    """

    text: str
    drop: int | str
    images: str
    max_tokens: int | None = None  # the tokenized prompt is truncated to this many tokens
    image_label: str = "Picture {}: "
    image_separator: str = ""
    empty_prompt: str = ""

    def format(self, prompt: str, image_count: int) -> str:
        prompt = prompt or self.empty_prompt
        if self.images == "numbered":
            prompt = self.image_separator.join(self.image_label.format(i + 1) + IMAGE_PLACEHOLDER
                                               for i in range(image_count)) + prompt
        return self.text.format(prompt)

    def drop_count(self, encode: Callable[[str], Sequence[int]]) -> int:
        """Number of leading tokens to drop; ``encode`` is the encoder's tokenizer (text -> ids)."""
        return self.drop if isinstance(self.drop, int) else len(encode(self.drop))


def resolve_template(templates: Mapping[str, PromptTemplate], template: str | PromptTemplate,
                     image_count: int) -> PromptTemplate:
    """``template`` (a :class:`PromptTemplate` or a name in ``templates``), checked to take ``image_count`` images;
    otherwise a ``ValueError`` naming the templates that fit."""
    if isinstance(template, PromptTemplate):
        spec = template
    elif template in templates:
        spec = templates[template]
    else:
        raise ValueError(f"unknown template {template!r}; use one of {', '.join(templates)}")
    by_images = {kind: [n for n, t in templates.items() if t.images == kind] for kind in ("one", "numbered")}
    if spec.images == "none" and image_count:
        raise ValueError(f"template {template!r} takes no images (got {image_count}); use one of "
                         f"{', '.join(by_images['one'] + by_images['numbered'])}.")
    if spec.images == "one" and image_count != 1:
        raise ValueError(f"template {template!r} takes exactly one image (got {image_count}); "
                         f"use {' or '.join(by_images['numbered']) or 'a numbered template'} for several.")
    return spec
