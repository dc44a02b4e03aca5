"""Who owns a session or a response when only a digest of the owner is known.

Owners (API keys, or tenant digests) and cache namespaces contain secrets: what is written to disk or exported
is their sha256 digest. A session or response that comes back from disk is owned by an `OwnerDigest`, which
compares equal to the raw owner it digests, so every `x.owner == owner` check works unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any


def _digest(kind: str, value: str | None) -> str:
    return hashlib.sha256(f"{kind}\x00{'' if value is None else 'v' + value}".encode()).hexdigest()


class OwnerDigest:
    """The owner of a session that came from disk or an import: only its digest is known. Equal to the raw owner
    it digests (and to an equal digest), so `s.owner == owner` checks need no change."""

    __slots__ = ("digest",)

    def __init__(self, digest: str):
        self.digest = digest

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OwnerDigest):
            return other.digest == self.digest
        if other is None or isinstance(other, str):
            return owner_digest(other) == self.digest
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"OwnerDigest({self.digest[:12]}…)"


def owner_digest(owner: Any) -> str:
    return owner.digest if isinstance(owner, OwnerDigest) else _digest("owner", owner)


def namespace_digest(namespace: str) -> str:
    return _digest("namespace", namespace)
