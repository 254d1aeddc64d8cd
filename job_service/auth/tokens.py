"""Bearer tokens: signed JWTs (PyJWT), verified with a pinned algorithm and keys from settings.

A token the job-service accepts has: header `alg` = JOB_SERVICE_AUTH_ALGORITHM (and a `kid`
naming one of the configured keys when more than one is configured), claims `iss`, `aud`,
`exp` (and `nbf` when present, checked), `sub` (who: "fleet-a", "billing-backend"), `jti`
(the id revocation names) and the role claim (`role`: uploader, worker or operator).

Several keys are accepted at once, each under its `kid`: rotation is adding the new key,
minting new tokens with it, and removing the old key when the old tokens are gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWKSet
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from job_service.auth.policy import Role
from job_service.config import Settings
from job_service.domain.errors import Unauthenticated

#: How a token fails, as ErrorInfo metadata `problem`; the message says what to do.
_PROBLEMS: list[tuple[type[Exception], str, str]] = [
    (jwt.ExpiredSignatureError, "expired", "the token has expired; mint a new one"),
    (
        jwt.ImmatureSignatureError,
        "not_yet_valid",
        "the token is not valid yet (nbf/iat in the future); check the clocks",
    ),
    (jwt.InvalidAudienceError, "audience", "the token is for another audience (aud)"),
    (jwt.InvalidIssuerError, "issuer", "the token was issued by someone else (iss)"),
    (
        jwt.InvalidSignatureError,
        "signature",
        "the token's signature does not verify with any configured key",
    ),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "algorithm", "the token is signed with another algorithm"),
]


#: Verified tokens remembered per process (a few hundred bytes each).
VERIFIED_CACHE_SIZE = 4096


class ConfigError(ValueError):
    """The authentication settings cannot work; the message names the variable to fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class Claims:
    subject: str
    role: Role
    jti: str
    expires_at: float


def hs256_secrets(settings: Settings) -> str:
    """AUTH_HS256_SECRETS, or the content of AUTH_HS256_SECRETS_FILE."""
    raw = settings.auth_hs256_secrets.get_secret_value()
    if settings.auth_hs256_secrets_file:
        if raw:
            raise ConfigError(
                "set JOB_SERVICE_AUTH_HS256_SECRETS or JOB_SERVICE_AUTH_HS256_SECRETS_FILE, "
                "not both"
            )
        raw = Path(settings.auth_hs256_secrets_file).read_text().strip()
    return raw


def parse_hs256_secrets(raw: str) -> dict[str, bytes]:
    """`kid=secret,kid2=secret2` or one bare secret (kid "")."""
    out: dict[str, bytes] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        kid, sep, secret = part.partition("=")
        if not sep:
            kid, secret = "", part
        if len(secret.encode()) < 32:
            raise ConfigError(
                "JOB_SERVICE_AUTH_HS256_SECRETS: every secret must be at least 32 bytes "
                f"(key {kid or '<no kid>'} is shorter); generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
            )
        out[kid.strip()] = secret.encode()
    return out


