"""TLS for the gRPC server: certificate and key from files, re-read when they change (checked
at each new handshake) or on SIGHUP; optional mTLS against a client CA.

grpc's dynamic credentials ask `fetch()` for a new configuration before each handshake; it
answers None (keep the current one) unless a file changed or a reload was requested, so a
renewed certificate (cert-manager, certbot) takes effect for new connections without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import grpc

from job_service.config import Settings

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS settings cannot work; the message names the variable to fix."""


class ReloadingCertificates:
    def __init__(self, settings: Settings) -> None:
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise TlsConfigError(
                "TLS needs JOB_SERVICE_TLS_CERT_FILE and JOB_SERVICE_TLS_KEY_FILE (PEM); or set "
                "JOB_SERVICE_GRPC_PLAINTEXT=true to serve plaintext on purpose"
            )
        self._files = [Path(settings.tls_cert_file), Path(settings.tls_key_file)]
        self._ca = Path(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
        if self._ca is not None:
            self._files.append(self._ca)
        # grpc requests a client certificate only when it requires one: a client CA means mTLS.
        self.require_client_auth = self._ca is not None
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._reload_requested = False
        self.reloads = 0
        self.initial = self._config()

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in self._files:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise TlsConfigError(f"TLS file {path} does not exist") from None
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _config(self) -> object:
        cert, key = (p.read_bytes() for p in self._files[:2])
        ca = self._ca.read_bytes() if self._ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def request_reload(self) -> None:
        """SIGHUP: read the files again at the next handshake even if they look unchanged."""
        with self._lock:
            self._reload_requested = True

    def fetch(self) -> object | None:
        # Called by grpc before each handshake, from its own thread.
        with self._lock:
            try:
                stamp = self._stamps()
            except TlsConfigError as exc:
                log.warning("TLS files unreadable, keeping the current ones: %s", exc)
                return None
            if stamp == self._stamp and not self._reload_requested:
                return None
            try:
                config = self._config()
            except Exception:  # a half-written file: keep serving the old certificate
                log.warning("could not load the new TLS files; keeping the old", exc_info=True)
                return None
            self._stamp, self._reload_requested = stamp, False
            self.reloads += 1
            log.info("TLS certificate re-read", extra={"tls_reloads": self.reloads})
            return config

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,  # type: ignore[arg-type]
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.require_client_auth,
        )
