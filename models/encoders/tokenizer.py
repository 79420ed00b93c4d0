"""The Qwen2 byte-level BPE tokenizer, built with the ``tokenizers`` package from files found at run time.

Sources, in the order :func:`find_tokenizer` tries them:

1. an explicit folder or file given by the caller (``tokenizer.json``, or a folder with ``tokenizer.json`` or
   ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``);
2. next to the weights: the weights' folder itself, or a ``tokenizer/`` (or ``processor/``, as diffusers
   pipelines with a vision-language encoder store it) folder beside or inside it;
3. host folders passed by the caller, and ``$COMFYUI_PATH/comfy/text_encoders/qwen25_tokenizer``;

and, for llama.cpp GGUF text encoders, :meth:`QwenTokenizer.from_vocab` builds it from the metadata
(``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``).

``tokenizer_config.json`` is required next to ``vocab.json``: it lists the added tokens (``<|im_start|>``,
``<|image_pad|>`` ...) that must never be split into BPE pieces.  Places 2 and 3 are tried in turn: an incomplete
set (a stray ``vocab.json``) is passed over and a damaged one skipped with a warning, so the host's complete
tokenizer still serves.  Every malformed file is a :class:`WeightFileError` naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..io.weights import WeightFileError

__all__ = ["QwenTokenizer", "TokenizerNotFoundError", "find_tokenizer", "QWEN2_SPLIT_PATTERN"]

logger = logging.getLogger("qwen_image")

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs (with trailing newlines), newline runs, and whitespace (keeping one space for the next word).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HOST_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
_FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


class TokenizerNotFoundError(WeightFileError):
    """No usable Qwen2 tokenizer files were found; the message lists every place that was searched."""


class QwenTokenizer:
    """Text -> token ids, identical to transformers' ``Qwen2Tokenizer`` on the same files."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        self._tokenizer = tokenizer
        self.source = source

    # -- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab: dict[str, int] | Sequence[str], merges: Iterable[str | tuple[str, str]],
                   added_tokens: Iterable[tuple[int, str, bool]], source: str = "<memory>") -> "QwenTokenizer":
        """Build from a byte-level vocabulary, BPE merges and the added tokens ``(id, content, special)``.

        ``vocab`` is a ``token -> id`` dict (``vocab.json``) or a list indexed by id (GGUF
        ``tokenizer.ggml.tokens``); ``merges`` are ``"a b"`` strings or pairs.  For GGUF pass the tokens whose
        ``tokenizer.ggml.token_type`` is CONTROL (3, special) or USER_DEFINED (4, not special) as added tokens.
        Added tokens are matched before BPE and never split.
        """
        if not isinstance(vocab, dict):
            vocab = {token: index for index, token in enumerate(vocab)}
        if not all(isinstance(token, str) and _is_id(index) for token, index in vocab.items()):
            raise WeightFileError(f"{source}: the vocabulary must map token strings to non-negative integer ids.")
        vocab = dict(vocab)
        pairs = []
        for merge in merges:
            if isinstance(merge, str):
                left, sep, right = merge.partition(" ")
                if not sep or not left or not right:
                    raise WeightFileError(f"{source}: malformed BPE merge {merge!r}.")
                pairs.append((left, right))
            else:
                pairs.append(tuple(merge))
        added = sorted(added_tokens)
        for index, content, _ in added:
            vocab[content] = index  # pin the declared id (tokenizers would otherwise append after the vocabulary)
        try:
            model = BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        except Exception as e:  # the tokenizers package raises a bare Exception on inconsistent files
            raise WeightFileError(f"{source}: the vocabulary and merges do not fit together ({e}).") from None
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                                         single_word=False) for _, content, special in added])
        for index, content, _ in added:
            if tokenizer.token_to_id(content) != index:
                raise WeightFileError(f"{source}: added token {content!r} did not get its declared id {index}.")
        return cls(tokenizer, source)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenTokenizer":
        """A folder with ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json")
        missing = [n for n in _FOLDER_FILES if not (folder / n).is_file()]
        if missing:
            raise TokenizerNotFoundError(f"{folder}: not a tokenizer folder (missing {', '.join(missing)}).")
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise WeightFileError(f"{folder}: unreadable tokenizer file ({type(e).__name__}: {e}).") from None
        if not isinstance(vocab, dict) or not isinstance(config, dict):
            raise WeightFileError(f"{folder}: vocab.json and tokenizer_config.json must be JSON objects.")
        merges = [line for line in lines if line and not line.startswith("#version")]
        added = _added_tokens(folder, config)
        if not added:
            raise WeightFileError(f"{folder}: tokenizer_config.json lists no added tokens (<|im_start|> ...); "
                                  "special tokens would be split into pieces.")
        return cls.from_vocab(vocab, merges, added, source=str(folder))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "QwenTokenizer":
        """A ``tokenizer.json`` (HF fast-tokenizer file)."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise WeightFileError(f"{path}: not a valid tokenizer.json ({e}).") from None
        return cls(tokenizer, str(path))

    # -- use ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in the text become their single ids; no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """Id of a single (special) token such as ``"<|image_pad|>"``."""
        index = self._tokenizer.token_to_id(token)
        if index is None:
            raise WeightFileError(f"{self.source}: the tokenizer has no token {token!r}; it is not a Qwen2 tokenizer.")
        return index

    def __repr__(self) -> str:
        return f"QwenTokenizer({self.source!r})"


