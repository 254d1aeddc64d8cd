"""Who is calling: the credentials of one call (a bearer token, else an mTLS client
certificate mapped by JOB_SERVICE_TLS_CLIENT_ROLES) -> a Caller, or Unauthenticated.

No gRPC here: rpc/interceptor.py hands in the call's metadata and auth context, and decides
with job_service.auth.policy what the caller may call.
"""

from __future__ import annotations

from typing import Any

from job_service.auth.caller import Caller
from job_service.auth.policy import Role
from job_service.auth.revocations import DenyList
from job_service.auth.tokens import Verifier
from job_service.domain.errors import Unauthenticated

_BEARER = "bearer "


def parse_identities(raw: str) -> dict[str, Role]:
    """`identity=role,identity2=role` (JOB_SERVICE_TLS_CLIENT_ROLES)."""
    out: dict[str, Role] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        identity, sep, role = part.rpartition("=")
        if not sep or not identity.strip():
            raise ValueError(f"JOB_SERVICE_TLS_CLIENT_ROLES: {part!r} must look like identity=role")
        try:
            out[identity.strip()] = Role(role.strip())
        except ValueError:
            raise ValueError(
                f"JOB_SERVICE_TLS_CLIENT_ROLES: {role.strip()!r} is not one of "
                f"{', '.join(r.value for r in Role)}"
            ) from None
    return out


class Authenticator:
    """Credentials of one call -> Caller, or Unauthenticated."""

    def __init__(
        self,
        verifier: Verifier | None,
        denylist: DenyList | None,
        identities: dict[str, Role],
    ) -> None:
        self._verifier = verifier
        self._denylist = denylist
        self._identities = identities

    def authenticate(self, metadata: Any, auth_context: dict[str, list[bytes]]) -> Caller:
        token = None
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                if not text.lower().startswith(_BEARER):
                    raise Unauthenticated(
                        "INVALID_TOKEN",
                        "the authorization metadata must be `Bearer <jwt>`",
                        problem="scheme",
                    )
                token = text[len(_BEARER) :].strip()
                break
        if token is not None and self._verifier is not None:
            claims = self._verifier.verify(token)
            if self._denylist is not None and claims.jti in self._denylist:
                raise Unauthenticated(
                    "TOKEN_REVOKED",
                    f"token {claims.jti} (subject {claims.subject}) was revoked; ask an "
                    "operator for a new one",
                    jti=claims.jti,
                )
            return Caller(claims.subject, claims.role, "token", claims.jti)
        identity = self._certificate_identity(auth_context)
        if identity is not None:
            return identity
        raise Unauthenticated(
            "MISSING_CREDENTIALS",
            "this call needs credentials: send metadata `authorization: Bearer <jwt>` with a "
            "token for your audience (uploader, worker or operator); operators mint them with "
            "`python -m job_service.auth mint` (README, Security)",
        )

    def _certificate_identity(self, auth_context: dict[str, list[bytes]]) -> Caller | None:
        if not self._identities:
            return None
        names = [
            v.decode()
            for key in ("x509_common_name", "x509_subject_alternative_name")
            for v in auth_context.get(key, [])
        ]
        for name in names:
            role = self._identities.get(name)
            if role is not None:
                return Caller(name, role, "certificate")
        if names:
            raise Unauthenticated(
                "CERTIFICATE_NOT_MAPPED",
                f"the client certificate ({names[0]}) is not mapped to a role "
                "(JOB_SERVICE_TLS_CLIENT_ROLES); send a bearer token or use a mapped "
                "certificate",
                identity=names[0],
            )
        return None
