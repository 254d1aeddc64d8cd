"""Deep-pass progress: throttled in the analysis thread, sent latest-first from the loop."""

from __future__ import annotations

import asyncio

from analysis_worker.progress_reports import ProgressSender, ProgressThrottle


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
