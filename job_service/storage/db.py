"""Engine creation, the lease path's own asyncpg pool, the unit of work, and the one place where
database failures are classified: which ones a retry can cure (UNAVAILABLE), which ones are a
conflict (ABORTED), and which ones leave the outcome of the statement unknown.

`classify()` is the function every path uses; `transaction()` (SQLAlchemy) and `LeasePool.run`
(asyncpg) both turn what it says into the domain's errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from job_service.domain.errors import (
    DatabaseConflict,
    DatabaseOutcomeUnknown,
    DatabaseUnavailable,
    JobServiceError,
    ServiceOverloaded,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
#: application_name of the lease pool's connections (pg_stat_activity shows the lease path).
LEASE_APPLICATION_NAME = "job-service-leases"
#: What the lease path's operations are handed: a pooled connection.
Connection = asyncpg.Connection | PoolConnectionProxy


class Lane(enum.Enum):
    """Which admission a lease-pool statement goes through (LeasePool)."""

    #: Keeps a granted lease alive or ends it (Heartbeat, ReportProgress, CompleteJob, FailJob,
    #: ReleaseJob, hand-backs): may use every connection, served first, never shed.
    KEEP = "keep"
    #: Everything else (claims, the reaper, watches): at most size - reserved connections,
    #: shed with RESOURCE_EXHAUSTED when too many wait.
    OTHER = "other"


#: Told to shed callers (google.rpc.RetryInfo): retry after about this long.
SHED_RETRY_SECONDS = 1.0


class DbFault(enum.Enum):
    """What a database failure means for the caller."""

    #: Nothing was changed and a retry later can succeed (connect refused, read-only during a
    #: failover, lock or statement timeout, too many connections, shutting down).
    UNAVAILABLE = "unavailable"
    #: Nothing was changed; the statement lost a race (serialization failure, deadlock).
    CONFLICT = "conflict"
    #: The connection broke while the statement (or its implicit COMMIT) was in flight: it may
    #: or may not have taken effect.
    UNKNOWN_OUTCOME = "unknown_outcome"


# SQLSTATE -> fault. Classes (two characters) first, then exact codes override.
_SQLSTATE_CLASSES = {
    "08": DbFault.UNKNOWN_OUTCOME,  # connection exception
    "53": DbFault.UNAVAILABLE,  # insufficient resources (too many connections, disk full)
    "57": DbFault.UNAVAILABLE,  # operator intervention (shutdown, cancel, cannot connect now)
    "58": DbFault.UNAVAILABLE,  # system error (I/O)
    "40": DbFault.CONFLICT,  # transaction rollback
}
_SQLSTATES = {
    "25006": DbFault.UNAVAILABLE,  # read_only_sql_transaction: a standby, or failover under way
    "55P03": DbFault.UNAVAILABLE,  # lock_not_available: lock_timeout
    "57014": DbFault.UNAVAILABLE,  # query_canceled: statement_timeout
    "57P01": DbFault.UNKNOWN_OUTCOME,  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02": DbFault.UNKNOWN_OUTCOME,  # crash_shutdown
    "57P03": DbFault.UNAVAILABLE,  # cannot_connect_now: starting up / in recovery
    "40003": DbFault.UNKNOWN_OUTCOME,  # statement_completion_unknown
}
# Raised by drivers without a SQLSTATE when the connection is unusable.
_CONNECTION_ERRORS = (
    OSError,  # connection refused / reset, DNS
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or (cur.__context__ if not cur.__suppress_context__ else None)
    return seen


def classify(exc: BaseException) -> DbFault | None:
    """What a failure raised by a database call means; None when a retry cannot cure it
    (a bug, a constraint violation): the caller answers INTERNAL or maps it itself.

    Takes asyncpg errors, SQLAlchemy's wrappers of them, and plain socket errors."""
    if isinstance(exc, sa_exc.TimeoutError):  # pool checkout timed out: nothing ran
        return DbFault.UNAVAILABLE
    for cause in _causes(exc):
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state:
            fault = _SQLSTATES.get(state) or _SQLSTATE_CLASSES.get(state[:2])
            if fault is not None:
                return fault
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return DbFault.UNKNOWN_OUTCOME
    if any(isinstance(c, _CONNECTION_ERRORS) for c in _causes(exc)):
        return DbFault.UNKNOWN_OUTCOME
    return None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (asyncpg's, or wrapped by SQLAlchemy), if it has one."""
    for cause in _causes(exc):
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def domain_error(exc: BaseException, fault: DbFault) -> JobServiceError:
    """The domain error the caller is told for a classified database failure (ErrorInfo
    metadata `sqlstate` when the database gave one)."""
    state = sqlstate(exc)
    name = _error_name(exc)
    meta = {"sqlstate": state} if state else {}
    if fault is DbFault.CONFLICT:
        return DatabaseConflict(
            f"the job database aborted the statement as a conflict ({name}); nothing was "
            "changed, retry",
            **meta,
        )
    if fault is DbFault.UNKNOWN_OUTCOME:
        return DatabaseOutcomeUnknown(
            f"the connection to the job database broke during the call ({name}); the change "
            "may or may not have been made. Retrying is safe: a repeated call that already "
            "took effect answers OK",
            **meta,
        )
    return DatabaseUnavailable(
        f"the job database is unavailable ({name}); nothing was changed, retry later", **meta
    )


def _error_name(exc: BaseException) -> str:
    """The most specific name: asyncpg's class under SQLAlchemy's DBAPIError wrapper."""
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, asyncpg.exceptions.PostgresError | asyncpg.exceptions.InterfaceError):
            state = getattr(cause, "sqlstate", None)
            return f"{type(cause).__name__}, SQLSTATE {state}" if state else type(cause).__name__
    return type(causes[-1]).__name__


