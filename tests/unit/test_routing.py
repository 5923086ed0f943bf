"""Router core: API key checks and model routing."""

from __future__ import annotations

import pytest

from flotilla.errors import Code, InvalidArgument, ModelNotFound, Unauthenticated
from flotilla.pool.pool import EndpointPool
from flotilla.services.router.routing import ApiKeys, RouteTable

KEYS = ApiKeys(["key-one", "key-two"])


@pytest.mark.parametrize("header", [None, ""])
def test_missing_authorization_is_unauthenticated(header) -> None:
    with pytest.raises(Unauthenticated, match="missing authorization header") as info:
        KEYS.check(header)
    assert info.value.code == Code.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["key-one", "Basic key-one", "Bearerkey-one", "Token key-one"])
def test_authorization_without_bearer_prefix_is_unauthenticated(header: str) -> None:
    with pytest.raises(Unauthenticated, match="must be 'Bearer <api key>'"):
        KEYS.check(header)


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer key-on", "Bearer key-one-extra", "Bearer ", "Bearer KEY-ONE"])
def test_wrong_key_is_unauthenticated(header: str) -> None:
    with pytest.raises(Unauthenticated, match="not valid"):
        KEYS.check(header)


@pytest.mark.parametrize("header", ["Bearer key-one", "Bearer key-two", "bearer key-one", "BEARER key-two", "Bearer  key-one "])
def test_configured_key_is_accepted(header: str) -> None:
    assert KEYS.check(header) is None


@pytest.mark.parametrize("header", ["Bearer ", "Bearer anything", "Bearer  "])
def test_empty_key_list_rejects_everything(header: str) -> None:
    with pytest.raises(Unauthenticated):
        ApiKeys([]).check(header)


def test_empty_configured_keys_do_not_accept_an_empty_bearer() -> None:
    with pytest.raises(Unauthenticated):
        ApiKeys(["", "real"]).check("Bearer ")


def make_routes() -> RouteTable[str]:
    return RouteTable(
        {
            "resnet50": EndpointPool("resnet50 batcher", {"r:1": "r1"}),
            "efficientnet-lite0": EndpointPool("efficientnet batcher", {"e:1": "e1"}),
        }
    )


def test_known_model_gets_its_own_pool() -> None:
    routes = make_routes()
    assert routes.pool_for("resnet50").name == "resnet50 batcher"
    assert routes.pool_for("efficientnet-lite0").name == "efficientnet batcher"
    assert routes.models == ["efficientnet-lite0", "resnet50"]


@pytest.mark.parametrize("model", [None, ""])
def test_missing_model_is_invalid_argument(model) -> None:
    with pytest.raises(InvalidArgument, match="x-model-name") as info:
        make_routes().pool_for(model)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_unknown_model_is_not_found_and_lists_served_models() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_routes().pool_for("vgg16")
    assert info.value.code == Code.NOT_FOUND
    assert "'vgg16'" in info.value.message
    assert "efficientnet-lite0, resnet50" in info.value.message


def test_unknown_model_with_no_routes_says_none() -> None:
    with pytest.raises(ModelNotFound, match="served models: none"):
        RouteTable({}).pool_for("vgg16")


def test_a_not_found_lists_a_bounded_number_of_served_models() -> None:
    pool: EndpointPool[str] = EndpointPool("shared", {"s:1": "s1"})
    routes = RouteTable({f"model-{i:05d}": pool for i in range(5000)})
    with pytest.raises(ModelNotFound) as info:
        routes.pool_for("vgg16")
    assert "model-00000, model-00001" in info.value.message
    assert "model-00020" not in info.value.message
    assert "(5000 in all)" in info.value.message


def test_update_routes_and_removes_in_one_step() -> None:
    routes = make_routes()
    shared: EndpointPool[str] = EndpointPool("shared", {"s:1": "s1"})
    routes.update({"vgg16": shared, "resnet50": shared}, ["efficientnet-lite0", "never-routed"])
    assert routes.models == ["resnet50", "vgg16"]
    assert routes.pool_for("resnet50") is routes.pool_for("vgg16") is shared
    assert "efficientnet-lite0" not in routes and len(routes) == 2
