"""Socket addresses as results spell them: one form for the servers, the tracer and the records."""

from __future__ import annotations

from typing import Any


def format_peer(address: Any) -> str:
    """A sockaddr as ``host:port`` (``[host]:port`` for IPv6)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
