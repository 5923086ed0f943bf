"""API keys: their format, how the registry keeps them, and how one is checked (no grpc).

**Format.** ``flt_<id>_<secret>``: ``id`` is 16 hex digits (8 random bytes), the key's public
name in the registry and in the fleet; ``secret`` is 32 random bytes, URL-safe base64 (43
characters). Only the controller ever sees a whole key, once, when it makes it
(``flotilla keys create`` prints it); nothing keeps it.

**Hash: HMAC-SHA256 with a per-key random salt, no slow hash, no pepper.** A slow hash (scrypt,
argon2) exists to make guessing a *low-entropy* secret (a password) expensive once its hash is
known. These secrets are 256 random bits: guessing one from its hash is 2^255 HMACs on average
whatever the hash costs, so a slow hash buys nothing, and it would cost every router call
milliseconds of CPU where HMAC-SHA256 costs about a microsecond. Measured on the 2-core dev
machine: ``hashlib.scrypt`` at n=2^14, r=8 took 75 ms per call; a registered key's whole
``KeyBook.authorize`` (parse, HMAC, compare, glob, bucket) 14 us, a static key's 2 us. A server pepper would protect against a leak of the records only if
the secrets were guessable, and it would be one more secret to hand to every router; the hashes
travel in the fleet (to the mesh's own services only), which is safe for the same reason. The
salt makes equal secrets (there are none in practice) hash differently and keeps the hash
specific to its record.

**Checking.** ``KeyRecord.verify`` compares digests with ``hmac.compare_digest`` (constant time);
a caller presenting an id no record has is checked against a stand-in record
(``UNKNOWN_RECORD``), so an unknown id costs the same HMAC and comparison as a wrong secret and
both get the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

PREFIX = "flt"
ID_BYTES = 8
SECRET_BYTES = 32
SALT_BYTES = 16
ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
"""Key names: 1-63 lowercase letters, digits, '.', '_' and '-', starting and ending with a letter or digit."""
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 253


def key_hash(salt: bytes, secret: str) -> bytes:
    """HMAC-SHA256 of the key's secret part, keyed by the record's salt."""
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def split_key(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a key in this format; None for anything else (a static key, garbage)."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not ID_PATTERN.match(parts[1]) or not parts[2]:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True)
class KeyRecord:
    """What the registry keeps of one key and the fleet carries to routers: never the key."""

    name: str
    id: str
    salt: bytes
    hash: bytes
    models: tuple[str, ...] = ("*",)
    """Glob patterns (``fnmatch``, case-sensitive) of the models the key may call."""
    rate_per_s: float = 0.0
    """Requests per second over all of a router's processes; 0 = unlimited."""
    burst: int = 0
    """Requests a full bucket allows at once (0 with a rate: one second's worth, at least 1)."""
    expires_unix_s: float = 0.0
    """0 = never."""
    created_unix_s: float = 0.0
    last_used_unix_s: float = field(default=0.0, compare=False)
    """As the routers last reported it (approximate); 0 = never."""

    def verify(self, secret: str) -> bool:
        """Whether ``secret`` is this key's secret part (constant time in the secret)."""
        return hmac.compare_digest(key_hash(self.salt, secret), self.hash)

    @property
    def effective_burst(self) -> int:
        return self.burst or max(1, int(self.rate_per_s + 0.999999))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "id": self.id, "salt": self.salt.hex(), "hash": self.hash.hex(),
            "models": list(self.models), "rate_per_s": self.rate_per_s, "burst": self.burst,
            "expires_unix_s": self.expires_unix_s, "created_unix_s": self.created_unix_s,
            "last_used_unix_s": self.last_used_unix_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        return cls(
            name=data["name"], id=data["id"], salt=bytes.fromhex(data["salt"]), hash=bytes.fromhex(data["hash"]),
            models=tuple(data.get("models", ("*",))), rate_per_s=float(data.get("rate_per_s", 0.0)),
            burst=int(data.get("burst", 0)), expires_unix_s=float(data.get("expires_unix_s", 0.0)),
            created_unix_s=float(data.get("created_unix_s", 0.0)),
            last_used_unix_s=float(data.get("last_used_unix_s", 0.0)),
        )


def new_key(
    name: str,
    models: tuple[str, ...],
    *,
    rate_per_s: float = 0.0,
    burst: int = 0,
    expires_unix_s: float = 0.0,
    created_unix_s: float = 0.0,
) -> tuple[KeyRecord, str]:
    """A fresh key: its record and the key itself (to be shown once)."""
    key_id = secrets.token_hex(ID_BYTES)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    salt = secrets.token_bytes(SALT_BYTES)
    record = KeyRecord(
        name=name, id=key_id, salt=salt, hash=key_hash(salt, secret), models=models, rate_per_s=rate_per_s,
        burst=burst, expires_unix_s=expires_unix_s, created_unix_s=created_unix_s,
    )
    return record, f"{PREFIX}_{key_id}_{secret}"


UNKNOWN_RECORD = KeyRecord(name="", id="0" * 16, salt=bytes(SALT_BYTES), hash=bytes(32))
"""Checked in place of a record when the presented id has none: the same work, then a refusal."""
