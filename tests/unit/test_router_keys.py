"""API keys: the format and hash (flotilla.common.apikeys), the router's KeyBook (scope, quota, expiry,
revocation) on a fake clock, the per-process quota share's error, and keys in the fleet's deltas."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from flotilla.common import apikeys
from flotilla.common.admin import AdminGate
from flotilla.common.apikeys import KeyRecord, key_hash, new_key, split_key
from flotilla.common.fleet import FleetState
from flotilla.errors import AlreadyExists, InvalidArgument, PermissionDenied, QuotaExceeded, Unauthenticated
from flotilla.services.controller.keys import KeyRegistry
from flotilla.services.controller.registry import MemoryRecords
from flotilla.services.controller.server import FleetFeed
from flotilla.services.router.keys import KeyBook, TokenBucket, admitted_share
from flotilla.services.router.routing import ApiKeys
from tests.unit.test_fleet_delta import controller

NOW_UNIX_S = 1_800_000_000.0


class Clocks:
    def __init__(self) -> None:
        self.now_s = 100.0

    def monotonic(self) -> float:
        return self.now_s

    def unix(self) -> float:
        return NOW_UNIX_S + self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def book(*records: KeyRecord, processes: int = 1, static: tuple[str, ...] = ("dev-key",)) -> tuple[KeyBook, Clocks]:
    clocks = Clocks()
    keys = KeyBook(ApiKeys(static), processes=processes, clock=clocks.monotonic, unix_clock=clocks.unix)
    keys.apply(records)
    return keys, clocks


def bearer(token: str) -> str:
    return f"Bearer {token}"


# -- format and hash ---------------------------------------------------------------------------

def test_a_new_key_is_random_and_only_its_salted_hash_is_kept() -> None:
    record, token = new_key("ci", ("efficientnet-*",))
    other, other_token = new_key("ci", ("efficientnet-*",))
    assert token.startswith(f"flt_{record.id}_") and token != other_token and record.id != other.id
    key_id, secret = split_key(token) or ("", "")
    assert key_id == record.id and len(secret) == 43  # 32 random bytes, URL-safe base64
    assert record.hash == key_hash(record.salt, secret) and record.salt != other.salt
    assert record.verify(secret) and not record.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    kept = str(record.to_json())
    assert secret not in kept and token not in kept
    assert KeyRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize("garbled", ["", "flt", "flt__x", "flt_XYZ_secret", "flt_0123456789abcdef_", "abc_0123456789abcdef_s"])
def test_anything_not_in_the_format_is_no_registered_key(garbled: str) -> None:
    assert split_key(garbled) is None


# -- authorize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer garbage", "Bearer flt_0123456789abcdef_x"])
def test_no_or_a_garbled_key_is_unauthenticated(header: str | None) -> None:
    keys, _ = book(new_key("ci", ("*",))[0])
    with pytest.raises(Unauthenticated):
        keys.authorize(header, "m")


def test_an_unknown_id_and_a_wrong_secret_get_the_same_answer_after_the_same_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record, token = new_key("ci", ("*",))
    keys, _ = book(record, static=())  # no static key to compare with
    compared: list[int] = []
    real = apikeys.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(a))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", counting)
    messages = []
    for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), f"flt_{'f' * 16}_{token.split('_', 2)[2]}"):
        with pytest.raises(Unauthenticated) as refused:
            keys.authorize(bearer(wrong), "m")
        messages.append(refused.value.message)
    assert compared == [32, 32], "each checked once against a record's digest (a stand-in for the unknown id)"
    assert messages[0] == messages[1]


def test_scope_allows_matching_models_and_denies_others_by_key_name_and_model() -> None:
    record, token = new_key("ci-runner", ("efficientnet-*", "open-nsfw"))
    keys, _ = book(record)
    assert keys.authorize(bearer(token), "efficientnet-lite0").name == "ci-runner"
    assert keys.authorize(bearer(token), "open-nsfw").name == "ci-runner"
    assert keys.authorize(bearer(token), None).name == "ci-runner"  # server metadata names no model
    with pytest.raises(PermissionDenied) as denied:
        keys.authorize(bearer(token), "rapid-orientation")
    assert "ci-runner" in denied.value.message and "rapid-orientation" in denied.value.message
    assert token not in denied.value.message and token.split("_", 2)[2] not in denied.value.message


def test_a_keys_scope_says_which_models_it_may_call_and_takes_no_quota() -> None:
    record, token = new_key("ci-runner", ("efficientnet-*",), rate_per_s=1.0, burst=1)
    keys, _ = book(record)
    for _ in range(5):  # past the burst: a scope is no request
        may_call = keys.scope(bearer(token))
    assert may_call("efficientnet-lite0") and not may_call("open-nsfw")
    assert keys.authorize(bearer(token), "efficientnet-lite0").name == "ci-runner"  # the one token is still there
    assert keys.scope(bearer("dev-key"))("anything")
    with pytest.raises(Unauthenticated):
        keys.scope(bearer("not-a-key"))


def test_static_keys_stay_unscoped_and_unlimited() -> None:
    keys, _ = book(new_key("ci", ("x",), rate_per_s=1.0)[0])
    for _ in range(100):
        assert keys.authorize(bearer("dev-key"), "any-model").name == "static"
    assert keys.take_used() == {}


def test_the_token_bucket_allows_the_burst_then_the_rate_and_says_when_to_retry() -> None:
    record, token = new_key("ci", ("*",), rate_per_s=10.0, burst=5)
    keys, clocks = book(record)
    for _ in range(5):
        keys.authorize(bearer(token), "m")
    with pytest.raises(QuotaExceeded) as over:
        keys.authorize(bearer(token), "m")
    assert over.value.retry_after_s == pytest.approx(0.1)
    assert "ci" in over.value.message and token not in over.value.message
    clocks.advance(0.1)
    keys.authorize(bearer(token), "m")
    with pytest.raises(QuotaExceeded):
        keys.authorize(bearer(token), "m")
    clocks.advance(10.0)  # refills to the burst, no further
    for _ in range(5):
        keys.authorize(bearer(token), "m")
    with pytest.raises(QuotaExceeded):
        keys.authorize(bearer(token), "m")


def test_a_bucket_without_a_burst_holds_one_second_of_the_rate() -> None:
    bucket = TokenBucket(3.0, replace(new_key("k", ("*",), rate_per_s=3.0)[0]).effective_burst, 0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(1 / 3)


def test_an_expired_key_is_unauthenticated() -> None:
    clocks_now = NOW_UNIX_S + 100.0
    record, token = new_key("temp", ("*",), expires_unix_s=clocks_now + 60.0)
    keys, clocks = book(record)
    keys.authorize(bearer(token), "m")
    clocks.advance(60.0)
    with pytest.raises(Unauthenticated):
        keys.authorize(bearer(token), "m")


def test_revoked_keys_stop_by_delta_and_by_a_whole_fleet() -> None:
    first, first_token = new_key("a", ("*",))
    second, second_token = new_key("b", ("*",))
    keys, _ = book(first, second)
    keys.apply([], ["a"])
    with pytest.raises(Unauthenticated):
        keys.authorize(bearer(first_token), "m")
    keys.authorize(bearer(second_token), "m")
    keys.apply([], full=True)
    with pytest.raises(Unauthenticated):
        keys.authorize(bearer(second_token), "m")


def test_last_use_is_taken_once_per_report() -> None:
    record, token = new_key("ci", ("*",))
    keys, clocks = book(record)
    keys.authorize(bearer(token), "m")
    assert keys.take_used() == {"ci": clocks.unix()}
    assert keys.take_used() == {}


# -- quota across processes ----------------------------------------------------------------------

def admitted_fraction(processes: int, connections: int, *, seed: int, rate_per_s: float = 100.0) -> float:
    """Requests admitted / the quota, over 10 s after 2 s that spend the starting bursts, when
    ``connections`` (each offered 4x the quota / k) land at random on ``processes`` processes, each
    with its share of the quota (KeyBook's buckets, as each router process holds them)."""
    rng = random.Random(seed)
    record, token = new_key("k", ("*",), rate_per_s=rate_per_s, burst=int(rate_per_s))
    books = [book(record, processes=processes) for _ in range(processes)]
    placed = [rng.randrange(processes) for _ in range(connections)]
    step_s, warmup_s, duration_s, admitted = 0.01, 2.0, 10.0, 0
    per_connection = 4 * rate_per_s * step_s / connections
    owed = [0.0] * connections
    for step in range(int((warmup_s + duration_s) / step_s)):
        for _, clocks in books:
            clocks.advance(step_s)
        for c, p in enumerate(placed):
            owed[c] += per_connection
            while owed[c] >= 1.0:
                owed[c] -= 1.0
                try:
                    books[p][0].authorize(bearer(token), "m")
                    admitted += step * step_s >= warmup_s
                except QuotaExceeded:
                    pass
    return admitted / (rate_per_s * duration_s)


@pytest.mark.parametrize(("processes", "connections"), [(1, 1), (2, 1), (2, 4), (4, 1), (4, 4), (4, 16)])
def test_quota_share_error(processes: int, connections: int) -> None:
    """Measured: the share of the quota a caller can use is the share of processes its connections
    reach, as ``admitted_share`` says (averaged over random placements); never more than the quota."""
    runs = [admitted_fraction(processes, connections, seed=seed) for seed in range(12)]
    assert max(runs) <= 1.01
    assert sum(runs) / len(runs) == pytest.approx(admitted_share(processes, connections), abs=0.12)


def test_admitted_share_numbers_in_the_docs() -> None:
    assert admitted_share(1, 1) == 1.0
    assert admitted_share(2, 1) == 0.5
    assert round(admitted_share(2, 4), 2) == 0.94
    assert round(admitted_share(2, 8), 3) == 0.996


# -- the controller's registry and the fleet -------------------------------------------------------

def test_the_registry_validates_and_keeps_no_key() -> None:
    store = MemoryRecords()
    registry = KeyRegistry(store)
    record, token = registry.create("ci", ["efficientnet-*"], rate_per_s=100.0, burst=0, expires_unix_s=0.0,
                                    now_unix_s=NOW_UNIX_S)
    assert token not in str(store.data) and record.hash.hex() in str(store.data)
    with pytest.raises(AlreadyExists):
        registry.create("ci", ["*"], rate_per_s=0.0, burst=0, expires_unix_s=0.0, now_unix_s=NOW_UNIX_S)
    bad: list[tuple[str, list[str], float, float]] = [
        ("Bad Name", ["*"], 0.0, 0.0), ("x", [], 0.0, 0.0), ("x", ["UPPER"], 0.0, 0.0), ("x", ["*"], -1.0, 0.0),
        ("x", ["*"], 0.0, NOW_UNIX_S - 1),
    ]
    for name, models, rate_per_s, expires_unix_s in bad:
        with pytest.raises(InvalidArgument):
            registry.create(name, models, rate_per_s=rate_per_s, burst=0, expires_unix_s=expires_unix_s,
                            now_unix_s=NOW_UNIX_S)
    again = KeyRegistry(store)
    again.load()
    assert again.listed() == [record]


async def test_keys_travel_in_the_fleet_as_deltas() -> None:
    ctl = controller()
    feed = FleetFeed(ctl)
    state = FleetState()
    record, token = await ctl.create_key("ci", ["*"], rate_per_s=5.0)
    change = state.apply(feed.message(None))
    assert change.full and change.keys_changed == ["ci"] and state.keys["ci"].hash == record.hash
    await ctl.create_key("other", ["m"])
    message = feed.message(state.generation)
    assert message.delta and [k.name for k in message.keys] == ["other"] and not message.models
    change = state.apply(message)
    assert change.keys_changed == ["other"] and set(state.keys) == {"ci", "other"}
    await ctl.revoke_key("ci")
    message = feed.message(state.generation)
    assert list(message.removed_keys) == ["ci"] and not message.keys
    change = state.apply(message)
    assert change.keys_removed == ["ci"] and set(state.keys) == {"other"}
    assert token not in str(feed.message(None))


async def test_last_use_reports_reach_the_list() -> None:
    ctl = controller()
    await ctl.create_key("ci", ["*"])
    await ctl.key_used({"ci": NOW_UNIX_S, "gone": NOW_UNIX_S})
    assert ctl.keys.listed()[0].last_used_unix_s == NOW_UNIX_S


# -- the admin credential ------------------------------------------------------------------------

def test_the_admin_gate() -> None:
    gate = AdminGate(["admin-secret"])
    gate.check([("authorization", "Bearer admin-secret")], "Deploy")
    with pytest.raises(Unauthenticated):
        gate.check([], "Deploy")
    with pytest.raises(PermissionDenied) as denied:
        gate.check([("authorization", "Bearer an-api-key")], "Deploy")
    assert "an-api-key" not in denied.value.message
    with pytest.raises(PermissionDenied, match="no admin key is configured"):
        AdminGate([]).check([("authorization", "Bearer anything")], "Deploy")
