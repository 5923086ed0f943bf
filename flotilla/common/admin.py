"""The control plane's admin credential: who may change the fleet (no grpc).

The controller's mutating calls and a batcher's SetBatching need ``authorization: Bearer <admin
key>`` with a key of ``controller.admin_keys``. No header, or one that is not ``Bearer <key>``, is
``Unauthenticated``; a key that is not an admin key (an API key, say) is ``PermissionDenied``. With
no admin key configured every mutation is refused with ``PermissionDenied`` that says how to set
one: secure by default; the local stack always generates one. Read-only calls (ListModels,
GetModel, ListKeys, WatchFleet, ShardHeartbeat, a batcher's GetStats) are the mesh's own and stay open.

With TLS on, a caller whose verified client certificate has a common name in
``controller.admin_identities`` passes without a key (mutual TLS is the credential).

``admin_key_from`` is where clients find the key: ``FLOTILLA_ADMIN_KEY``, else the local stack's
stack file (mode 0600).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from flotilla.common.wire import AUTH_HEADER
from flotilla.config import FlotillaSettings
from flotilla.errors import PermissionDenied, Unauthenticated

ADMIN_KEY_ENV = "FLOTILLA_ADMIN_KEY"
BEARER = "bearer "


class AdminGate:
    """Checks a call's metadata for an admin key (compared with every key in constant time)."""

    def __init__(self, keys: Iterable[str], identities: Iterable[str] = ()) -> None:
        """``identities``: client certificate common names that are admins (TLS on)."""
        self._keys = [k.encode() for k in keys if k]
        self._identities = frozenset(identities)

    def check(
        self, metadata: Iterable[tuple[str, str | bytes]], action: str, identities: Iterable[str] = ()
    ) -> None:
        """Returns when the call carries an admin key, or comes with a client certificate whose common
        name (``identities``, what TLS verified) is an admin's; raises as the module says otherwise."""
        if not self._identities.isdisjoint(identities):
            return
        authorization = next((v for k, v in metadata if k == AUTH_HEADER and isinstance(v, str)), "")
        if not authorization or not authorization.lower().startswith(BEARER):
            raise Unauthenticated(
                f"{action} needs an admin key: send 'authorization: Bearer <admin key>' "
                f"(the CLI reads {ADMIN_KEY_ENV} or the local stack's stack file)"
            )
        if not self._keys:
            raise PermissionDenied(
                f"{action} is refused: no admin key is configured (set controller.admin_keys, "
                "e.g. FLOTILLA_CONTROLLER__ADMIN_KEYS='[\"...\"]')"
            )
        presented = authorization[len(BEARER):].strip().encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise PermissionDenied(f"{action} needs an admin key; the key sent is not one")


def admin_gate(settings: FlotillaSettings) -> AdminGate:
    """The gate of ``controller.admin_keys`` (and, with TLS on, ``controller.admin_identities``)."""
    identities = settings.controller.admin_identities if settings.tls.enabled else ()
    return AdminGate((k.get_secret_value() for k in settings.controller.admin_keys), identities)


def admin_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``key`` (none without one)."""
    return ((AUTH_HEADER, f"Bearer {key}"),) if key else ()


def admin_key_from_env() -> str | None:
    return os.environ.get(ADMIN_KEY_ENV) or None
