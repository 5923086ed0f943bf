"""TLS on the mesh's hops: server credentials and channels that follow certificate files as they change.

``tls.enabled`` off, everything here is plaintext and costs nothing. On:

* a server (``server_credentials``) presents ``cert_file`` and, on the internal tiers, requires a
  client certificate signed by ``ca_file`` (mutual TLS). gRPC asks for the configuration at every
  new connection's handshake; the files are looked at then (at most once a second) and a change is
  served from the next handshake on. A pair that does not match (a key written before its
  certificate) is skipped until it does: connections keep the last good pair.
* a ``Dialer`` opens the channels a process makes to other tiers, checking the peer against
  ``ca_file`` and presenting ``cert_file``. gRPC's channel credentials are fixed when a channel
  opens, so holders of long-lived channels (``peer.GrpcPeer``, the fleet watch) ask
  ``Dialer.generation`` and reopen theirs when the files changed.
* ``http_ssl_context`` is the HTTP front door's context; ``reload_ssl_context`` loads a changed pair
  into it (new connections get it).

``peer_common_names`` reads who called (the client certificate's common name): the controller's
admin check accepts ``controller.admin_identities``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from flotilla.config import TlsSettings

log = logging.getLogger(__name__)

SERVER_CHECK_INTERVAL_S = 1.0
"""A server looks at its files at most this often (its fetcher runs at every handshake)."""


@dataclass(frozen=True)
class Pems:
    ca: bytes
    cert: bytes
    key: bytes


class CertFiles:
    """One process's three PEM files, and whether they changed since they were last read."""

    def __init__(self, settings: TlsSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ca_file = Path(settings.ca_file)
        self.cert_file = Path(settings.cert_file)
        self.key_file = Path(settings.key_file)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[tuple[int, int, int], ...] | None = None
        self._checked_at = float("-inf")

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        signature = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            stat = os.stat(path)  # follows links: a Secret volume swaps the directory they point to
            signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def read(self) -> Pems:
        """The files' bytes, checked as a pair (the key is the certificate's); raises ``TlsFilesError``."""
        with self._lock:
            signature = self._signature_or_raise()
            pems = _read_pair(self.ca_file, self.cert_file, self.key_file)
            self._seen = signature
            return pems

    def _signature_or_raise(self) -> tuple[tuple[int, int, int], ...]:
        try:
            return self._signature()
        except OSError as exc:
            raise TlsFilesError(f"TLS files cannot be read: {exc}") from exc

    def changed(self, min_interval_s: float = 0.0) -> bool:
        """The files differ from those last read (looked at no more often than ``min_interval_s``)."""
        now = self._clock()
        with self._lock:
            if now - self._checked_at < min_interval_s:
                return False
            self._checked_at = now
            try:
                return self._signature() != self._seen
            except OSError:
                return False  # mid-replacement or gone: keep what was read


class TlsFilesError(Exception):
    """The TLS files are missing, unreadable, or the key is not the certificate's."""


def _read_pair(ca_file: Path, cert_file: Path, key_file: Path) -> Pems:
    try:
        pems = Pems(ca_file.read_bytes(), cert_file.read_bytes(), key_file.read_bytes())
        # The pair must match before it is served or presented (the ssl module checks it).
        ssl.create_default_context().load_cert_chain(cert_file, key_file)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise TlsFilesError(
            f"TLS files {cert_file} and {key_file} (CA {ca_file}) cannot be used: {exc}"
        ) from exc
    return pems


def server_credentials(settings: TlsSettings, *, client_auth: bool) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port`` that reload the files when they change.

    ``client_auth``: require a client certificate signed by ``ca_file`` (mutual TLS)."""
    files = CertFiles(settings)
    first = files.read()

    def configuration(pems: Pems) -> Any:
        return grpc.ssl_server_certificate_configuration([(pems.key, pems.cert)], root_certificates=pems.ca)

    def fetch() -> Any:
        if not files.changed(SERVER_CHECK_INTERVAL_S):
            return None
        try:
            pems = files.read()
        except TlsFilesError as exc:
            log.warning("keeping the current certificate: %s", exc)
            return None
        log.info("serving the renewed certificate %s", files.cert_file)
        return configuration(pems)

    return grpc.dynamic_ssl_server_credentials(
        configuration(first), fetch, require_client_authentication=client_auth
    )


class Dialer:
    """Opens this process's channels to the mesh's servers: plaintext, or TLS with its certificate."""

    def __init__(self, settings: TlsSettings | None = None) -> None:
        self.settings = settings if settings is not None and settings.enabled else None
        self._files = CertFiles(self.settings) if self.settings is not None else None
        self._credentials: grpc.ChannelCredentials | None = None
        self._generation = 0

    @property
    def secure(self) -> bool:
        return self.settings is not None

    @property
    def generation(self) -> int:
        """Goes up when the files changed (looked at no more often than ``reload_interval_s``);
        channels opened at an older generation present an older certificate."""
        if self._files is not None and self.settings is not None and self._credentials is not None:
            if self._files.changed(self.settings.reload_interval_s):
                self._credentials = None
                self._generation += 1
        return self._generation

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials of the current files (TLS only)."""
        if self._files is None:
            raise RuntimeError("TLS is off: channels are plaintext")
        if self._credentials is None:
            pems = self._files.read()
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=pems.ca, private_key=pems.key, certificate_chain=pems.cert
            )
        return self._credentials

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        if self.settings is not None and self.settings.server_name:  # checked instead of the host dialled
            return [*options, ("grpc.ssl_target_name_override", self.settings.server_name)]
        return list(options)

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        if not self.secure:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, self.credentials(), options=self._options(options))

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel (the CLI, the local stack's probes)."""
        if not self.secure:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self.credentials(), options=self._options(options))


