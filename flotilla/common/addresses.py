"""``host:port`` strings: split into their parts and joined back (IPv6 hosts in brackets)."""

from __future__ import annotations


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); ValueError naming the target otherwise."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {target!r} is not host:port")
    return host.strip("[]"), int(port)


def split_endpoint(endpoint: str, secure: bool = False) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the scheme's port when none) as (host, port): an S3 or HTTP endpoint."""
    host, _, port = endpoint.rpartition(":")
    if not (host and port.isdigit()) or (host.startswith("[") and not host.endswith("]")):
        host, port = endpoint, "443" if secure else "80"
    return host.removeprefix("[").removesuffix("]"), int(port)


def join_address(ip: str, port: int) -> str:
    """``ip:port``, with IPv6 addresses in brackets (the form gRPC targets take)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
