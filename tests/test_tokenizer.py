"""models.encoders.tokenizer: token ids identical to transformers' Qwen2Tokenizer on the same files; tokenizer discovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2Tokenizer

from models.encoders.tokenizer import QwenTokenizer, TokenizerNotFoundError, find_tokenizer
from references import host_tokenizer_dir

CORPUS = [
    "A photo of a red fox sitting in the snow, golden hour, 35mm.",
    "一只橘猫坐在窗台上，阳光洒在它的毛上，背景是城市的天际线。",
    "Poster with the title \"春节快乐 Happy New Year 2025\" in bold red letters, 中英文混排.",
    "日本語のテキスト、한국어 텍스트, and Ελληνικά with accents: café, naïve, Å, e\u0301 (combining).",
    "Emoji party 😀🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈 and symbols ©®™ ∑∫√ →←",
    "tabs\tand\t\tmore tabs\t\n\n\nmultiple newlines\r\n\r\nwindows lines   \n   trailing spaces   ",
    "   leading spaces and     runs      of spaces \u3000 ideographic space \u00a0 nbsp ",
    "<|im_start|>system\nYou are a bot.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>make it blue",
    "<|endoftext|><|box_start|>(10,20),(30,40)<|box_end|><tool_call>{\"a\": 1}</tool_call><|fim_prefix|>x<|fim_suffix|>",
    "half tokens <|im_start <|im_end|x |>< <||> <|image_pad|<|vision_end|>>",
    "Numbers: 0 7 42 3.14159 -2.5e-10 1,000,000 ２０２５ ½ ⅓ 0x1F 1e6 100%",
    "def f(x):\n    return {'k': [i ** 2 for i in range(x)]}  # comment\n\nclass A:\n\tpass\n",
    "Contractions: I'm, you're, it's, we've, they'll, he'd, DON'T, She'S",
    "",
    " ",
    "\n",
]
LONG_TEXT = " ".join(CORPUS[:6]) * 30  # well over 1024 tokens


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return host_tokenizer_dir()


@pytest.fixture(scope="module")
def ours(tokenizer_dir) -> QwenTokenizer:
    return QwenTokenizer.from_folder(tokenizer_dir)


@pytest.fixture(scope="module")
def references(tokenizer_dir):
    return [Qwen2Tokenizer.from_pretrained(str(tokenizer_dir)), AutoTokenizer.from_pretrained(str(tokenizer_dir))]


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_ids_match_transformers(ours, references, index):
    text = CORPUS[index]
    ids = ours.encode(text)
    for reference in references:
        assert ids == reference(text)["input_ids"], text


def test_long_prompt_matches(ours, references):
    ids = ours.encode(LONG_TEXT)
    assert len(ids) > 1024
    assert ids == references[0](LONG_TEXT)["input_ids"]


def test_special_tokens_are_single_ids(ours):
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|endofmeta|>": 151668}
    for token, index in expected.items():
        assert ours.encode(token) == [index]
        assert ours.token_id(token) == index
    text = CORPUS[7]
    assert ours.decode(ours.encode(text)) == text


def test_gguf_style_constructor(tokenizer_dir, ours, references):
    """tokens indexed by id (as tokenizer.ggml.tokens), merges as strings, added tokens with a special flag."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = [(int(i), e["content"], e["special"]) for i, e in config["added_tokens_decoder"].items()]
    tokens = [None] * (max(i for i, _, _ in added) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    for index, content, _ in added:
        tokens[index] = content
    assert None not in tokens
    merges = [line for line in (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")]
    rebuilt = QwenTokenizer.from_vocab(tokens, merges, added, source="gguf-like")
    for text in CORPUS + [LONG_TEXT]:
        assert rebuilt.encode(text) == references[0](text)["input_ids"]


def test_tokenizer_json_file(tmp_path, references):
    references[0].backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = find_tokenizer(explicit=tmp_path / "tokenizer.json")
    for text in CORPUS:
        assert loaded.encode(text) == references[0](text)["input_ids"]


def _copy_tokenizer(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(source / name, target / name)
    return target


def test_found_next_to_weights(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    weights = tmp_path / "text_encoders" / "te.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    _copy_tokenizer(tokenizer_dir, tmp_path / "text_encoders")
    assert find_tokenizer(weights=weights).source == str(tmp_path / "text_encoders")
    folder = tmp_path / "pipeline" / "text_encoder"  # diffusers layout: tokenizer/ is a sibling
    folder.mkdir(parents=True)
    _copy_tokenizer(tokenizer_dir, tmp_path / "pipeline" / "tokenizer")
    assert find_tokenizer(weights=folder).source == str(tmp_path / "pipeline" / "tokenizer")


def test_found_under_comfyui_path(tmp_path, tokenizer_dir, monkeypatch):
    _copy_tokenizer(tokenizer_dir, tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    empty = tmp_path / "weights"
    empty.mkdir()
    found = find_tokenizer(weights=empty / "te.safetensors")
    assert found.encode(CORPUS[7]) == QwenTokenizer.from_folder(tokenizer_dir).encode(CORPUS[7])


def test_host_dir_argument(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert find_tokenizer(weights=tmp_path / "x.safetensors", host_dirs=[tokenizer_dir]).source == str(tokenizer_dir)


def test_clear_error_when_nothing_found(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "no_comfy"))
    with pytest.raises(TokenizerNotFoundError) as info:
        find_tokenizer(weights=tmp_path / "te.safetensors", host_dirs=[tmp_path / "host"])
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer" in message.lower()
    for place in (tmp_path / "tokenizer", tmp_path / "host", tmp_path / "no_comfy" / "comfy" / "text_encoders"):
        assert str(place) in message
    assert isinstance(info.value, ValueError)  # a WeightFileError, like the other "wrong file" errors


def test_missing_tokenizer_config_is_refused(tmp_path, tokenizer_dir):
    folder = _copy_tokenizer(tokenizer_dir, tmp_path / "partial")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerNotFoundError, match="tokenizer_config.json"):
        find_tokenizer(explicit=folder)
    with pytest.raises(TokenizerNotFoundError, match="no such file"):
        find_tokenizer(explicit=tmp_path / "missing")
