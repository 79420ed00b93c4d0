"""A probe process's start: the host's modules imported as its server imports them, then this pack as package
``qip`` (the probes import the host, which reads the command line and keeps module-level state: hence a process)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def start_host(comfy_dir: str) -> ModuleType:
    """Import the host from ``comfy_dir`` with the harness's command line (``--cpu``); returns ``folder_paths``
    (register model folders with it before :func:`load_pack`: the pack shares the folders' path lists)."""
    sys.argv = [sys.argv[0], "--cpu"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    return folder_paths


def load_pack(repo: str) -> ModuleType:
    """This working tree imported as the custom-node package ``qip`` (its nodes registered, as the host loads it)."""
    spec = importlib.util.spec_from_file_location("qip", repo + "/__init__.py", submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["qip"] = pack
    spec.loader.exec_module(pack)
    return pack
