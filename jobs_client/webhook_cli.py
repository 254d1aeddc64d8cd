"""`jobctl webhook …`: webhook endpoints (docs/events.md).

jobctl webhook add URL --subject S [--types job.done,job.failed]   prints id and secret once
jobctl webhook list [--subject S]
jobctl webhook disable|enable|remove ENDPOINT
jobctl webhook rotate-secret ENDPOINT [--overlap 24h]              prints the new secret
jobctl webhook replay ENDPOINT --since 2h|2026-12-07T10:00:00Z|CURSOR
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2
from jobs.v1 import jobs_pb2 as pb

from jobs_client.events import Webhooks

if TYPE_CHECKING:
    from jobs_client.cli import Client, Output

_CURSOR = re.compile(r"[0-9a-f]{32}")


def add_parser(add: Callable[[str, str], argparse.ArgumentParser], parser_class: Any) -> None:
    hook = add("webhook", "webhook endpoints: add, list, disable, enable, rotate, remove, replay")
    sub = hook.add_subparsers(dest="webhook_command", required=True, parser_class=parser_class)
    a = sub.add_parser("add", help="register an endpoint; prints its id and secret (once)")
    a.add_argument("url", help="https://… that receives the events")
    a.add_argument("--subject", required=True, help="owner subject whose jobs' events it gets")
    a.add_argument("--types", default="", help="comma-separated event types (default: all)")
    ls = sub.add_parser("list", help="endpoints, with state and pending deliveries")
    ls.add_argument("--subject", default="")
    for name, text in (
        ("disable", "stop delivering (pending events are kept)"),
        ("enable", "deliver again, from where it stopped"),
        ("remove", "delete the endpoint and its pending deliveries"),
    ):
        sub.add_parser(name, help=text).add_argument("endpoint")
    rot = sub.add_parser("rotate-secret", help="new secret; the old one signs beside it a while")
    rot.add_argument("endpoint")
    rot.add_argument("--overlap", default=None, help="how long the old secret still signs")
    rep = sub.add_parser("replay", help="deliver the endpoint's events again")
    rep.add_argument("endpoint")
    rep.add_argument(
        "--since", required=True, help="a duration (2h), a time (2026-12-07T10:00:00Z) or a cursor"
    )


def _when(text: str) -> datetime | str:
    from jobs_client.cli import UsageError, parse_duration

    if _CURSOR.fullmatch(text):
        return text
    try:
        return datetime.now(UTC) - parse_duration(text)
    except (ValueError, UsageError, argparse.ArgumentTypeError):
        pass
    try:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(text)
        return stamp.ToDatetime(tzinfo=UTC)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give a duration (2h), an RFC 3339 time or an event cursor"
        ) from None


def _lines(e: pb.WebhookEndpoint) -> str:
    state = "enabled" if e.enabled else f"DISABLED ({e.disabled_reason})"
    if e.enabled and e.HasField("failing_since"):
        state += f", failing since {e.failing_since.ToJsonString()}"
    types = ",".join(e.types) or "all"
    pending = e.pending_deliveries
    return f"{e.endpoint_id}  {e.subject}  {e.url}  types={types}  {state}  pending={pending}"


def run(c: Client, args: argparse.Namespace, o: Output) -> int:
    from jobs_client.cli import EXIT_OK, as_json, parse_duration

    hooks = Webhooks(c.jobs.aio)
    run_ = c.jobs._run
    cmd = args.webhook_command
    if cmd == "add":
        types = [t for t in args.types.split(",") if t]
        resp = run_(hooks.add(args.url, args.subject, types))
        if o.json_mode:
            o.json(as_json(resp))
        else:
            o.result(f"endpoint: {resp.endpoint.endpoint_id}")
            o.result(f"secret:   {resp.secret}")
            o.note("the secret is shown only now: store it with the receiver")
    elif cmd == "list":
        endpoints = run_(hooks.list(args.subject))
        if o.json_mode:
            o.json([as_json(e) for e in endpoints])
        else:
            for e in endpoints:
                o.result(_lines(e))
    elif cmd in ("disable", "enable"):
        e = run_(hooks.set_enabled(args.endpoint, cmd == "enable"))
        o.json(as_json(e)) if o.json_mode else o.result(_lines(e))
    elif cmd == "remove":
        run_(hooks.remove(args.endpoint))
        o.result(f"removed {args.endpoint}")
    elif cmd == "rotate-secret":
        overlap = parse_duration(args.overlap) if args.overlap else None
        rotated = run_(hooks.rotate_secret(args.endpoint, overlap))
        if o.json_mode:
            o.json(as_json(rotated))
        else:
            o.result(f"secret:   {rotated.secret}")
            o.note(
                "the old secret keeps signing until "
                f"{rotated.endpoint.old_secret_until.ToJsonString()}"
            )
    elif cmd == "replay":
        when = _when(args.since)
        n = run_(
            hooks.replay(args.endpoint, after_cursor=when)
            if isinstance(when, str)
            else hooks.replay(args.endpoint, since=when)
        )
        o.result(f"queued {n} deliveries")
    return EXIT_OK