def _means_unreachable(exc: BaseException, fault: DbFault) -> bool:
    """Whether workers could not have renewed their leases through us: a broken connection,
    a database that refuses writes (failover) or connections. A lock timeout is not."""
    if fault is DbFault.UNKNOWN_OUTCOME:
        return True
    states = {getattr(c, "sqlstate", None) for c in _causes(exc)}
    return bool(states & {"25006", "57P03"}) or any(
        isinstance(s, str) and s.startswith(("53", "08")) for s in states
    )


def create_engine(url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=connect_timeout,
        # No pre-ping: it costs a round trip per transaction. A connection broken by a
        # database restart fails one call with UNAVAILABLE (retryable) and is discarded.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"timeout": connect_timeout, "command_timeout": 30},
    )


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg wants, from a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def _classified() -> Iterator[None]:
    """Database errors raised in the block become domain errors (classify())."""
    try:
        yield
    except JobServiceError:
        raise
    except Exception as exc:
        fault = classify(exc)
        if fault is not None:
            raise domain_error(exc, fault) from exc
        raise


@contextlib.asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that commits when the block ends without an exception."""
    with _classified():
        async with engine.begin() as conn:
            yield conn


@contextlib.asynccontextmanager
async def single_reads(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in autocommit for reads that are one statement each: no BEGIN / COMMIT
    around them, so a read is one round trip (GetJob). Nothing written here is atomic with
    anything else: use `transaction` for that."""
    with _classified():
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn


class Reachability:
    """Whether this instance can reach the database, and since when.

    The start of the process counts as "just became reachable": nobody knows how long the
    service (or its database) was away before it. The reaper waits one grace after this moment
    before it takes leases, so workers that could not renew during an outage get to renew first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.reachable = True
        self.reachable_since = clock()
        self.outages = 0

    def ok(self) -> None:
        if not self.reachable:
            self.reachable = True
            self.reachable_since = self._clock()
            log.warning("job database reachable again")

    def lost(self) -> None:
        if self.reachable:
            self.reachable = False
            self.outages += 1
            log.warning("job database unreachable")

    def stable_for(self) -> float:
        """Seconds since the database became reachable; 0 while it is not."""
        return self._clock() - self.reachable_since if self.reachable else 0.0


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("lease statement of a cancelled call failed: %s", task.exception())


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Instead of asyncpg's reset on release (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL:
    one more round trip per call). The lease path's connections carry no session state: only
    single statements in autocommit and transactions that always end (asyncpg still rolls back
    one that did not)."""