class KeyRing:
    """The verification keys by kid, from the settings; `refresh()` re-reads the JWKS file when
    it changed (rotation without a restart)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.algorithm = settings.auth_algorithm
        self._keys: dict[str, Any] = {}
        self._jwks_stamp: tuple[int, int] | None = None
        #: Bumped whenever the keys change: what was verified with the old keys is re-verified.
        self.generation = 0
        self.refresh(force=True)

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def refresh(self, force: bool = False) -> bool:
        """Re-reads the JWKS file if it changed; True when the keys changed."""
        s = self._settings
        secrets = hs256_secrets(s)
        if s.auth_jwks_file and secrets:
            raise ConfigError(
                "set JOB_SERVICE_AUTH_JWKS_FILE or JOB_SERVICE_AUTH_HS256_SECRETS, not both"
            )
        if secrets:
            if not force:
                return False
            if self.algorithm != "HS256":
                raise ConfigError(
                    "JOB_SERVICE_AUTH_HS256_SECRETS needs JOB_SERVICE_AUTH_ALGORITHM=HS256; for "
                    f"{self.algorithm} give public keys in JOB_SERVICE_AUTH_JWKS_FILE"
                )
            self._keys = dict(parse_hs256_secrets(secrets))
            self.generation += 1
            return True
        if not s.auth_jwks_file:
            raise ConfigError(
                "authentication is on (JOB_SERVICE_AUTH_REQUIRED) but no key is configured: set "
                "JOB_SERVICE_AUTH_HS256_SECRETS or JOB_SERVICE_AUTH_JWKS_FILE (README, Security)"
            )
        path = Path(s.auth_jwks_file)
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if not force and stamp == self._jwks_stamp:
            return False
        keys = load_jwks(path.read_text(), self.algorithm)
        self._keys, self._jwks_stamp = keys, stamp
        self.generation += 1
        return True

    def candidates(self, kid: str | None) -> list[Any]:
        if kid is not None and kid in self._keys:
            return [self._keys[kid]]
        if kid is None or kid == "":
            return list(self._keys.values())
        return []


def load_jwks(text: str, algorithm: str) -> dict[str, Any]:
    """{kid: key} from a JWKS document; keys for another algorithm are refused (pinned)."""
    try:
        data = json.loads(text)
        jwks = PyJWKSet.from_dict(data)
    except (ValueError, jwt.PyJWTError) as exc:
        raise ConfigError(f"JOB_SERVICE_AUTH_JWKS_FILE is not a usable JWKS: {exc}") from None
    out: dict[str, Any] = {}
    for key in jwks.keys:
        if key.algorithm_name != algorithm and key._jwk_data.get("alg") not in (None, algorithm):
            raise ConfigError(
                f"JOB_SERVICE_AUTH_JWKS_FILE: key {key.key_id} is for {key.algorithm_name}, "
                f"but JOB_SERVICE_AUTH_ALGORITHM is {algorithm}"
            )
        out[key.key_id or ""] = key.key
    if not out:
        raise ConfigError("JOB_SERVICE_AUTH_JWKS_FILE holds no key")
    return out


class Verifier:
    """Turns a bearer token into Claims or raises Unauthenticated (never echoing the token)."""

    def __init__(self, settings: Settings, keys: KeyRing) -> None:
        self._s = settings
        self.keys = keys
        #: token -> (claims, key generation): a fleet sends the same few tokens on every call,
        #: and a signature check costs more than the lease statement it guards. An entry is
        #: used only while the token is unexpired and the keys are the ones that verified it;
        #: revocation is checked on every call, outside this cache.
        self._verified: dict[str, tuple[Claims, int]] = {}

    def verify(self, token: str) -> Claims:
        hit = self._verified.get(token)
        if hit is not None:
            claims, generation = hit
            if (
                generation == self.keys.generation
                and time.time() <= claims.expires_at + self._s.auth_leeway_seconds
            ):
                return claims
            del self._verified[token]
        claims = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = (claims, self.keys.generation)
        return claims

    def _verify(self, token: str) -> Claims:
        s = self._s
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed", "the bearer token is not a JWT") from None
        if header.get("alg") != s.auth_algorithm:
            raise _invalid("algorithm", f"the token must be signed with {s.auth_algorithm}")
        kid = header.get("kid")
        keys = self.keys.candidates(kid if isinstance(kid, str) else None)
        if not keys:
            raise _invalid(
                "unknown_key", "the token names a key id (kid) this service does not have"
            )
        last: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[s.auth_algorithm],
                    audience=s.auth_audience,
                    issuer=s.auth_issuer,
                    leeway=s.auth_leeway_seconds,
                    options={
                        "require": ["exp", "iss", "aud", "sub", "jti"],
                        "verify_nbf": True,
                        "strict_aud": True,
                    },
                )
            except jwt.InvalidSignatureError as exc:
                last = exc
                continue
            except jwt.PyJWTError as exc:
                raise _from_pyjwt(exc) from None
            return _claims(claims, s.auth_role_claim)
        assert last is not None
        raise _from_pyjwt(last) from None


def _claims(claims: Mapping[str, Any], role_claim: str) -> Claims:
    raw_role = claims.get(role_claim)
    try:
        role = Role(raw_role if isinstance(raw_role, str) else "")
    except ValueError:
        raise _invalid(
            "role",
            f"the token's {role_claim!r} claim must be one of {', '.join(r.value for r in Role)}",
        ) from None
    subject, jti = claims.get("sub"), claims.get("jti")
    if not isinstance(subject, str) or not subject or not isinstance(jti, str) or not jti:
        raise _invalid("missing_claim", "the token's sub and jti must be non-empty strings")
    return Claims(subject=subject, role=role, jti=jti, expires_at=float(claims["exp"]))


def _from_pyjwt(exc: Exception) -> Unauthenticated:
    for cls, problem, message in _PROBLEMS:
        if isinstance(exc, cls):
            return _invalid(problem, message)
    return _invalid("invalid", "the bearer token is not valid")


def _invalid(problem: str, message: str) -> Unauthenticated:
    return Unauthenticated(
        "INVALID_TOKEN",
        f"{message} (send `authorization: Bearer <jwt>`; README, Security)",
        problem=problem,
    )


# -- minting -------------------------------------------------------------------------------


def parse_ttl(text: str) -> float:
    """'30d', '12h', '15m', '90s' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"ttl {text!r}: use e.g. 30d, 12h, 15m or seconds") from None
    if value <= 0:
        raise ValueError("ttl must be positive")
    return value


