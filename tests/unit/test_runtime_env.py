"""The environment Flotilla's service processes are started with (``flotilla.common.runtime_env``)."""

from __future__ import annotations

import pytest

from flotilla.common.runtime_env import (
    EXPERIMENTS_VARIABLE,
    SERVICE_ENV,
    SERVICE_GRPC_EXPERIMENTS,
    SERVICE_MALLOC_TUNABLES,
    TUNABLES_VARIABLE,
    service_env,
)


def test_a_service_starts_without_eventengine_endpoints_keeping_its_heap_and_with_the_rest_of_the_environment() -> None:
    env = service_env({"PATH": "/bin", "FLOTILLA_TLS__CERT_FILE": "/certs/router.pem"})
    assert env == {"PATH": "/bin", "FLOTILLA_TLS__CERT_FILE": "/certs/router.pem",
                   EXPERIMENTS_VARIABLE: SERVICE_GRPC_EXPERIMENTS, TUNABLES_VARIABLE: SERVICE_MALLOC_TUNABLES}
    assert SERVICE_GRPC_EXPERIMENTS.split(",") == [
        "-event_engine_client", "-event_engine_listener", "-event_engine_for_all_other_endpoints"]
    assert SERVICE_MALLOC_TUNABLES == "glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=33554432"


@pytest.mark.parametrize("name", sorted(SERVICE_ENV))
def test_an_operators_own_value_is_kept_even_empty(name: str) -> None:
    assert service_env({name: "theirs"})[name] == "theirs"
    assert service_env({name: ""})[name] == "", "empty: the library's own defaults"


def test_without_a_base_it_starts_from_this_processs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_PROBE", "1")
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    env = service_env()
    assert env["FLOTILLA_PROBE"] == "1" and all(env[name] == value for name, value in SERVICE_ENV.items())
