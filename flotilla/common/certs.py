"""A throwaway certificate authority for the local stack and tests (``flotilla up --tls``); no grpc.

Each certificate is written in cert-manager's Secret layout, one directory per identity holding
``ca.crt``, ``tls.crt`` and ``tls.key`` (the key mode 0600), so a process reads the same three
files (``tls.ca_file``, ``cert_file``, ``key_file``) in a local stack as in a pod. Keys are ECDSA
P-256; every certificate is good for both ends of mutual TLS (server and client auth). Files are
replaced by rename, so a process that re-reads them never sees half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flotilla.common.files import replace_file
from flotilla.config import TlsSettings

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


@dataclass(frozen=True)
class IssuedFiles:
    """Where one identity's files are."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def tls_settings(self, **update: Any) -> TlsSettings:
        """TLS on, with these files (and ``update``'s other fields)."""
        return TlsSettings(enabled=True, ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                           **update)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Flotilla"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A CA key and self-signed certificate that issue the mesh's certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate = certificate

    @classmethod
    def create(cls, common_name: str = "Flotilla local CA", *, valid_days: int = 30) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        directory: Path,
        common_name: str,
        *,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        valid_days: int = 30,
    ) -> IssuedFiles:
        """A new key and certificate for ``common_name`` in ``directory`` (created; files replaced)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        files = IssuedFiles(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
        replace_file(files.ca_file, self.pem, mode=0o644)
        replace_file(files.key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ), mode=0o600)
        replace_file(files.cert_file, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return files


def local_mesh_certificates(
    directory: Path, identities: Sequence[str]
) -> tuple[CertificateAuthority, dict[str, IssuedFiles]]:
    """A fresh CA (its certificate also at ``directory/ca.crt``) and one certificate per identity
    (its common name; for 127.0.0.1 and localhost), each in ``directory/<identity>/``."""
    authority = CertificateAuthority.create()
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(directory / CA_FILE, authority.pem, mode=0o644)
    return authority, {name: authority.issue(directory / name, name) for name in identities}