def signing_key(settings: Settings) -> tuple[Any, str]:
    """(key, kid) to sign with: the first HS256 secret, or the PEM in AUTH_SIGNING_KEY_FILE."""
    if settings.auth_algorithm == "HS256":
        secrets = parse_hs256_secrets(hs256_secrets(settings))
        if not secrets:
            raise ConfigError("minting HS256 tokens needs JOB_SERVICE_AUTH_HS256_SECRETS")
        kid, secret = next(iter(secrets.items()))
        return secret, kid
    if not settings.auth_signing_key_file:
        raise ConfigError(
            f"minting {settings.auth_algorithm} tokens needs JOB_SERVICE_AUTH_SIGNING_KEY_FILE "
            "(a PEM private key) and JOB_SERVICE_AUTH_SIGNING_KID"
        )
    return Path(settings.auth_signing_key_file).read_bytes(), settings.auth_signing_kid


def mint(
    settings: Settings,
    *,
    role: Role | str,
    subject: str,
    ttl_seconds: float,
    now: float | None = None,
    key: Any = None,
    kid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A token for `subject` with `role`, valid `ttl_seconds` from now."""
    if key is None:
        key, default_kid = signing_key(settings)
        kid = default_kid if kid is None else kid
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": subject,
        settings.auth_role_claim: Role(role).value,
        "jti": uuid.uuid4().hex,
        "iat": int(issued),
        "nbf": int(issued),
        "exp": int(issued + ttl_seconds),
    }
    claims.update(extra or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=settings.auth_algorithm, headers=headers)


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token without checking it (to show what was minted)."""
    out: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return out


def jwk_of(key: Any, kid: str) -> dict[str, Any]:
    """The public JWK (with `kid` and `alg`) of an RSA or EC key (public or private)."""
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
        out: dict[str, Any] = RSAAlgorithm.to_jwk(pub, as_dict=True)
        out["alg"] = "RS256"
    elif isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        pub_ec = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
        out = ECAlgorithm.to_jwk(pub_ec, as_dict=True)
        out["alg"] = "ES256"
    else:
        raise TypeError(f"no JWK for {type(key).__name__}")
    out["kid"] = kid
    out["use"] = "sig"
    return out


def env_file_mode_ok(path: Path) -> bool:
    """Whether a secret file is readable by its owner only."""
    return (os.stat(path).st_mode & 0o077) == 0
