"""The public loaders (models.load_diffusion_model / load_vae / load_text_encoder) for both families: a Qwen-Image
2.1 file (diffusers folder, pipeline folder, Comfy-Org single file) loads as what load_*_2_1 gives, a 1.x file as
what the 1.x loaders give; a caller that pins a family (family=, or the DiT's model_class as the 1.x nodes do)
gets the other family's files refused with a message naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models
from models import (QwenImage21DiT, QwenImageDiT, WeightFileError, load_diffusion_model, load_diffusion_model_2_1,
                    load_text_encoder, load_text_encoder_2_1, load_vae, load_vae_2_1)
from models.qwen_image import dit_loader as dit_1x, text_encoder as text_encoder_1x, vae as vae_1x
from references import host_tokenizer_dir
from tiny_models.factory import make_dit, make_text_encoder, make_vae
from tiny_models.gguf_factory import make_dit_gguf
from tiny_models.qwen3vl import make_qwen3vl
from tiny_models.qwen_image_2_1 import TINY_DIT_2_1, make_dit_2_1
from tiny_models.qwen_image_2_1_vae import make_vae_2_1

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return host_tokenizer_dir()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("public_loaders")
    dit_folder = make_dit_2_1(root / "dit", layout="diffusers", dtype="fp32", seed=4)
    vae_folder = make_vae_2_1(root / "vae", layout="diffusers", dtype="fp32", seed=4)
    return {
        "dit_2_1 comfy": make_dit_2_1(root / "dit", dtype="bf16", prefix=True, seed=4),
        "dit_2_1 diffusers": dit_folder,
        "dit_2_1 pipeline": dit_folder.parent,
        "dit_2_1 gguf": make_dit_2_1(root / "dit", layout="gguf", dtype="Q8_0", seed=4),
        "vae_2_1 comfy": make_vae_2_1(root / "vae", layout="comfy", dtype="fp32", seed=4),
        "vae_2_1 diffusers": vae_folder,
        "vae_2_1 pipeline": vae_folder.parent,
        "te_2_1 comfy": make_qwen3vl(root / "te", dtype="bf16", seed=4),
        "te_2_1 hf": make_qwen3vl(root / "te", layout="hf", dtype="fp32", seed=4, tokenizer_dir=tokenizer_dir),
        "dit comfy": make_dit(root / "dit_1x", dtype="bf16", seed=4),
        "dit diffusers": make_dit(root / "dit_1x", layout="diffusers", seed=4),
        "dit gguf": make_dit_gguf(root / "dit_1x", qtype="Q8_0", seed=4),
        "vae comfy": make_vae(root / "vae_1x", seed=4),
        "te comfy": make_text_encoder(root / "te_1x", seed=4),
    }


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same class and config, and every parameter and buffer bit-identical (so every forward is too)."""
    assert type(a) is type(b) and getattr(a, "config", None) == getattr(b, "config", None)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        other = sb[name]
        assert type(tensor) is type(other) and tensor.dtype == other.dtype, name
        if tensor.dtype == torch.uint8:  # packed GGUF blocks: compare what they decode to
            tensor, other = tensor.dequantize(), other.dequantize()
        assert torch.equal(tensor, other), name


def dit_2_1_forward(model: QwenImage21DiT) -> torch.Tensor:
    """One call with a prompt and one condition image, as the 2.1 pipeline lays them out."""
    g = torch.Generator().manual_seed(0)
    channels, context_dim = TINY_DIT_2_1["in_channels"], TINY_DIT_2_1["context_in_dim"]
    slots = [False] * 3 + [True] * 4 + [False] * 2  # text, a 4x4 latent's 4 slots, text
    context = torch.randn(1, len(slots), context_dim, generator=g)
    ref = torch.randn(1, channels, 4, 4, generator=g)
    x = torch.randn(1, channels, 4, 6, generator=g)
    return model(x, torch.tensor([0.6]), context, ref_latents=[ref], image_slots=torch.tensor(slots))


def encoded(encoder) -> list[torch.Tensor]:
    out = encoder.encode(PROMPT)
    return [t for t in (out if isinstance(out, tuple) else (out.embeds, out.mask)) if isinstance(t, torch.Tensor)]


