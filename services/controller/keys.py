"""The registry's API keys: made, revoked and listed here, kept beside the models (no grpc).

One JSON object per key (``<artifact_bucket>/<controller.keys_prefix><name>.json``, a
``KeyRecord``: a salted hash, never the key), written through the same ``RecordStore`` as the
model records. The controller is the only writer; every change is a fleet generation naming the
key, so routers learn it over their fleet watch (``services.router.keys``).

**Last use** is what routers report (``ReportKeyUse``, every few seconds, of the keys they saw):
kept in memory at once, and written to the key's record at most every ``LAST_USE_SAVE_S``, so a
controller restart may lose up to that much of it. It is approximate by design; it is not part
of the fleet (routers do not need it).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import replace

from flotilla.common.apikeys import MAX_PATTERN_CHARS, MAX_PATTERNS, NAME_PATTERN, KeyRecord, new_key
from flotilla.common.ids import shorten
from flotilla.errors import AlreadyExists, InvalidArgument, NotFound
from flotilla.services.controller.registry import RecordStore

LAST_USE_SAVE_S = 60.0
"""A key's last use is written to its record at most this often."""
_PATTERN = re.compile(r"^[a-z0-9*?\[\]!._-]+$")


def check_key_name(name: str) -> None:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgument(
            f"key name {shorten(name, 70)!r} is not valid: use 1-63 lowercase letters, digits, '.', '_' "
            "and '-', starting and ending with a letter or digit"
        )


def check_patterns(models: list[str]) -> tuple[str, ...]:
    """The key's model globs, validated (lowercase model-name characters and ``* ? [ ] !``)."""
    if not models:
        raise InvalidArgument("a key needs at least one model pattern (e.g. 'efficientnet-*', or '*' for every model)")
    if len(models) > MAX_PATTERNS:
        raise InvalidArgument(f"a key takes at most {MAX_PATTERNS} model patterns, not {len(models)}")
    for pattern in models:
        if len(pattern) > MAX_PATTERN_CHARS or not _PATTERN.match(pattern):
            raise InvalidArgument(
                f"model pattern {shorten(pattern, 70)!r} is not valid: use model-name characters and the "
                "glob characters * ? [ ] !"
            )
        fnmatch.translate(pattern)
    return tuple(models)


class KeyRegistry:
    """Every registered key's record, and the store that keeps them (blocking: callers use a thread)."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.records: dict[str, KeyRecord] = {}
        self._saved_use: dict[str, float] = {}

    def load(self) -> None:
        for data in self.store.load_all():
            record = KeyRecord.from_json(data)
            self.records[record.name] = record
            self._saved_use[record.name] = record.last_used_unix_s

    def create(
        self,
        name: str,
        models: list[str],
        *,
        rate_per_s: float,
        burst: int,
        expires_unix_s: float,
        now_unix_s: float,
    ) -> tuple[KeyRecord, str]:
        """A new key's record (saved) and the key itself, which nothing keeps."""
        check_key_name(name)
        patterns = check_patterns(models)
        if rate_per_s < 0 or burst < 0:
            raise InvalidArgument("a key's rate and burst must not be negative (0 rate: unlimited)")
        if expires_unix_s and expires_unix_s <= now_unix_s:
            raise InvalidArgument("the key's expiry is in the past")
        if name in self.records:
            raise AlreadyExists(f"a key named {name!r} exists; revoke it first or choose another name")
        record, token = new_key(
            name, patterns, rate_per_s=rate_per_s, burst=burst, expires_unix_s=expires_unix_s,
            created_unix_s=now_unix_s,
        )
        self.store.save(name, record.to_json())
        self.records[name] = record
        self._saved_use[name] = 0.0
        return record, token

    def revoke(self, name: str) -> None:
        if name not in self.records:
            raise NotFound(f"no key named {shorten(name, 70)!r}")
        self.store.delete(name)
        del self.records[name]
        self._saved_use.pop(name, None)

    def listed(self) -> list[KeyRecord]:
        return [self.records[name] for name in sorted(self.records)]

    def used(self, uses: dict[str, float]) -> list[KeyRecord]:
        """Take routers' reports of last use; the records now due to be written (the caller saves them)."""
        due = []
        for name, at in uses.items():
            record = self.records.get(name)
            if record is None or at <= record.last_used_unix_s:
                continue
            record = replace(record, last_used_unix_s=at)
            self.records[name] = record
            if at - self._saved_use.get(name, 0.0) >= LAST_USE_SAVE_S:
                self._saved_use[name] = at
                due.append(record)
        return due

    def save(self, records: list[KeyRecord]) -> None:
        for record in records:
            self.store.save(record.name, record.to_json())
