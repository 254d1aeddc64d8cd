"""Webhook rules without a network: the address policy (SSRF), the retry schedule, signatures
the reference library accepts, cursors."""

from __future__ import annotations

import ipaddress
import time

import pytest
from standardwebhooks.webhooks import Webhook

from job_service.domain import errors
from job_service.events import decode_cursor, encode_cursor, validate_types
from job_service.webhooks.addresses import AddressPolicy, AddressRefused, parse_allowlist
from job_service.webhooks.delivery import SCHEDULE, retry_delay
from job_service.webhooks.signing import headers, new_secret


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "10.0.0.1", "172.16.3.4", "192.168.1.1", "169.254.169.254", "::1",
     "fe80::1", "fc00::1", "::ffff:10.0.0.1", "100.64.1.1", "0.0.0.0", "224.0.0.1"],
)  # fmt: skip
def test_private_addresses_are_refused_unless_allowlisted(ip: str) -> None:
    policy = AddressPolicy(allow_http=False, allowlist=())
    assert not policy.allowed(ipaddress.ip_address(ip))
    allowing = AddressPolicy(allow_http=False, allowlist=parse_allowlist(f"{ip}, 8.8.8.8"))
    assert allowing.allowed(ipaddress.ip_address(ip))


def test_public_addresses_pass_and_urls_are_checked() -> None:
    policy = AddressPolicy(allow_http=False, allowlist=parse_allowlist("127.0.0.0/8"))
    assert policy.allowed(ipaddress.ip_address("93.184.216.34"))
    assert policy.check_url("https://example.com:8443/x") == ("example.com", 8443)
    assert policy.check_url("https://127.0.0.5/x") == ("127.0.0.5", 443)
    with pytest.raises(AddressRefused):
        policy.check_url("https://10.0.0.1/x")
    for bad in ("http://example.com/", "file:///etc/passwd", "https://u:p@example.com/", "x"):
        with pytest.raises(errors.InvalidArgument):
            policy.check_url(bad)


def test_retry_schedule_is_the_standard_one_with_jitter() -> None:
    assert SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    for attempt, base in enumerate(SCHEDULE, start=1):
        delay = retry_delay(attempt, 1.0)
        assert delay is not None and 0.8 * base <= delay <= 1.2 * base
    assert retry_delay(len(SCHEDULE) + 1, 1.0) is None  # 10 attempts, then given up
    scaled = retry_delay(2, 0.001)
    assert scaled is not None and scaled <= 0.36


def test_signatures_verify_with_the_reference_library_during_rotation() -> None:
    new, old = new_secret(), new_secret()
    body = b'{"type":"job.done"}'
    h = headers([new, old], "3f2c-id", int(time.time()), body)
    assert len(h["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(body, h) == {"type": "job.done"}
    assert Webhook(old).verify(body, h) == {"type": "job.done"}


def test_cursors_round_trip_and_sort_as_strings() -> None:
    assert decode_cursor(encode_cursor((123, 4))) == (123, 4)
    assert encode_cursor((9, 1)) < encode_cursor((10, 0)) < encode_cursor((10, 2))
    assert decode_cursor("") == (0, 0)
    for bad in ("zz", "F" * 32, "0" * 31):
        with pytest.raises(errors.InvalidArgument):
            decode_cursor(bad)
    with pytest.raises(errors.InvalidArgument, match=r"types\[1\]"):
        validate_types(["job.done", "job.nope"])
