"""Parked ClaimJob calls: woken oldest first, O(1) removal, "known empty" only while listening
and only when no notification arrived during the query, backoff timers, shutdown."""

from __future__ import annotations

import asyncio
import time

from job_service.wakeup import ClaimWaiters, wait_for


async def test_wake_goes_to_the_oldest_and_discard_removes_without_a_scan():
    w = ClaimWaiters()
    tickets = [w.register() for _ in range(10_000)]
    for t in tickets[1:-1]:
        w.discard(t)
    assert w.waiting == 2
    assert w.wake(1) == 1 and tickets[0].done() and not tickets[-1].done()


async def test_an_unused_wake_is_passed_on_a_used_one_is_not():
    w = ClaimWaiters()
    a, b, c = w.register(), w.register(), w.register()
    w.wake(1)
    w.discard(a, used=False)  # it found work another way: b gets the wake
    assert b.done() and not c.done()
    w.discard(b, used=True)
    assert not c.done()


async def test_known_empty_holds_only_while_listening_and_without_news():
    w = ClaimWaiters()
    assert w.may_be_claimable
    w.saw_empty(w.epoch)
    assert w.may_be_claimable  # not listening: nothing is known
    w.listening(True)
    epoch = w.epoch
    w.claimable(1)  # a notification during the query
    w.saw_empty(epoch)
    assert w.may_be_claimable
    w.saw_empty(w.epoch)
    assert not w.may_be_claimable
    w.listening(False)
    assert w.may_be_claimable


async def test_backoff_timer_wakes_when_the_job_becomes_claimable():
    w = ClaimWaiters()
    w.listening(True)
    w.saw_empty(w.epoch)
    ticket = w.register()
    w.claimable_at(time.time() + 0.3)
    w.claimable_at(time.time() + 0.1)  # the earlier one runs first
    start = time.monotonic()
    assert await wait_for(ticket, 2)
    assert 0.05 <= time.monotonic() - start < 0.3
    assert w.may_be_claimable
    w.saw_empty(w.epoch)
    later = w.register()
    assert await wait_for(later, 2)  # the 0.3 s one is still kept


async def test_close_answers_every_parked_call():
    w = ClaimWaiters()
    tickets = [w.register() for _ in range(5)]
    w.close()
    assert all(t.done() for t in tickets)
    assert w.register().done()
    await asyncio.sleep(0)