# -- Qwen-Image 2.1 files through the public loaders ----------------------------------------------------------------
@pytest.mark.parametrize("layout", ["comfy", "diffusers", "pipeline", "gguf"])
def test_dit_2_1_loads_as_the_2_1_loader_gives(files, layout):
    path = files[f"dit_2_1 {layout}"]
    ours, family = load_diffusion_model(path), load_diffusion_model_2_1(path)
    assert isinstance(ours, QwenImage21DiT)
    assert_same_model(ours, family)
    assert torch.equal(dit_2_1_forward(ours), dit_2_1_forward(family))
    assert_same_model(load_diffusion_model(path, family="qwen_image_2_1"), family)


def test_dit_2_1_keeps_the_caller_s_model_class(files):
    class Adapted(QwenImage21DiT):  # how a host adapts the calling convention
        pass

    model = load_diffusion_model(files["dit_2_1 comfy"], model_class=Adapted, dtype=torch.bfloat16)
    assert type(model) is Adapted and model.img_in.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["comfy", "diffusers", "pipeline"])
def test_vae_2_1_loads_as_the_2_1_loader_gives(files, layout):
    path = files[f"vae_2_1 {layout}"]
    ours, family = load_vae(path), load_vae_2_1(path)
    assert isinstance(ours, models.QwenImage21VAE)
    assert_same_model(ours, family)
    images = torch.rand(1, 64, 96, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.encode(images), family.encode(images))


@pytest.mark.parametrize("layout", ["comfy", "hf"])
def test_text_encoder_2_1_loads_as_the_2_1_loader_gives(files, tokenizer_dir, layout):
    path = files[f"te_2_1 {layout}"]
    ours = load_text_encoder(path, tokenizer=tokenizer_dir)
    family = load_text_encoder_2_1(path, tokenizer=tokenizer_dir)
    assert type(ours) is type(family) and set(ours.templates) == {"default"}
    assert_same_model(ours.model, family.model)
    for a, b in zip(encoded(ours), encoded(family), strict=True):
        assert torch.equal(a, b)


# -- Qwen-Image 1.x files load through them as before ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["comfy", "diffusers", "gguf"])
def test_1x_dit_still_loads(files, layout):
    path = files[f"dit {layout}"]
    ours = load_diffusion_model(path)
    assert isinstance(ours, QwenImageDiT)
    assert_same_model(ours, dit_1x.load_diffusion_model(path))


def test_1x_vae_and_text_encoder_still_load(files, tokenizer_dir):
    assert_same_model(load_vae(files["vae comfy"]), vae_1x.load_vae(files["vae comfy"]))
    ours = load_text_encoder(files["te comfy"], tokenizer=tokenizer_dir)
    family = text_encoder_1x.load_text_encoder(files["te comfy"], tokenizer=tokenizer_dir)
    assert type(ours) is models.TextEncoder and set(ours.templates) == {"t2i", "edit", "edit_plus"}
    assert_same_model(ours.model, family.model)
    for a, b in zip(encoded(ours), encoded(family), strict=True):
        assert torch.equal(a, b)


# -- a pinned family refuses the other family's files, naming both -------------------------------------------------
class Pinned1x(QwenImageDiT):  # what the 1.x diffusion-model node passes (HostQwenImageDiT)
    pass


PINNED_1X = {
    "dit_2_1 comfy": lambda p, tok: load_diffusion_model(p, model_class=Pinned1x),
    "dit_2_1 diffusers": lambda p, tok: load_diffusion_model(p, family="qwen_image"),
    "dit_2_1 gguf": lambda p, tok: load_diffusion_model(p, family="qwen_image"),
    "vae_2_1 comfy": lambda p, tok: load_vae(p, family="qwen_image"),
    "vae_2_1 diffusers": lambda p, tok: load_vae(p, family="qwen_image"),
    "te_2_1 comfy": lambda p, tok: load_text_encoder(p, tokenizer=tok, family="qwen_image"),
    "te_2_1 hf": lambda p, tok: load_text_encoder(p, tokenizer=tok, family="qwen_image"),
}


