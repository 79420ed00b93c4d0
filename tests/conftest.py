"""Shared pytest setup.

* The repository root on sys.path (``from models import ...``) and ``tools/`` (the host harness).
* No network: the guard (tools/network_guard.py) is installed for the whole session, before any test module is
  imported; only this machine (loopback, local sockets) can be reached.  The host runs with the same guard.
* ``host``: ONE real ComfyUI per test session (tools/host.py), started on first use, offline, with the pack loaded
  from this working tree, the test-only nodes of tests/host_nodes/ and a temporary models folder filled with the
  tiny checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tools", REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import network_guard  # noqa: E402  (tools/ is on the path only now)

network_guard.install()
TEST_NODES = REPO_ROOT / "tests" / "host_nodes"
# glibc: blocks from 64 KiB up always come from mmap, so freed tensors leave the server at once, however many
# graphs ran before; the tests that read its resident memory (/free, the soak's slope) then see live memory only.
MEASURABLE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


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

    with ComfyHost(host_models_dir, offline=True, extra_packs=(TEST_NODES,), extra_env=MEASURABLE_MEMORY) as running:
        running.add_inputs(example_inputs())
        yield running