class LeasePool:
    """The lease path's own asyncpg pool: single statements in autocommit, prepared once per
    connection (asyncpg's statement cache). Its own pool so that floods of WatchJob or admin
    calls on the SQLAlchemy engine cannot starve heartbeats of connections."""

    def __init__(
        self,
        database_url: str,
        *,
        size: int,
        connect_timeout: float,
        lock_timeout: float,
        statement_timeout: float,
        reachability: Reachability | None = None,
        reserved: int | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._size = size
        # Admission in two lanes: the lease-keeping lane may use every connection and is served
        # first; the other lane never holds the reserved ones, and past max_waiting queued
        # calls it is shed at once instead of queueing towards the acquire timeout. (A pool of
        # one connection has nothing to reserve.)
        default = max(1, size // 4) if size > 1 else 0
        self.reserved = reserved if reserved is not None else default
        if not 0 <= self.reserved < size:
            raise ValueError(f"reserved lease connections must be in 0..{size - 1}")
        self.max_waiting = max_waiting if max_waiting is not None else 64 * size
        self.busy = {Lane.KEEP: 0, Lane.OTHER: 0}
        self._queues: dict[Lane, collections.deque[asyncio.Future[None]]] = {
            Lane.KEEP: collections.deque(),
            Lane.OTHER: collections.deque(),
        }
        #: Calls of the other lane shed since start.
        self.shed = 0
        self._connect_timeout = connect_timeout
        self._settings = {
            "lock_timeout": f"{int(lock_timeout * 1000)}ms",
            "statement_timeout": f"{int(statement_timeout * 1000)}ms",
            "application_name": LEASE_APPLICATION_NAME,
        }
        self.reachability = reachability or Reachability()
        self._pool: asyncpg.Pool | None = None
        #: When a statement last came back from the database (monotonic clock).
        self._answered_at = float("-inf")

    async def start(self) -> None:
        # min_size=0: the service starts (and answers UNAVAILABLE) while the database is down.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._size,
            timeout=self._connect_timeout,
            init=_init_connection,
            reset=_keep_session,
            server_settings=self._settings,
            max_inactive_connection_lifetime=300,
        )

    async def close(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._pool.close()
            self._pool.terminate()

    def _may_take(self, lane: Lane) -> bool:
        if self.busy[Lane.KEEP] + self.busy[Lane.OTHER] >= self._size:
            return False
        return lane is Lane.KEEP or self.busy[Lane.OTHER] < self._size - self.reserved

    def _wake(self) -> None:
        for lane in (Lane.KEEP, Lane.OTHER):  # the lease-keeping lane first
            queue = self._queues[lane]
            while queue and self._may_take(lane):
                fut = queue.popleft()
                if not fut.done():
                    self.busy[lane] += 1
                    fut.set_result(None)

    def _free(self, lane: Lane) -> None:
        self.busy[lane] -= 1
        self._wake()

    async def _admit(self, lane: Lane) -> None:
        """A connection slot of `lane`; raises UNAVAILABLE after the acquire timeout, and (the
        other lane) RESOURCE_EXHAUSTED at once when too many calls wait already."""
        queue = self._queues[lane]
        if not queue and self._may_take(lane):
            self.busy[lane] += 1
            return
        if lane is Lane.OTHER and len(queue) >= self.max_waiting:
            self.shed += 1
            raise ServiceOverloaded(
                f"the job-service is shedding calls that do not keep a lease: {len(queue)} "
                f"wait for its {self._size - self.reserved} shared lease-path connections "
                f"({self.reserved} more are kept for heartbeats, reports and completions); "
                "nothing was changed, retry after the delay given",
                retry_after=SHED_RETRY_SECONDS,
                waiting=len(queue),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        waited_from = time.monotonic()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.shield(fut)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                self._free(lane)  # handed a slot as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if self._answered_at > waited_from:
                # The database answered other calls while this one queued for a connection:
                # the service is overloaded, the database is not away (no outage grace, no
                # "unreachable" for on-call). Still UNAVAILABLE: nothing ran, retry later.
                error = DatabaseUnavailable(
                    f"all {self._size} lease-path connections stayed busy for "
                    f"{self._connect_timeout:g} s (the job-service is overloaded; "
                    "JOB_SERVICE_LEASE_POOL_SIZE, more instances); nothing was changed, retry "
                    "later",
                    overloaded="true",
                )
                error.retry_after = SHED_RETRY_SECONDS
                raise error from exc
            self.reachability.lost()
            raise domain_error(exc, DbFault.UNAVAILABLE) from exc

    async def run(self, fn: Callable[[Connection], Awaitable[T]], *, lane: Lane = Lane.OTHER) -> T:
        """Run `fn` on a pooled connection; database failures become domain errors.

        `lane`: the admission it goes through (Lane): lease-keeping statements never wait
        behind the others, which are shed first under overload.

        Failing to get a connection means nothing ran (UNAVAILABLE); a failure while `fn` runs is
        classified by classify(). Reachability is tracked on the way.

        A caller that is cancelled (its RPC's deadline passed, the client went away) does not
        cancel the statement: it runs to its end (bounded by statement_timeout) and the
        connection goes back to the pool intact, instead of being broken mid-protocol."""
        await self._admit(lane)
        task = asyncio.ensure_future(self._run(fn))
        task.add_done_callback(lambda _t: self._free(lane))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_consume)  # nobody awaits it now: no "never retrieved"
            raise

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        assert self._pool is not None, "LeasePool.start() was not awaited"
        try:
            # Admission already holds a slot for us: this waits only while a connection is made.
            conn = await self._pool.acquire(timeout=self._connect_timeout)
        except Exception as exc:
            if classify(exc) is None:
                raise
            self.reachability.lost()
            raise domain_error(exc, DbFault.UNAVAILABLE) from exc
        pid = conn.get_server_pid()
        try:
            result = await fn(conn)
        except Exception as exc:
            fault = classify(exc)
            if fault is None:
                raise
            if _means_unreachable(exc, fault):
                self.reachability.lost()
            log.warning("lease path: %s (%s: %s)", fault.value, type(exc).__name__, exc)
            error = domain_error(exc, fault)
            if isinstance(error, DatabaseOutcomeUnknown):
                # The server may still be running the statement (it has not noticed the client
                # is gone): whoever must make the outcome definitive can end that backend.
                error.backend_pid = pid
            raise error from exc
        finally:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)
        self._answered_at = time.monotonic()
        self.reachability.ok()
        return result


async def listen_forever(
    dsn: str,
    channels: Mapping[str, Callable[..., None]],
    *,
    up: Callable[[], None],
    down: Callable[[bool], None],
    what: str,
) -> None:
    """Keep one LISTEN connection on `channels` (channel -> asyncpg notification callback),
    reconnecting with a capped backoff. `up()` runs each time it is listening (notifications
    sent while it was not are lost: wake whoever waits); `down(outage)` each time it stops,
    with outage False only when cancelled (shutdown)."""
    backoff = 0.2
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            for channel, callback in channels.items():
                await conn.add_listener(channel, callback)
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, ev=closed: ev.set())
            backoff = 0.2
            up()
            await closed.wait()
            log.warning("%s LISTEN connection closed; reconnecting", what)
        except asyncio.CancelledError:
            down(False)
            if conn is not None and not conn.is_closed():
                conn.terminate()
            raise
        except Exception as exc:  # reconnect on any connection fault
            log.warning("%s LISTEN failed: %s; retrying in %.1fs", what, exc, backoff)
        down(True)
        if conn is not None and not conn.is_closed():
            conn.terminate()
        await asyncio.sleep(backoff)  # reconnect backoff, not a stand-in for work
        backoff = min(backoff * 2, 5.0)
