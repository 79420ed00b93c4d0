"""Shared pytest setup.

* The repository root on sys.path (``from models import ...``) and ``tools/`` (the host harness).
* ``host``: ONE real ComfyUI per test session (tools/host.py), started on first use, with the pack loaded from
  this working tree and a temporary models folder filled with the tiny checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tools", REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def host_models_dir(tmp_path_factory) -> Path:
    """A ComfyUI models folder holding the tiny checkpoints the workflows use."""
    from tiny_models.factory import make_all
    from references import host_tokenizer_dir

    root = tmp_path_factory.mktemp("host-models")
    make_all(root, seed=0, tokenizer_dir=host_tokenizer_dir())
    return root


@pytest.fixture(scope="session")
def host(host_models_dir):
    from host import ComfyHost
    from tiny_models.images import example_inputs

    with ComfyHost(host_models_dir) as running:
        running.add_inputs(example_inputs())
        yield running
