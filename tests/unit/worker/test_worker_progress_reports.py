"""Deep-pass progress: throttled in the analysis thread, sent latest-first from the loop, and
the percentages of several jobs batched into one call when they meet."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from analysis_worker.progress_reports import ProgressBatcher, ProgressSender, ProgressThrottle
from jobs_client.errors import JobsError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_throttle_maps_fractions_and_sends_only_meaningful_steps() -> None:
    sent: list[int] = []
    clock = Clock()
    throttle = ProgressThrottle(
        asyncio.get_running_loop(),
        sent.append,
        start_pct=10,
        end_pct=99,
        min_interval=1.0,
        min_step=5,
        clock=clock,
    )

    def analysis_thread() -> None:
        throttle(0.01)  # 10 %: no advance
        throttle(0.06)  # 15 %: +5 points, sent
        throttle(0.07)  # 16 %: +1 within a second, held back
        clock.now += 1.0
        throttle(0.08)  # 17 %: a second later, sent
        throttle(0.05)  # going backwards never sends
        throttle(2.0)  # clamped to 99 %
        throttle(1.0)  # no change

    await asyncio.to_thread(analysis_thread)
    assert sent == [15, 17, 99]


async def test_sender_sends_the_latest_value_one_call_at_a_time() -> None:
    sent: list[int] = []
    in_flight = 0
    first_call_may_finish = asyncio.Event()
    first_call_started = asyncio.Event()
    second_call_done = asyncio.Event()

    async def send(pct: int) -> None:
        nonlocal in_flight
        in_flight += 1
        assert in_flight == 1
        sent.append(pct)
        if pct == 20:
            first_call_started.set()
            await first_call_may_finish.wait()
        in_flight -= 1
        if len(sent) == 2:
            second_call_done.set()

    sender = ProgressSender(send)
    sender.start()
    sender.offer(20)
    await first_call_started.wait()
    for pct in (30, 40, 50):  # arrive while the first call is still in flight
        sender.offer(pct)
    first_call_may_finish.set()
    await asyncio.wait_for(second_call_done.wait(), 5)
    await sender.close()
    assert sent == [20, 50]


async def test_batcher_sends_alone_at_once_and_together_while_one_is_in_flight() -> None:
    gate = asyncio.Event()
    singles: list[tuple[str, int]] = []
    batches: list[list[tuple[str, int]]] = []

    async def single(lease: str, pct: int) -> None:
        singles.append((lease, pct))
        await gate.wait()  # in flight until the test lets it answer

    async def many(items: Sequence[tuple[str, int]]) -> list[BaseException | None]:
        batches.append(list(items))
        return [LookupError(lease) if lease == "lost" else None for lease, _ in items]

    batcher = ProgressBatcher(single, many)
    first = asyncio.create_task(batcher.send("a", 20))
    while not singles:  # the first report is on its way, alone
        await asyncio.sleep(0)
    others = [
        asyncio.create_task(batcher.send(lease, pct))
        for lease, pct in (("b", 30), ("c", 40), ("lost", 50))
    ]
    for _ in range(5):
        await asyncio.sleep(0)  # loop turns: nothing may go while the first is in flight
    assert batches == []
    gate.set()
    await first
    results = await asyncio.gather(*others, return_exceptions=True)
    assert batches == [[("b", 30), ("c", 40), ("lost", 50)]]  # one call for the three
    assert results[:2] == [None, None] and isinstance(results[2], LookupError)
    assert (batcher.calls, batcher.reports) == (2, 4)


async def test_batcher_falls_back_to_single_calls_on_a_service_without_the_batch_form() -> None:
    singles: list[tuple[str, int]] = []
    tried = 0

    async def single(lease: str, pct: int) -> None:
        singles.append((lease, pct))

    async def many(items: Sequence[tuple[str, int]]) -> list[BaseException | None]:
        nonlocal tried
        tried += 1
        raise JobsError("unknown method", code=grpc.StatusCode.UNIMPLEMENTED)

    batcher = ProgressBatcher(single, many)
    for round_ in range(2):
        await asyncio.gather(*(batcher.send(f"{round_}-{i}", i) for i in range(3)))
    assert tried == 1  # asked once, then single calls only
    assert sorted(singles) == sorted((f"{r}-{i}", i) for r in range(2) for i in range(3))
