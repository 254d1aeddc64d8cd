"""Helpers of the events and webhooks tests: jobs made and moved by SQL (the trigger writes the
events whatever path changes a status), and a real HTTP receiver on 127.0.0.1 that verifies
every delivery with the `standardwebhooks` library and deduplicates by webhook-id."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from job_service.storage.db import asyncpg_dsn
from localinfra.netports import free_port


async def connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(database_url))


async def make_jobs(
    conn: asyncpg.Connection,
    owner: str,
    n: int,
    status: str = "awaiting_upload",
    *,
    own_tenants: bool = False,
) -> list[uuid.UUID]:
    """n jobs of `owner` in `status`, inserted in one statement. The tenant is the owner, as
    the service makes it; with `own_tenants` each job gets a sub-tenant of its own, so that
    transactions queueing them do not wait for each other on the tenant's row (the fair key's
    per-tenant lock, revision 0011) and really race."""
    session = uuid.uuid4()
    await conn.execute("INSERT INTO video_sessions (id) VALUES ($1)", session)
    ids = [uuid.uuid4() for _ in range(n)]
    tenants = [f"{owner}/t{i}" if own_tenants else owner for i in range(n)]
    await conn.execute(
        """
        INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,
            size_bytes, s3_bucket, s3_key, owner_subject, tenant)
        SELECT j, $2, $3::video_analysis_job_status, $5, 'clip.mp4', 'video/mp4', 1000,
            'videos', 'uploads/' || j::text, $4, t
        FROM unnest($1::uuid[], $6::text[]) AS u(j, t)
        """,
        ids,
        session,
        status,
        owner,
        status.upper(),
        tenants,
    )
    return ids


async def set_status(
    conn: asyncpg.Connection, job_ids: Sequence[uuid.UUID], status: str, code: str | None = None
) -> None:
    await conn.execute(
        "UPDATE video_analysis_jobs SET status = $2::video_analysis_job_status, "
        "stage = $4, error_code = $3, updated_at = now() WHERE id = ANY($1::uuid[])",
        list(job_ids),
        status,
        code,
        status.upper(),
    )


async def queue_one_by_one(database_url: str, job_ids: Sequence[uuid.UUID]) -> None:
    """awaiting_upload -> queued, one transaction per job (one event each)."""
    conn = await connect(database_url)
    try:
        for j in job_ids:
            await set_status(conn, [j], "queued")
    finally:
        await conn.close()


@dataclasses.dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1. `mode`: "ok" (204), "down" (503), "gone" (410), or a
    float: answer 204 after that many seconds."""

    secret: str = dataclasses.field(default="", repr=False)
    mode: Any = "ok"
    seen: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    accepted: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    refused: int = 0
    #: Requests that reached the handler, answered or not yet.
    arrived: int = 0
    refused_ids: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    bad_signatures: int = 0
    last_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    last_body: bytes = b""
    port: int = 0
    _runner: web.AppRunner | None = None
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.seen.values() if n > 1)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.arrived += 1
        self.changed.set()
        mode = self.mode
        if mode == "down":
            self.refused += 1
            self.refused_ids[headers["webhook-id"]] += 1
            self.changed.set()
            return web.Response(status=503, text="down")
        if mode == "gone":
            self.refused += 1
            return web.Response(status=410, text="gone")
        if isinstance(mode, (int, float)):
            await asyncio.sleep(mode)  # a slow receiver: the delay is what is under test
        if self.secret:
            try:
                Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                self.bad_signatures += 1
                return web.Response(status=400, text="bad signature")
        msg_id = headers["webhook-id"]
        self.seen[msg_id] += 1
        self.last_headers, self.last_body = headers, body
        if msg_id not in self.accepted:  # deduplicating receiver
            self.accepted[msg_id] = json.loads(body)
            self.order.append(msg_id)
        self.changed.set()
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        if self.port == 0:
            self.port = free_port()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, n: int, timeout: float) -> None:
        """Until `n` distinct webhook-ids were accepted (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.accepted) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(self.accepted)} of {n} deliveries within {timeout}s"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
