"""Combiner: calls of one kind that arrive together share one statement (smart batching, as a
group commit does). The lease path runs its claims, renewals, progress reports and completions
through one each (lease_store.py)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
R = TypeVar("R")


@dataclasses.dataclass(slots=True)
class _Call(Generic[Item, R]):
    item: Item
    answer: asyncio.Future[R]


def _one(_item: object) -> int:
    return 1


def _same(_item: object) -> Hashable:
    return None


def _none(_item: object) -> Iterable[Hashable]:
    return ()


class Combiner(Generic[Item, R]):
    """A call alone runs at once, so a quiet service adds no wait; calls that arrive while a
    statement is in flight share the next one: a busy service runs one statement for many
    calls instead of one each.

    `run` takes the items of one statement, in arrival order, and returns one answer per item
    (or raises: every caller of that statement gets the failure). A statement takes the oldest
    waiting call and then, in arrival order, every later one with the same `key` (the
    parameters the statement shares) while its `rows` fit in `max_rows` (a single call may
    exceed it alone) and none of its `rows_of` (e.g. job ids) is already in the statement: two
    calls on one row never share a statement, so each statement's per-row outcome belongs to
    exactly one caller. With `in_order`, a statement stops at the first call that does not fit
    (when arrival order decides who gets what, as for claims); without it, later calls that fit
    go ahead of one that does not. A caller that stops waiting before its turn is left out."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[R]]],
        *,
        max_rows: int,
        rows: Callable[[Item], int] = _one,
        key: Callable[[Item], Hashable] = _same,
        rows_of: Callable[[Item], Iterable[Hashable]] = _none,
        in_order: bool = False,
    ) -> None:
        self._in_order = in_order
        self._run_items = run
        self._max_rows = max_rows
        self._rows = rows
        self._key = key
        self._rows_of = rows_of
        self._pending: collections.deque[_Call[Item, R]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        #: Statements run, and calls they answered (for tests and the bench).
        self.statements = 0
        self.calls = 0

    def submit(self, item: Item) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        call: _Call[Item, R] = _Call(item, loop.create_future())
        self._pending.append(call)
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return call.answer

    def _next_batch(self) -> list[_Call[Item, R]]:
        batch: list[_Call[Item, R]] = []
        rows = 0
        key: Hashable = None
        taken: set[Hashable] = set()
        left: collections.deque[_Call[Item, R]] = collections.deque()
        while self._pending:
            call = self._pending.popleft()
            if call.answer.done():  # the caller stopped waiting before its turn
                continue
            ids = list(self._rows_of(call.item))
            n = self._rows(call.item)
            if not batch:
                key = self._key(call.item)
            elif (
                rows + n > self._max_rows
                or self._key(call.item) != key
                or not taken.isdisjoint(ids)
            ):
                left.append(call)
                if self._in_order or rows >= self._max_rows:
                    break
                continue
            batch.append(call)
            rows += n
            taken.update(ids)
        left.extend(self._pending)
        self._pending = left
        return batch

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._next_batch()
                if batch:
                    await self._run(batch)
        finally:
            self._task = None
            # Cancelled (shutdown) with calls still waiting: they will not run.
            while self._pending:
                self._pending.popleft().answer.cancel()

    async def _run(self, batch: list[_Call[Item, R]]) -> None:
        try:
            answers = await self._run_items([c.item for c in batch])
            if len(answers) != len(batch):  # our bug: no caller may wait forever for it
                raise AssertionError(f"{len(answers)} answers for {len(batch)} calls")
        except asyncio.CancelledError:  # shutdown: the callers are being cancelled too
            for c in batch:
                c.answer.cancel()
            raise
        except Exception as exc:  # every caller of the statement gets its failure
            for c in batch:
                if not c.answer.done():
                    c.answer.set_exception(exc)
            return
        self.statements += 1
        self.calls += len(batch)
        for c, answer in zip(batch, answers, strict=True):
            if not c.answer.done():
                c.answer.set_result(answer)