@pytest.mark.parametrize("kind", list(PINNED_1X))
def test_a_2_1_file_pinned_to_1x_is_refused_naming_both(files, tokenizer_dir, kind):
    path = files[kind]
    with pytest.raises(WeightFileError) as error:
        PINNED_1X[kind](path, tokenizer_dir)
    message = str(error.value)
    expected = {"dit_2_1": ("Qwen-Image 2.1", "not a Qwen-Image diffusion model"),
                "vae_2_1": ("Qwen-Image 2.1 VAE", "needs the Qwen-Image VAE"),
                "te_2_1": ("Qwen-Image 2.1", "Qwen3-VL", "not a Qwen2.5-VL")}[kind.split()[0]]
    assert str(path) in message and all(words in message for words in expected), message


PINNED_2_1 = {
    "dit comfy": lambda p, tok: load_diffusion_model_2_1(p),
    "dit diffusers": lambda p, tok: load_diffusion_model(p, family="qwen_image_2_1"),
    "dit gguf": lambda p, tok: load_diffusion_model(p, model_class=QwenImage21DiT),
    "vae comfy": lambda p, tok: load_vae(p, family="qwen_image_2_1"),
    "te comfy": lambda p, tok: load_text_encoder(p, tokenizer=tok, family="qwen_image_2_1"),
}


@pytest.mark.parametrize("kind", list(PINNED_2_1))
def test_a_1x_file_pinned_to_2_1_is_refused_naming_both(files, tokenizer_dir, kind):
    path = files[kind]
    with pytest.raises(WeightFileError) as error:
        PINNED_2_1[kind](path, tokenizer_dir)
    message = str(error.value)
    expected = {"dit": ("Qwen-Image diffusion model", "not a Qwen-Image 2.1"), "vae": ("Qwen-Image VAE", "2.1"),
                "te": ("Qwen2.5-VL", "Qwen3-VL")}[kind.split()[0]]
    assert str(path) in message and all(words in message for words in expected), message


def test_wrong_pins_are_caller_errors(files):
    path = files["dit_2_1 comfy"]
    with pytest.raises(ValueError, match="family 'qwen_image_3'"):
        load_diffusion_model(path, family="qwen_image_3")
    with pytest.raises(ValueError, match="builds a qwen_image DiT"):
        load_diffusion_model(path, model_class=Pinned1x, family="qwen_image_2_1")
    with pytest.raises(TypeError, match="derives from none of the DiTs"):
        load_diffusion_model(path, model_class=torch.nn.Linear)


def test_unpinned_wrong_files_are_named_by_their_family_s_loader(files, tmp_path):
    """Unpinned, a file goes to its own family's loader of the role asked for (the 1.x one for other models'
    files), which refuses it naming what it is."""
    with pytest.raises(WeightFileError, match="this is the Qwen-Image 2.1 VAE .*, not a Qwen-Image 2.1 diffusion"):
        load_diffusion_model(files["vae_2_1 comfy"])
    with pytest.raises(WeightFileError, match="this is the Qwen-Image VAE, not a Qwen-Image diffusion model"):
        load_diffusion_model(files["vae comfy"])
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(4, 4)}, str(flux))
    with pytest.raises(WeightFileError, match="this is a Flux diffusion model, not a Qwen-Image diffusion model"):
        load_diffusion_model(flux)


def test_load_progress_reports_every_model_loaded_in_its_context(tmp_path):
    from models import load_progress

    path = make_dit(tmp_path, dtype="fp32", seed=5)
    calls: list[tuple[int, int]] = []
    with load_progress(lambda done, total: calls.append((done, total))):
        dit = load_diffusion_model(path)
    tensors = len(dict(dit.named_parameters()))
    assert calls and calls[-1] == (tensors, tensors)  # ends at every tensor read
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    load_diffusion_model(path)  # outside the context: nothing more reported
    assert calls[-1] == (tensors, tensors) and len(calls) == len(set(calls))

    class Interrupted(Exception):
        pass

    def interrupt(done: int, total: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted), load_progress(interrupt):
        load_diffusion_model(path)
