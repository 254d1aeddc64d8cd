"""Webhook delivery, as a background task of every job-service instance (docs/decisions.md,
"Events and webhooks": no new process to deploy; the instances share the work through the
database).

Two loops per instance:
- **fan-out**, woken by the events NOTIFY: each enabled endpoint's new readable events become
  delivery rows (`WebhookTransaction.fan_out`; endpoint rows locked with SKIP LOCKED, inserts
  idempotent);
- **delivery**: due rows are claimed with SKIP LOCKED and leased for one attempt, then POSTed
  concurrently, at most JOB_SERVICE_WEBHOOK_ENDPOINT_IN_FLIGHT per endpoint and
  JOB_SERVICE_WEBHOOK_MAX_IN_FLIGHT in all, so a slow endpoint holds up only itself. An
  instance killed mid-attempt leaves a lease that runs out; another instance (or the restarted
  one) then delivers the row again with the same webhook-id (at least once).

Success is a 2xx within JOB_SERVICE_WEBHOOK_TIMEOUT_SECONDS; redirects are not followed and
at most RESPONSE_CAP bytes of a body are read. 410 disables the endpoint at once; anything else
is retried on the Standard Webhooks schedule (scaled by JOB_SERVICE_WEBHOOK_RETRY_SCALE, ±20 %
jitter) and given up after the last step; an endpoint failing for
JOB_SERVICE_WEBHOOK_DISABLE_AFTER_SECONDS is disabled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp

from job_service.config import Settings
from job_service.domain.events import Claimed, EventRow
from job_service.events import EventSignal, encode_cursor
from job_service.metrics import Metrics
from job_service.ports import WebhookRecords
from job_service.webhooks import signing
from job_service.webhooks.addresses import AddressPolicy, connector_kwargs

log = logging.getLogger(__name__)

#: Seconds before attempt 2, 3, … (attempt 1 is immediate): 5 s, 5 min, 30 min, 2 h, 5 h,
#: 10 h, 14 h, 20 h, 24 h.
SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
JITTER = 0.2
#: Bytes of a response body read (and kept for the error message).
RESPONSE_CAP = 1024
#: Added to the timeout for the claim's lease: a killed instance's row is due again after it.
LEASE_MARGIN_SECONDS = 10.0
#: Fan-out passes after a wake-up, for events that were not readable yet (an older transaction
#: was still running when the NOTIFY came).
FANOUT_RECHECKS = (0.05, 0.2, 1.0)
#: The safety net while nothing wakes the loops (a NOTIFY lost while LISTEN reconnected).
IDLE_TICK_SECONDS = 30.0
FANOUT_BATCH = 1000
#: Endpoints given a lag label at most (bounded label set); the others are summed in "other".
LAG_LABELS = 20


def retry_delay(attempts: int, scale: float) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones; None: give up."""
    if attempts > len(SCHEDULE):
        return None
    base = SCHEDULE[attempts - 1] * scale
    return base * random.uniform(1 - JITTER, 1 + JITTER)


Render = Callable[[EventRow], dict[str, Any]]


