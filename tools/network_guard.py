"""No network: sockets may reach this machine only (loopback addresses, ``localhost``, local AF_UNIX sockets).

The pack must never need the network at run time, so the tests run with this guard in their own process
(tests/conftest.py) and in the ComfyUI host they start (``ComfyHost(offline=True)`` puts
``tools/offline_startup`` first on the host's PYTHONPATH; its ``sitecustomize`` installs the guard before the host
imports anything).  Standard library only.

A blocked attempt raises :class:`NetworkBlockedError` (a ``ConnectionError``, so code that copes with an
unreachable server copes with it too), naming the address.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["NetworkBlockedError", "install", "is_local"]

_LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost"}


class NetworkBlockedError(ConnectionError):
    """A connection or name lookup for an address outside this machine, while the guard is installed."""


def is_local(host) -> bool:
    """Whether ``host`` (a name or an address, str or bytes) is this machine."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).split("%", 1)[0].strip("[]").lower()  # drop an IPv6 scope id / brackets
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name would need a DNS lookup
    return address.is_loopback or address.is_unspecified


def _refuse(host) -> None:
    raise NetworkBlockedError(f"network access to {host!r} is blocked: only this machine may be reached "
                              "(loopback and local sockets) while the network guard is on")


def _checking_address(method):
    """A socket method whose last argument is the address (connect, connect_ex, sendto), checked first."""
    def guarded(self, *args):
        if self.family != getattr(socket, "AF_UNIX", None) and isinstance(args[-1], tuple) and \
                not is_local(args[-1][0]):
            _refuse(args[-1][0])
        return method(self, *args)
    return guarded


def _checking_host(function):
    """A name lookup (getaddrinfo, gethostbyname...) whose first argument is the host, checked first."""
    def guarded(host, *args, **kwargs):
        if not is_local(host):
            _refuse(host)
        return function(host, *args, **kwargs)
    return guarded


def install() -> None:
    """Patch the socket module in this process (idempotent)."""
    if getattr(socket, "_qip_network_guard", False):
        return
    for name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, name, _checking_address(getattr(socket.socket, name)))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        setattr(socket, name, _checking_host(getattr(socket, name)))
    socket._qip_network_guard = True
