"""Prompt encoding: positive and negative prompts to the host's CONDITIONING, with the reference template."""

from __future__ import annotations

from .common import CONDITIONING, DEFAULT_NEGATIVE, Node, TextEncoder, io, mappings, output, prompt_input, schema


class TextEncode(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "TextEncode", "Qwen-Image Text Encode", CONDITIONING,
            "Encodes a prompt and a negative prompt with Qwen2.5-VL using the text-to-image template of the "
            "reference pipeline (system prompt dropped from the embeddings).",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="From Load Qwen-Image Text Encoder."),
                prompt_input("prompt", "What to draw. Qwen-Image follows long, detailed prompts and renders quoted "
                                       "text (English and Chinese) well."),
                prompt_input("negative_prompt", "What to steer away from, used when CFG > 1. The reference default "
                                                "is a single space.", default=DEFAULT_NEGATIVE),
            ],
            outputs=[output(io.Conditioning, "positive", "Conditioning for the prompt."),
                     output(io.Conditioning, "negative", "Conditioning for the negative prompt (true CFG).")])

    @classmethod
    def execute(cls, text_encoder, prompt: str, negative_prompt: str) -> io.NodeOutput:
        positive = text_encoder.encode(prompt, template="t2i")
        negative = text_encoder.encode(negative_prompt, template="t2i")
        return io.NodeOutput(text_encoder.conditioning(positive), text_encoder.conditioning(negative))


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(TextEncode)
