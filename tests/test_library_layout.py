"""The library's shape: family code lives in family folders, shared code says nothing about one family.

* models/ holds only the public API and the registry at its root; everything else is in io/, common/, encoders/
  or a family folder.
* No module outside a family folder mentions a family's latent facts (16 channels, the 8x factor, Wan-2.1 latent
  statistics) or its prompt templates - in models/ and nodes/ alike.  The exceptions are named below with why.
* No import circle between the runtime library and the test factory: models/ never imports tiny_models.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = REPO_ROOT / "models"
SHARED_FOLDERS = {"io", "common", "encoders"}
FAMILY_FOLDERS = {"qwen_image", "qwen_image_2_1"}

# Qwen-Image 1.x facts that belong in models/qwen_image/ only.
FAMILY_FACTS = {
    "16 latent channels": re.compile(r"\b16\b[^\n]{0,24}channel|channel[^\n]{0,24}\b16\b|\[\s*\w+\s*,\s*16\s*,|"
                                     r"LATENT_CHANNELS\s*=|latent_channels\s*=\s*16"),
    "the 8x factor": re.compile(r"(?i)(factor|ratio)\s*=\s*8\b|(height|width|\])\s*(//|\*)\s*8\b|"
                                r"\b8\s*\*\s*(height|width)|\b8x\b"),
    "Wan-2.1 latent statistics": re.compile(r"-0\.7571|2\.8184|-0\.2921|1\.9160"),
    "Qwen-Image prompt templates": re.compile(r"Describe the image by detailing|Describe the key features of the "
                                              r"input image"),
}
# (file, fact): why the file may state it.
EXCEPTIONS = {
    ("models/registry.py", "16 latent channels"): "it tells every family's VAEs apart by their channel counts",
}


def _python_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def _offences(path: Path) -> list[str]:
    relative = path.relative_to(REPO_ROOT).as_posix()
    text = path.read_text(encoding="utf-8")
    return [fact for fact, pattern in FAMILY_FACTS.items()
            if pattern.search(text) and (relative, fact) not in EXCEPTIONS]


def test_no_family_code_at_the_root_of_models():
    root_files = sorted(p.name for p in MODELS.glob("*.py"))
    assert root_files == ["__init__.py", "registry.py"]
    folders = {p.name for p in MODELS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == SHARED_FOLDERS | FAMILY_FOLDERS


def test_family_facts_stay_in_family_folders():
    outside = [p for p in _python_files(MODELS, REPO_ROOT / "nodes")
               if not (MODELS in p.parents and p.relative_to(MODELS).parts[0] in FAMILY_FOLDERS)]
    offences = {p.relative_to(REPO_ROOT).as_posix(): _offences(p) for p in outside}
    assert {k: v for k, v in offences.items() if v} == {}


def test_the_fact_detector_can_fail(tmp_path):
    samples = {
        "16 latent channels": "samples = torch.zeros([batch, 16, h, w])",
        "the 8x factor": "pixels = latent.shape[-1] * 8",
        "Wan-2.1 latent statistics": "MEAN = (-0.7571, -0.7089)",
        "Qwen-Image prompt templates": 'SYSTEM = "Describe the image by detailing the color"',
    }
    for fact, line in samples.items():
        path = tmp_path / "sample.py"
        path.write_text(line + "\n")
        assert FAMILY_FACTS[fact].search(path.read_text()), fact
    assert not any(p.search("heads = 16\nwindow = 28 * 28\n") for p in FAMILY_FACTS.values())


def test_the_runtime_library_never_imports_the_test_factory():
    for path in _python_files(MODELS):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "tiny_models" not in node.module and "testing" not in node.module, path
            elif isinstance(node, ast.Import):
                assert not any("tiny_models" in alias.name for alias in node.names), path
