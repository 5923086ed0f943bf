"""``host:port`` strings: gRPC targets (strict) and S3/HTTP endpoints (the scheme's port by default)."""

from __future__ import annotations

import pytest

from flotilla.common.addresses import join_address, split_endpoint, split_target


def test_targets_split_and_join() -> None:
    assert split_target("preprocess.flotilla.svc:50053") == ("preprocess.flotilla.svc", 50053)
    assert split_target("[fd00::1]:80") == ("fd00::1", 80)
    assert join_address("10.0.0.1", 80) == "10.0.0.1:80"
    assert join_address("fd00::1", 80) == "[fd00::1]:80"
    for bad in ("preprocess", "host:", ":80", "host:http"):
        with pytest.raises(ValueError, match="host:port"):
            split_target(bad)


def test_an_endpoint_splits_into_host_and_port() -> None:
    assert split_endpoint("127.0.0.1:8333") == ("127.0.0.1", 8333)
    assert split_endpoint("seaweedfs") == ("seaweedfs", 80)
    assert split_endpoint("s3.example.com", secure=True) == ("s3.example.com", 443)
    assert split_endpoint("[::1]:9000") == ("::1", 9000)
    assert split_endpoint("[::1]") == ("::1", 80)
