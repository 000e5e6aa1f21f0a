"""The fair FFmpeg limiter: a bound on holders, shared round-robin between jobs."""

from __future__ import annotations

import asyncio

from clipservice.jobs.limiter import FairLimiter


async def test_small_job_not_held_back_by_big_one() -> None:
    """A 1-clip job queued after a 50-clip job gets the second free slot, not the 51st."""
    limiter = FairLimiter(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def clip(job: str, i: int) -> None:
        async with limiter.slot(job):
            order.append(f"{job}{i}")
            await gate.wait()

    big = [asyncio.create_task(clip("big", i)) for i in range(50)]
    await asyncio.sleep(0)
    small = asyncio.create_task(clip("small", 0))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*big, small)
    assert order.index("small0") <= 2


async def test_never_more_than_slots_and_cancel_safe() -> None:
    """Holders never exceed the slots, and cancelled waiters give nothing away."""
    limiter = FairLimiter(2)
    active = 0
    peak = 0

    async def work(job: str) -> None:
        nonlocal active, peak
        async with limiter.slot(job):
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.001)
            active -= 1

    tasks = [asyncio.create_task(work(f"j{i % 3}")) for i in range(30)]
    await asyncio.sleep(0)
    for t in tasks[10:15]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert peak == 2
    assert limiter.in_use == 0 and limiter.waiting == 0
