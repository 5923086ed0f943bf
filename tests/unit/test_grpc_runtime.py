"""The gRPC runtime Flotilla's service processes are started with (``flotilla.common.grpc_runtime``)."""

from __future__ import annotations

import pytest

from flotilla.common.grpc_runtime import EXPERIMENTS_VARIABLE, SERVICE_GRPC_EXPERIMENTS, service_env


def test_a_service_is_started_without_eventengine_endpoints_and_with_the_rest_of_the_environment() -> None:
    env = service_env({"PATH": "/bin", "FLOTILLA_TLS__CERT_FILE": "/certs/router.pem"})
    assert env == {"PATH": "/bin", "FLOTILLA_TLS__CERT_FILE": "/certs/router.pem",
                   EXPERIMENTS_VARIABLE: SERVICE_GRPC_EXPERIMENTS}
    assert SERVICE_GRPC_EXPERIMENTS.split(",") == [
        "-event_engine_client", "-event_engine_listener", "-event_engine_for_all_other_endpoints"]


def test_an_operators_own_grpc_experiments_are_kept_even_empty() -> None:
    assert service_env({EXPERIMENTS_VARIABLE: "tcp_rcv_lowat"})[EXPERIMENTS_VARIABLE] == "tcp_rcv_lowat"
    assert service_env({EXPERIMENTS_VARIABLE: ""})[EXPERIMENTS_VARIABLE] == "", "empty: gRPC's own defaults"


def test_without_a_base_it_starts_from_this_processs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_PROBE", "1")
    monkeypatch.delenv(EXPERIMENTS_VARIABLE, raising=False)
    env = service_env()
    assert env["FLOTILLA_PROBE"] == "1" and env[EXPERIMENTS_VARIABLE] == SERVICE_GRPC_EXPERIMENTS
