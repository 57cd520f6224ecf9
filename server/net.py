"""Small network helpers shared by the server's listeners (admin guard, drift sidecar)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a listener on this machine ("" and 0.0.0.0 do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
