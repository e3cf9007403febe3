"""Host names: what ``serve --host`` binds to and what a request's ``Host`` header names. No
FastAPI here, so the command checks its ``--host`` before the serve extra is imported."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)  # loopback addresses are IP addresses (``is_ip_address``)


def host_name(host: str) -> str:
    """The name in a ``Host`` header ("[::1]:8000" -> "::1"), lowercased; "" if none."""
    try:
        return urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return ""


def ip_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_ip_address(name: str) -> bool:
    return ip_address(name) is not None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    address = ip_address(host)
    return host in LOOPBACK_NAMES or (address is not None and address.is_loopback)