def _is_id(value) -> bool:
    return type(value) is int and 0 <= value < 1 << 31  # the tokenizers package stores ids as 32-bit


def _added_tokens(folder: Path, config: dict) -> list[tuple[int, str, bool]]:
    """Added tokens from ``tokenizer_config.json`` (``added_tokens_decoder``), else ``added_tokens.json``."""
    def malformed(name: str) -> WeightFileError:
        return WeightFileError(f"{folder}: {name} is malformed (expected token ids with their text).")

    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise malformed("added_tokens_decoder in tokenizer_config.json")
    added = []
    for index, entry in decoder.items():
        if not (index.isdecimal() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise malformed("added_tokens_decoder in tokenizer_config.json")
        added.append((int(index), entry["content"], entry.get("special", True) is not False))
    if not added and (folder / "added_tokens.json").is_file():
        try:
            table = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise malformed("added_tokens.json") from None
        if not (isinstance(table, dict) and all(map(_is_id, table.values()))):
            raise malformed("added_tokens.json")
        named = [config.get(key) for key in ("eos_token", "pad_token")]
        listed = config.get("additional_special_tokens") or []
        special = {t for t in [*named, *(listed if isinstance(listed, list) else [])] if isinstance(t, str)}
        added = [(index, content, content in special) for content, index in table.items()]
    return added


def _is_tokenizer_location(path: Path) -> bool:
    """A ``tokenizer.json`` file, or a folder with one or with all of vocab.json, merges.txt and
    tokenizer_config.json (a lone vocab.json is not a tokenizer)."""
    if path.is_file():
        return path.name == "tokenizer.json"
    return (path / "tokenizer.json").is_file() or all((path / n).is_file() for n in _FOLDER_FILES)


def _load_location(path: Path) -> QwenTokenizer:
    return QwenTokenizer.from_file(path) if path.is_file() else QwenTokenizer.from_folder(path)


def find_tokenizer(explicit: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                   host_dirs: Iterable[str | os.PathLike] = ()) -> QwenTokenizer:
    """Find and load the Qwen2 tokenizer (see the module docstring for the search order).

    ``explicit``: a folder or ``tokenizer.json`` the caller chose (used alone when given); ``weights``: the
    checkpoint file or folder, to look beside; ``host_dirs``: extra folders, e.g. the host's qwen25_tokenizer.
    Raises :class:`TokenizerNotFoundError` listing every place searched when nothing is found.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise TokenizerNotFoundError(f"tokenizer {path}: no such file or folder.")
        if not _is_tokenizer_location(path):
            raise TokenizerNotFoundError(f"{path}: no tokenizer.json and no vocab.json + merges.txt + "
                                         "tokenizer_config.json there.")
        return _load_location(path)
    candidates: list[Path] = []
    if weights is not None:
        weights = Path(weights)
        base = weights if weights.is_dir() else weights.parent
        candidates += [base, *(folder / sub for sub in ("tokenizer", "processor")
                                 for folder in (base, base.parent))]
    candidates += [Path(d) for d in host_dirs]
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]) / HOST_TOKENIZER_SUBDIR)
    unusable: dict[Path, str] = {}
    for candidate in candidates:
        if _is_tokenizer_location(candidate):
            try:
                return _load_location(candidate)
            except WeightFileError as e:  # e.g. a damaged copy next to the weights: the host's own is still good
                unusable[candidate] = str(e)
                logger.warning("Qwen-Image tokenizer: skipping %s (%s)", candidate, e)
    searched = "\n  ".join(f"{c} ({unusable[c]})" if c in unusable else str(c) for c in candidates) or \
        "(nowhere: no weights path, no host folder, no COMFYUI_PATH)"
    raise TokenizerNotFoundError(
        "No Qwen2.5 tokenizer found. Looked for tokenizer.json or vocab.json + merges.txt + tokenizer_config.json "
        f"in:\n  {searched}\nPass the tokenizer folder explicitly (ComfyUI ships one in "
        f"{HOST_TOKENIZER_SUBDIR}), set COMFYUI_PATH, or put the files next to the weights.")
