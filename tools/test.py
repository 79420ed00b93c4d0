#!/usr/bin/env python3
"""The test command: ``python3 tools/test.py [pytest arguments]``.

Builds the cached environment and host on first use (tools/env.py), then runs pytest on tests/ inside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import env  # noqa: E402

env.reexec_in_env(Path(__file__))

import pytest  # noqa: E402  (available once inside the environment)

os.chdir(env.REPO_ROOT)
sys.exit(pytest.main(["-ra", "-p", "no:cacheprovider", *(sys.argv[1:] or ["tests"])]))