def body_of(event: EventRow, render: Render) -> bytes:
    payload = {
        "type": event.type,
        "timestamp": event.occurred_at.isoformat().replace("+00:00", "Z"),
        "data": {
            "event_id": str(event.id),
            "cursor": encode_cursor((event.xid, event.seq)),
            "job_id": str(event.job_id),
            "owner_subject": event.owner_subject,
            "job": render(event),
        },
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class Relay:
    def __init__(
        self,
        records: WebhookRecords,
        settings: Settings,
        metrics: Metrics,
        signal: EventSignal,
        policy: AddressPolicy,
        render: Render,
    ) -> None:
        self._records = records
        self._s = settings
        self._metrics = metrics
        self._signal = signal
        self._policy = policy
        self._render = render
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: collections.Counter[uuid.UUID] = collections.Counter()
        self._attempts: set[asyncio.Task[None]] = set()
        self._work = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._claimed: dict[tuple[uuid.UUID, uuid.UUID], Claimed] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._s.webhook_max_in_flight,
            limit_per_host=self._s.webhook_endpoint_in_flight,
            **connector_kwargs(self._policy),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._s.webhook_timeout_seconds),
            auto_decompress=False,
            trust_env=False,
        )
        self._tasks = [
            asyncio.create_task(self._fan_out_forever(), name="webhook-fanout"),
            asyncio.create_task(self._deliver_forever(), name="webhook-deliver"),
        ]

    def wake(self) -> None:
        """Endpoints changed (added, enabled, replayed): look again now."""
        self._signal.notify_all()
        self._work.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        attempts = list(self._attempts)
        for t in attempts:
            t.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        # Rows leased by attempts cut short are due again at once, not after the lease.
        with contextlib.suppress(Exception):
            async with self._records.begin() as tx:
                for endpoint_id, event_id in list(self._claimed):
                    await tx.release_lease(endpoint_id, event_id)
        if self._session is not None:
            await self._session.close()

    # -- fan-out ------------------------------------------------------------------------------

    async def _fan_out_once(self) -> int:
        total = 0
        while True:
            async with self._records.begin() as tx:
                n = await tx.fan_out(FANOUT_BATCH)
            total += n
            if n < FANOUT_BATCH:
                break
        if total:
            self._work.set()
        return total

    async def _fan_out_forever(self) -> None:
        woken = self._signal.subscribe()
        try:
            while True:
                woken.clear()
                try:
                    await self._fan_out_once()
                    for delay in FANOUT_RECHECKS:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await woken.wait()
                        woken.clear()
                        await self._fan_out_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database away: try again on the next wake/tick
                    log.warning("webhook fan-out failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_TICK_SECONDS):
                        await woken.wait()
        finally:
            self._signal.unsubscribe(woken)

    # -- delivery -----------------------------------------------------------------------------

    async def _next_due_in(self, busy: list[uuid.UUID]) -> float:
        """Seconds until a delivery of an endpoint not at its in-flight cap is due."""
        async with self._records.begin() as tx:
            at = await tx.next_due_in(busy)
        return IDLE_TICK_SECONDS if at is None else min(max(float(at), 0.0), IDLE_TICK_SECONDS)

    async def _deliver_forever(self) -> None:
        cap, per = self._s.webhook_max_in_flight, self._s.webhook_endpoint_in_flight
        while True:
            self._work.clear()
            try:
                free = cap - len(self._attempts)
                claimed: list[Claimed] = []
                busy = [e for e, n in self._inflight.items() if n >= per]
                if free > 0:
                    async with self._records.begin() as tx:
                        claimed = await tx.claim(
                            limit=free,
                            per_endpoint=per,
                            busy=busy,
                            lease_seconds=self._s.webhook_timeout_seconds + LEASE_MARGIN_SECONDS,
                        )
                for c in claimed:
                    self._start_attempt(c)
                if claimed and len(claimed) >= free:
                    wait = IDLE_TICK_SECONDS  # full: an attempt ending wakes us
                elif claimed:
                    continue  # there may be more due now
                elif free <= 0:
                    wait = IDLE_TICK_SECONDS  # an attempt ending wakes us
                else:
                    wait = await self._next_due_in(busy)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: retry shortly
                log.warning("webhook delivery loop failed: %s", exc)
                wait = 1.0
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._work.wait()

    def _start_attempt(self, c: Claimed) -> None:
        key = (c.endpoint_id, c.event.id)
        self._claimed[key] = c
        self._inflight[c.endpoint_id] += 1
        task = asyncio.create_task(self._attempt(c), name=f"webhook-{c.event.id}")
        self._attempts.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._attempts.discard(t)
            self._inflight[c.endpoint_id] -= 1
            if self._inflight[c.endpoint_id] <= 0:
                del self._inflight[c.endpoint_id]
            if not t.cancelled():
                self._claimed.pop(key, None)
            self._work.set()

        task.add_done_callback(done)

    async def _post(self, c: Claimed) -> tuple[int | None, str]:
        """(HTTP status or None, what went wrong) for one attempt."""
        assert self._session is not None
        try:
            self._policy.check_url(c.url)
        except Exception as exc:
            return None, str(exc)
        body = body_of(c.event, self._render)
        headers = signing.headers(c.secrets, str(c.event.id), int(time.time()), body)
        try:
            async with self._session.post(
                c.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                snippet = await resp.content.read(RESPONSE_CAP)
                return resp.status, snippet.decode("utf-8", "replace")[:200]
        except TimeoutError:
            return None, f"no answer within {self._s.webhook_timeout_seconds:g} s"
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]
        except OSError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]

    async def _attempt(self, c: Claimed) -> None:
        extra = {
            "endpoint_id": str(c.endpoint_id),
            "event_id": str(c.event.id),
            "job_id": str(c.event.job_id),
            "attempt": c.attempts,
        }
        status, detail = await self._post(c)
        try:
            async with self._records.begin() as tx:
                if status is not None and 200 <= status < 300:
                    await tx.delivered(c.endpoint_id, c.event.id, status)
                    outcome = "delivered"
                else:
                    gone = status == 410
                    retry = None if gone else retry_delay(c.attempts, self._s.webhook_retry_scale)
                    error = f"HTTP {status}: {detail}" if status is not None else detail
                    disabled = await tx.failed(
                        c.endpoint_id,
                        c.event.id,
                        status=status,
                        error=error,
                        retry_in=0.0 if gone else retry,
                        gone=gone,
                        disable_after=self._s.webhook_disable_after_seconds,
                    )
                    outcome = "gone" if gone else ("retry" if retry is not None else "gave_up")
                    if disabled:
                        log.warning(
                            "webhook endpoint disabled: %s", disabled, extra=extra
                        )  # fmt: skip
                    log.info("webhook delivery failed (%s): %s", outcome, error, extra=extra)
        except Exception as exc:  # the lease runs out and the row is delivered again
            log.warning("could not record a webhook delivery: %s", exc, extra=extra)
            return
        self._metrics.webhook_deliveries_total.labels(outcome).inc()

    async def refresh_gauges(self) -> None:
        async with self._records.begin() as tx:
            lags = await tx.lag_by_endpoint(LAG_LABELS + 1000)
            disabled = await tx.count_disabled()
        gauge = self._metrics.webhook_outbox_lag_seconds
        gauge.clear()
        for endpoint_id, lag in lags[:LAG_LABELS]:
            gauge.labels(endpoint_id).set(lag)
        if len(lags) > LAG_LABELS:
            gauge.labels("other").set(max(lag for _, lag in lags[LAG_LABELS:]))
        self._metrics.webhook_endpoints_disabled.set(disabled)
