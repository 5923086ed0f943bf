"""The router's core: who may call, and which model's batchers get the call.

Decisions use request headers only; the body is never looked at.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from flotilla.common import metrics
from flotilla.common.ids import shorten
from flotilla.errors import InvalidArgument, ModelNotFound, Unauthenticated
from flotilla.pool.pool import EndpointPool

C = TypeVar("C")

BEARER = "bearer "
_SHOWN_CHARS = 40  # how much of an unknown model name an error message repeats
_SHOWN_MODELS = 20  # how many served models it lists


def bearer_token(authorization: str | None) -> str:
    """The key of ``authorization: Bearer <key>``; ``Unauthenticated`` when there is none."""
    if not authorization:
        raise Unauthenticated("missing authorization header; send 'authorization: Bearer <api key>'")
    if not authorization.lower().startswith(BEARER):
        raise Unauthenticated("authorization header must be 'Bearer <api key>'")
    return authorization[len(BEARER):].strip()


class ApiKeys:
    """Accepts ``authorization: Bearer <key>`` for any configured key (``router.api_keys``)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    def matches(self, token: str) -> bool:
        """Whether ``token`` is one of the keys; compared with every key, so timing does not reveal which."""
        presented = token.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched

    def check(self, authorization: str | None) -> None:
        if not self.matches(bearer_token(authorization)):
            raise Unauthenticated("API key is not valid")


class RouteTable(Generic[C]):
    """Model name → the pool of that model's batching shards; changes at run time.

    Several models may share one pool (those on the same shards). ``update``
    applies a batch of changes at the batch's cost, the per-model metric
    series included (``metrics.models_changed``).
    """

    def __init__(self, pools: Mapping[str, EndpointPool[C]] | None = None) -> None:
        self._pools: dict[str, EndpointPool[C]] = dict(pools or {})
        self._changed: asyncio.Event | None = None
        """Set by the next ``update``; made only while a call waits in ``moved_from``."""
        if self._pools:
            metrics.models_served("router", self._pools)

    @property
    def models(self) -> list[str]:
        return sorted(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def __contains__(self, model: object) -> bool:
        return model in self._pools

    def get(self, model: str) -> EndpointPool[C] | None:
        return self._pools.get(model)

    def update(self, routes: Mapping[str, EndpointPool[C]], removed: Iterable[str] = ()) -> None:
        """Route each model of ``routes`` to its pool and drop the routes of ``removed``."""
        added = [model for model in routes if model not in self._pools]
        self._pools.update(routes)
        gone = [model for model in removed if self._pools.pop(model, None) is not None]
        if added or gone:
            metrics.models_changed("router", added=added, removed=gone)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def moved_from(self, model: str, pool: EndpointPool[C], within_s: float) -> EndpointPool[C] | None:
        """``model``'s pool once it is another than ``pool`` (the controller moved the model to other
        shards), waiting up to ``within_s`` for that; None if it did not move in time. A model with
        no route meanwhile is waited for too: a move may pass through none."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + within_s
        while (now := self._pools.get(model)) is None or now is pool:
            left_s = deadline_s - loop.time()
            if left_s <= 0:
                return None
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), left_s)
            except TimeoutError:
                return None
        return now

    def put(self, model: str, pool: EndpointPool[C]) -> None:
        self.update({model: pool})

    def remove(self, model: str) -> EndpointPool[C] | None:
        pool = self._pools.get(model)
        self.update({}, [model])
        return pool

    def pool_for(self, model: str | None) -> EndpointPool[C]:
        if not model:
            raise InvalidArgument("missing x-model-name header; set it to the model to run")
        try:
            return self._pools[model]
        except KeyError:
            shown = shorten(model, _SHOWN_CHARS)
            raise ModelNotFound(f"model {shown!r} is not served; served models: {self._served_names()}") from None

    def _served_names(self) -> str:
        """The first served names in order, and how many in all when that is more (fleets run thousands)."""
        first = heapq.nsmallest(_SHOWN_MODELS, self._pools)
        more = len(self._pools) - len(first)
        return ", ".join(first) + (f", ... ({len(self._pools)} in all)" if more else "") if first else "none"
