"""No network at run time: the whole test session (and the host it starts) can reach this machine only.

tests/conftest.py installs the guard before any test module is imported, so every other test - loaders,
references, the host's graphs - passes without the network.  Here: the guard really blocks, loopback still works,
and the host server runs under the same guard.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from env import comfyui_path, venv_python
from host import OFFLINE_STARTUP
from network_guard import NetworkBlockedError, is_local

OUTSIDE = "203.0.113.7"  # TEST-NET-3: never routed


def test_connections_outside_this_machine_are_blocked():
    with socket.socket() as s, pytest.raises(NetworkBlockedError, match=OUTSIDE):
        s.connect((OUTSIDE, 80))
    with pytest.raises(NetworkBlockedError, match="huggingface.co"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(OSError, match="blocked"):  # what urllib / requests / huggingface_hub would get
        socket.create_connection(("example.com", 443), timeout=1)


def test_loopback_and_local_sockets_still_work(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
    if hasattr(socket, "AF_UNIX"):
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
            server.bind(str(tmp_path / "s"))
            server.listen()
            client.connect(str(tmp_path / "s"))
    assert all(map(is_local, ["127.0.0.1", "127.8.9.10", "::1", "localhost", "0.0.0.0", b"127.0.0.1", None]))
    assert not any(map(is_local, [OUTSIDE, "10.0.0.1", "2001:db8::1", "example.com"]))


def test_the_host_runs_under_the_same_guard(host):
    if not Path(f"/proc/{host.process.pid}/environ").exists():
        pytest.skip("no /proc on this system")
    environ = Path(f"/proc/{host.process.pid}/environ").read_bytes().split(b"\0")
    assert any(entry.startswith(b"PYTHONPATH=" + str(OFFLINE_STARTUP).encode()) for entry in environ)
    probe = f"import socket\ntry:\n    socket.create_connection(('{OUTSIDE}', 80), timeout=2)\nexcept OSError as e:\n" \
            "    print(type(e).__name__)\n"
    result = subprocess.run([str(venv_python()), "-c", probe], cwd=comfyui_path(), env=host.environment(),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "NetworkBlockedError", result.stderr[-2000:]