PLAINTEXT = Dialer()
"""Channels without TLS (``tls.enabled`` off)."""


class RenewingChannel:
    """A channel that ``renew`` reopens when the certificate files changed; calls in flight finish on
    the old one (closed with ``retire_grace_s`` of grace). Callers renew before a call and make
    their stubs again when it did (the fleet watch, heartbeats, a worker's cold-start calls and its
    batches to Triton). Renewed files that cannot be used yet (a key written before its certificate)
    leave the current channel in use until they can."""

    def __init__(
        self, dialer: Dialer, address: str, options: Sequence[tuple[str, Any]] = (), *, retire_grace_s: float = 60.0
    ) -> None:
        """``retire_grace_s``: how long calls in flight on a renewed-away channel may take to finish."""
        self.dialer = dialer
        self.address = address
        self.options = list(options)
        self.retire_grace_s = retire_grace_s
        self._generation = dialer.generation
        self.channel = dialer.aio_channel(address, self.options)
        self._retiring: set[asyncio.Task[None]] = set()

    def renew(self) -> bool:
        """Reopen with the current files if they changed: True when it did (stubs on the old channel
        must be made again)."""
        generation = self.dialer.generation
        if generation == self._generation:
            return False
        old = self.channel
        try:
            self.channel = self.dialer.aio_channel(self.address, self.options)
        except TlsFilesError as exc:  # a key written before its certificate: the old channel until they match
            log.warning("%s: keeping the current certificate: %s", self.address, exc)
            return False
        self._generation = generation
        task = asyncio.create_task(old.close(grace=self.retire_grace_s), name=f"retire channel {self.address}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.channel.close()


def peer_common_names(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The common names of the caller's verified client certificate (none over plaintext)."""
    auth = context.auth_context() or {}
    return [name.decode("utf-8", "replace") for name in auth.get("x509_common_name", [])]


def http_ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """The HTTP front door's server context (no client certificate asked: clients send keys)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def reload_ssl_context(context: ssl.SSLContext, files: CertFiles) -> bool:
    """Load the files into ``context`` when they changed (connections from now on get them)."""
    if not files.changed():
        return False
    try:
        files.read()
        context.load_cert_chain(files.cert_file, files.key_file)
    except (TlsFilesError, OSError) as exc:
        log.warning("HTTP front door keeps its certificate: %s", exc)
        return False
    log.info("HTTP front door serves the renewed certificate %s", files.cert_file)
    return True
