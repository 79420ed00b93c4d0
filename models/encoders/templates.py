"""Chat prompt templates for condition encoders: how a family wraps the user's prompt (and image placeholders)
before encoding, and how many leading tokens it drops from the embeddings.  Each family folder defines its own
templates with :class:`PromptTemplate`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PromptTemplate", "IMAGE_PLACEHOLDER", "IMAGE_PAD", "chat"]

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def chat(system: str, user: str) -> str:
    """The Qwen chat format with one system and one user turn, open for the assistant's answer."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template with ``{}`` for the user text; ``drop`` leading tokens are cut from the embeddings."""

    text: str
    drop: int
    images: str  # "none", "one" (placeholder inside ``text``) or "numbered" ("Picture i: <placeholder>" each)
    max_tokens: int | None = None  # the tokenized prompt is truncated to this many tokens

    def format(self, prompt: str, image_count: int) -> str:
        if self.images == "numbered":
            prompt = "".join(f"Picture {i + 1}: {IMAGE_PLACEHOLDER}" for i in range(image_count)) + prompt
        return self.text.format(prompt)
