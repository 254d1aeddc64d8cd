"""Where webhooks may go (SSRF rules): https only unless JOB_SERVICE_WEBHOOK_ALLOW_HTTP; never to
loopback, link-local, private, multicast, reserved or unspecified addresses unless
JOB_SERVICE_WEBHOOK_ALLOWED_ADDRESSES names them (addresses or CIDR blocks).

Checked when an endpoint is added and again at every connection: the delivery's resolver only
hands aiohttp addresses that pass, so a name that resolves elsewhere later (DNS rebinding) is
refused too."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from job_service.domain import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(errors.JobServiceError):
    """The webhook URL is not allowed."""

    kind = errors.ErrorKind.INVALID_ARGUMENT
    reason = "WEBHOOK_URL_REFUSED"


def parse_allowlist(text: str) -> tuple[Network, ...]:
    out = []
    for item in text.replace(",", " ").split():
        out.append(ipaddress.ip_network(item, strict=False))
    return tuple(out)


class AddressPolicy:
    def __init__(self, *, allow_http: bool, allowlist: Iterable[Network]) -> None:
        self.allow_http = allow_http
        self.allowlist = tuple(allowlist)

    def allowed(self, ip: IPAddress) -> bool:
        if any(ip in net for net in self.allowlist):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
            if any(ip in net for net in self.allowlist):
                return True
        return not (
            ip.is_loopback
            or ip.is_link_local
            or ip.is_private
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
            or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED)
        )

    def check_url(self, url: str, field: str = "url") -> tuple[str, int]:
        """(host, port) of a URL whose scheme and form are allowed; raises InvalidArgument."""
        if len(url) > 2000:
            raise errors.InvalidArgument(field, "is longer than 2000 characters")
        if any(ord(c) < 33 or ord(c) == 127 for c in url):
            raise errors.InvalidArgument(field, "must not contain spaces or control characters")
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http"):
            raise errors.InvalidArgument(field, "must be an https:// URL")
        if parts.scheme == "http" and not self.allow_http:
            raise errors.InvalidArgument(
                field, "must be https:// (http is allowed only with JOB_SERVICE_WEBHOOK_ALLOW_HTTP)"
            )
        if not parts.hostname or parts.username or parts.password:
            raise errors.InvalidArgument(field, "must name a host and carry no credentials")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise errors.InvalidArgument(field, "has an invalid port") from None
        # aiohttp does not resolve an address literal: check it here (at every delivery too).
        try:
            literal = _ip(parts.hostname)
        except ValueError:
            literal = None
        if literal is not None and not self.allowed(literal):
            raise AddressRefused(
                f"{field}: {parts.hostname} is a loopback, private, link-local or reserved "
                "address: refused unless JOB_SERVICE_WEBHOOK_ALLOWED_ADDRESSES names it",
                field=field,
            )
        return parts.hostname, port

    async def check_resolves(self, url: str, field: str = "url") -> None:
        """The URL's host resolves, and only to allowed addresses."""
        host, port = self.check_url(url, field)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise errors.InvalidArgument(field, f"host {host!r} does not resolve ({exc})") from None
        refused = sorted({str(i[4][0]) for i in infos if not self.allowed(_ip(str(i[4][0])))})
        if refused:
            raise AddressRefused(
                f"{field}: {host!r} resolves to {', '.join(refused)}: loopback, private, "
                "link-local and reserved addresses are refused unless "
                "JOB_SERVICE_WEBHOOK_ALLOWED_ADDRESSES names them",
                field=field,
            )


_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT


def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])


class SafeResolver(AbstractResolver):
    """aiohttp resolver that drops refused addresses; none left: the connection fails."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        ok = [r for r in results if self._policy.allowed(_ip(r["host"]))]
        if not ok:
            raise OSError(f"{host} resolves only to refused addresses")
        return ok

    async def close(self) -> None:
        await self._inner.close()


def connector_kwargs(policy: AddressPolicy) -> dict[str, Any]:
    return {"resolver": SafeResolver(policy), "use_dns_cache": False}
