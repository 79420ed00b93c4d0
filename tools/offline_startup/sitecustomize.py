"""Imported at start-up by any Python whose PYTHONPATH begins with this folder: installs the network guard
(tools/network_guard.py, loaded by path so nothing else of tools/ shadows the host's modules)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("qip_network_guard",
                                               Path(__file__).resolve().parent.parent / "network_guard.py")
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)
_guard.install()
