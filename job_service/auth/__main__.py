"""`python -m job_service.auth`: the operator's key and token tool, run where the job-service's
settings (JOB_SERVICE_AUTH_*, JOB_SERVICE_DATABASE_URL) are.

    mint   --role worker --subject fleet-a --ttl 30d    print a signed token
    revoke --jti <id> [--reason ...]                    deny a token (or --token <jwt>)
    jwks   key.pem=kid [key2.pem=kid2 ...]               print a JWKS of the public keys
    dev-credentials --dir DIR                          throwaway secret + tokens (compose)

`jobctl token create` is the same minting from the client side (README, Security).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from job_service.auth.policy import Role
from job_service.auth.tokens import ConfigError, jwk_of, mint, parse_ttl, unverified_claims
from job_service.config import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m job_service.auth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mint", help="print a token signed with the configured key")
    m.add_argument("--role", required=True, choices=[r.value for r in Role])
    m.add_argument("--subject", required=True, help="who the token is for, e.g. fleet-a")
    m.add_argument("--ttl", default="30d", help="lifetime: 30d, 12h, 15m or seconds")
    m.add_argument("--kid", default=None, help="key id to sign with (default: the first key)")
    r = sub.add_parser("revoke", help="add a token's jti to the denylist in the database")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--jti")
    g.add_argument("--token", help="the token itself (its jti, sub and exp are read)")
    r.add_argument("--reason", default="")
    d = sub.add_parser(
        "dev-credentials", help="write a throwaway HS256 secret and one token per audience"
    )
    d.add_argument("--dir", type=Path, required=True)
    d.add_argument("--keep", action="store_true", help="reuse the secret already there")
    j = sub.add_parser("jwks", help="print a JWKS document of public keys")
    j.add_argument("keys", nargs="+", metavar="PEM=KID")
    return p


def _mint(s: Settings, args: argparse.Namespace) -> int:
    if args.kid is not None and s.auth_algorithm == "HS256":
        from job_service.auth.tokens import hs256_secrets, parse_hs256_secrets

        secrets = parse_hs256_secrets(hs256_secrets(s))
        if args.kid not in secrets:
            raise ConfigError(f"no HS256 secret with kid {args.kid!r}")
        token = mint(
            s,
            role=args.role,
            subject=args.subject,
            ttl_seconds=parse_ttl(args.ttl),
            key=secrets[args.kid],
            kid=args.kid,
        )
    else:
        token = mint(
            s, role=args.role, subject=args.subject, ttl_seconds=parse_ttl(args.ttl), kid=args.kid
        )
    claims = unverified_claims(token)
    expires = datetime.fromtimestamp(claims["exp"], UTC).isoformat()
    print(
        f"# {args.role} token for {args.subject}, jti {claims['jti']}, expires {expires}",
        file=sys.stderr,
    )
    print(token)
    return 0


async def _revoke(s: Settings, args: argparse.Namespace) -> int:
    from job_service.storage.db import create_engine
    from job_service.storage.revocations import RevocationDatabase

    jti, subject, expires_at = args.jti, "", None
    if args.token:
        claims = unverified_claims(args.token)
        jti, subject = claims.get("jti"), str(claims.get("sub", ""))
        if "exp" in claims:
            expires_at = datetime.fromtimestamp(claims["exp"], UTC)
        if not jti:
            raise ConfigError("the token has no jti: it cannot be revoked, rotate the key")
    engine = create_engine(
        s.database_url, pool_size=1, connect_timeout=s.db_connect_timeout_seconds
    )
    try:
        added = await RevocationDatabase(engine).revoke(
            jti, subject=subject, reason=args.reason, expires_at=expires_at
        )
    finally:
        await engine.dispose()
    print(f"revoked {jti}" if added else f"{jti} was already revoked")
    print(
        f"(refused by every job-service within JOB_SERVICE_AUTH_REVOCATION_REFRESH_SECONDS"
        f"={s.auth_revocation_refresh_seconds:g})",
        file=sys.stderr,
    )
    return 0


def _jwks(args: argparse.Namespace) -> int:
    keys = []
    for spec in args.keys:
        path, sep, kid = spec.rpartition("=")
        if not sep:
            raise ConfigError(f"{spec!r}: give PEM=KID")
        data = Path(path).read_bytes()
        try:
            key: object = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError):
            key = serialization.load_pem_public_key(data)
        keys.append(jwk_of(key, kid))
    print(json.dumps({"keys": keys}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "jwks":
            return _jwks(args)
        if args.command == "dev-credentials":
            from job_service.auth.devkeys import write_dev_credentials

            write_dev_credentials(args.dir, keep=args.keep)
            print(f"wrote {args.dir}/hs256.secret and uploader/worker/operator.jwt")
            return 0
        settings = Settings.from_env()
        if args.command == "mint":
            return _mint(settings, args)
        return asyncio.run(_revoke(settings, args))
    except (ConfigError, SettingsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
