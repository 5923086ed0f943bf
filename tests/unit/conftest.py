"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from flotilla.common.certs import CertificateAuthority


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    """A throwaway CA (ECDSA P-256) for a module's TLS tests: they issue what they need from it."""
    return CertificateAuthority.create()
