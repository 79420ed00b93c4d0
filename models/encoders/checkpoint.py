"""Reading a Qwen-VL encoder checkpoint's layout: names, shapes, block counts and ``config.json`` sections, shared
by the encoders' shape detection (:mod:`.qwen25vl.encoder`, :mod:`.qwen3vl.encoder`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from ..io.model_config import ModelConfig
from ..io.weights import WeightFileError

__all__ = ["canonical_name", "int_list", "CheckpointShapes"]


def canonical_name(key: str) -> str | None:
    """Checkpoint name -> module name (Comfy single-file names); ``None`` drops it (lm_head, fp8 marker).
    transformers-5 names: ``model.language_model.X`` -> ``model.X``, ``model.visual.X`` -> ``visual.X``."""
    if key.startswith("lm_head.") or key == "scaled_fp8":
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def _block_count(names: Iterable[str], prefix: str, source: str) -> int:
    """How many blocks ``prefix + N`` there are; they must be numbered 0..n-1."""
    segments = (n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix))
    indices = {int(segment) for segment in segments if segment.isdecimal()}  # other names: "unexpected" later
    if indices != set(range(len(indices))):
        raise WeightFileError(f"{source}: blocks {prefix}N are not numbered 0..{len(indices) - 1} "
                              f"(found {sorted(indices)[:8]}...); the file is incomplete.")
    return len(indices)


def _json_sections(config: Mapping | None, source: str) -> tuple[Mapping, Mapping]:
    """(text, vision) sub-configs of an HF config.json, legacy (top-level text keys) or nested."""
    if not config:
        return {}, {}
    if not isinstance(config, ModelConfig):  # e.g. built from GGUF metadata: checked the same way
        config = ModelConfig(dict(config), source)
    return config.get("text_config", {}) or config, config.get("vision_config", {})


def int_list(values, source: str, what: str, length: int | None = None, below: int | None = None) -> tuple[int, ...]:
    """A config list of non-negative integers (``length`` of them, each under ``below``), else WeightFileError."""
    if (isinstance(values, list) and (length is None or len(values) == length)
            and all(type(v) is int and 0 <= v < (below if below is not None else v + 1) for v in values)):
        return tuple(values)
    raise WeightFileError(f"{source}: config.json {what} is {values!r}; expected "
                          f"{length or 'a list of'} non-negative integers{f' below {below}' if below else ''}.")


class CheckpointShapes:
    """A checkpoint's tensors under canonical names, read to detect a model's shape: every read is checked, and
    the config.json sections are at hand (:attr:`text`, :attr:`vision`; empty without config.json).

    ``required`` names must all be present, else ``WeightFileError`` "not {expected}"; ``model`` names the
    architecture in errors (e.g. "Qwen3-VL").
    """

    def __init__(self, names: Iterable[str], shape_of: Callable[[str], Sequence[int]], config: Mapping | None,
                 source: str, model: str, expected: str, required: Sequence[str]):
        self.names, self.shape_of, self.source, self.model = set(names), shape_of, source, model
        missing = [n for n in required if n not in self.names]
        if missing:
            raise WeightFileError(f"{source}: not {expected}: missing {', '.join(missing)}.")
        self.text, self.vision = _json_sections(config, source)

    def __call__(self, name: str, rank: int) -> tuple[int, ...]:
        """The shape of tensor ``name``, which must be a non-empty ``rank``-D tensor."""
        found = tuple(self.shape_of(name))
        if len(found) != rank or not all(found):
            raise WeightFileError(f"{self.source}: tensor '{name}' has shape {list(found)}; a {self.model} checkpoint "
                                  f"has a non-empty {rank}-D tensor there. The file is damaged or of another model.")
        return found

    def count(self, prefix: str) -> int:
        """How many blocks ``prefix + N`` there are (numbered 0..n-1)."""
        return _block_count(self.names, prefix, self.source)

    def heads(self, head_dim: int, q_rows: int, kv_rows: int) -> tuple[int, int]:
        """(query heads, KV heads) of attention projections with these row counts."""
        if head_dim <= 0 or q_rows % head_dim or kv_rows % head_dim or (q_rows // head_dim) % (kv_rows // head_dim):
            raise WeightFileError(f"{self.source}: attention shapes q {q_rows} / kv {kv_rows} rows do not fit "
                                  f"head_dim {head_dim}; not a {self.model} layout.")
        return q_rows // head_dim, kv_rows // head_dim

    def rope(self, default_theta: float) -> tuple[float, tuple[int, int, int] | None]:
        """The language model's (rope theta, M-RoPE sections or None) from config.json (transformers 4 or 5 keys)."""
        rope = self.text.get("rope_parameters", {}) or self.text.get("rope_scaling", {})
        section = rope.get("mrope_section")
        theta = float(self.text.get("rope_theta", 0.0) or rope.get("rope_theta", 0.0) or default_theta)
        return theta, int_list(section, self.source, "mrope_section", 3) if section is not None else None

    def check_vision_output(self, vision_width: int, text_width: int) -> None:
        if vision_width != text_width:
            raise WeightFileError(f"{self.source}: the vision tower outputs {vision_width} features but the language "
                                  f"model is {text_width} wide; the tensors come from different models.")
