"""Multiaddr parsing and checks shared by config and mesh (no libp2p host needed)."""

from __future__ import annotations

import multiaddr


def check_multiaddr(text: str, *, need_peer_id: bool) -> str | None:
    """Return a one-line problem description, or None when `text` is usable."""
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:  # the multiaddr package raises several unrelated types
        return f"not a multiaddr: {text!r} ({exc})"
    protos = [p.name for p in addr.protocols()]
    if "tcp" not in protos:
        return f"only TCP addresses are supported: {text!r}"
    if need_peer_id and "p2p" not in protos:
        return f"address needs a /p2p/<peer id> part: {text!r}"
    return None


def split_peer_addr(text: str) -> tuple[str, str]:
    """'/ip4/1.2.3.4/tcp/1/p2p/Qm..' -> ('/ip4/1.2.3.4/tcp/1', 'Qm..')."""
    head, sep, peer = text.rpartition("/p2p/")
    if not sep or not peer:
        raise ValueError(f"address has no /p2p/ part: {text!r}")
    return head, peer
