"""Who may listen where: a loopback address is free, anything reachable from the network needs
a token. One rule for the dashboard and the metrics endpoint, so neither can be left open by a
default or by a typo in an address.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Final

MIN_TOKEN_LEN: Final = 8


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def binding_problem(what: str, host: str, token: str | None, how: str) -> str | None:
    """Why ``what`` must not listen on ``host`` with ``token`` (``how`` says how to give one),
    or None when it may."""
    if token is not None and len(token) < MIN_TOKEN_LEN:
        return (
            f"the {what} token is {len(token)} characters; use at least {MIN_TOKEN_LEN} (e.g. "
            "from `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
        )
    if token is None and not is_loopback(host):
        return (
            f"binding the {what} to {host} makes it reachable from the network: {how}, or "
            "keep it on 127.0.0.1"
        )
    return None


def bearer_ok(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())
