"""The router's core: who may call, and which model's batchers get the call.

Decisions use request headers only; the body is never looked at.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Generic, TypeVar

from flotilla.common import metrics
from flotilla.common.ids import shorten
from flotilla.errors import InvalidArgument, ModelNotFound, Unauthenticated
from flotilla.pool.pool import EndpointPool

C = TypeVar("C")

BEARER = "bearer "
_SHOWN_CHARS = 40  # how much of an unknown model name an error message repeats


class ApiKeys:
    """Accepts ``authorization: Bearer <key>`` for any configured key."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    def check(self, authorization: str | None) -> None:
        if not authorization:
            raise Unauthenticated("missing authorization header; send 'authorization: Bearer <api key>'")
        if not authorization.lower().startswith(BEARER):
            raise Unauthenticated("authorization header must be 'Bearer <api key>'")
        presented = authorization[len(BEARER):].strip().encode()
        # Compare against every key so timing does not reveal which matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise Unauthenticated("API key is not valid")


class RouteTable(Generic[C]):
    """Model name → the pool of that model's batcher replicas; changes at run time."""

    def __init__(self, pools: dict[str, EndpointPool[C]] | None = None) -> None:
        self._pools: dict[str, EndpointPool[C]] = dict(pools or {})

    @property
    def models(self) -> list[str]:
        return sorted(self._pools)

    def get(self, model: str) -> EndpointPool[C] | None:
        return self._pools.get(model)

    def put(self, model: str, pool: EndpointPool[C]) -> None:
        self._pools[model] = pool
        metrics.models_served("router", self._pools)

    def remove(self, model: str) -> EndpointPool[C] | None:
        pool = self._pools.pop(model, None)
        metrics.models_served("router", self._pools)
        return pool

    def pool_for(self, model: str | None) -> EndpointPool[C]:
        if not model:
            raise InvalidArgument("missing x-model-name header; set it to the model to run")
        try:
            return self._pools[model]
        except KeyError:
            shown = shorten(model, _SHOWN_CHARS)
            raise ModelNotFound(
                f"model {shown!r} is not served; served models: {', '.join(self.models) or 'none'}"
            ) from None
