"""Stats collection against real local HTTP servers: bounded concurrency, per-worker timeouts,
and failures reported per node instead of raised."""

from __future__ import annotations

import asyncio

from aiohttp import web

from datahoard.operator.collect import collect
from datahoard.operator.status import WorkerPod
from datahoard.stats import WarmingStats, WorkerStats
from tests.support.ports import free_port

STATS = WorkerStats(source="s3://b/x", mountpoint="/m", ready=True, files=1, total_bytes=10,
                    cached_bytes=5, capacity_bytes=100, served_from_cache_bytes=3,
                    served_from_source_bytes=1, fetched_bytes=5, hits=1, misses=1, skipped_keys=0,
                    errors=0, warming=WarmingStats(state="done"))


async def serve(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/stats", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def pods(n: int, ip: str = "127.0.0.1") -> list[WorkerPod]:
    return [WorkerPod(name=f"w{i}", node=f"n{i}", ip=ip, running=True, ready=True) for i in range(n)]


def test_concurrency_is_bounded() -> None:
    async def main() -> tuple[dict, int]:
        active = peak = 0
        release = asyncio.Event()

        async def handler(_: web.Request) -> web.Response:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if peak >= 3:
                release.set()  # the limit is reached: let everyone finish
            await asyncio.wait_for(release.wait(), 10)
            active -= 1
            return web.json_response(STATS.model_dump())

        runner, port = await serve(handler)
        try:
            return await collect(pods(10), port, timeout=20, concurrency=3), peak
        finally:
            await runner.cleanup()

    result, peak = asyncio.run(main())
    assert peak == 3
    assert all(v == STATS for v in result.values()) and len(result) == 10


def test_a_hanging_worker_times_out_alone() -> None:
    async def main() -> dict:
        never = asyncio.Event()

        async def handler(request: web.Request) -> web.Response:
            await never.wait()  # hangs until the test is over
            return web.json_response({})

        runner, port = await serve(handler)
        try:
            return await collect(pods(2), port, timeout=0.5, concurrency=4)
        finally:
            never.set()
            await runner.cleanup()

    result = asyncio.run(main())
    assert set(result) == {"n0", "n1"}
    assert all(isinstance(v, str) and "Timeout" in v for v in result.values())


def test_bad_answers_are_per_node_errors() -> None:
    async def main() -> dict:
        async def handler(_: web.Request) -> web.Response:
            return web.json_response({"not": "stats"})

        runner, port = await serve(handler)
        try:
            ok = await collect(pods(1), port, timeout=5, concurrency=1)
            refused = await collect(pods(1), free_port(), timeout=5, concurrency=1)
            return {"bad": ok["n0"], "refused": refused["n0"]}
        finally:
            await runner.cleanup()

    result = asyncio.run(main())
    assert result["bad"].startswith("unreadable stats")
    assert "Connect" in result["refused"]


def test_unready_or_addressless_workers_are_not_polled() -> None:
    not_ready = [WorkerPod(name="w", node="n", ip="127.0.0.1", running=True, ready=False),
                 WorkerPod(name="x", node="m", ip=None, running=True, ready=True)]
    assert asyncio.run(collect(not_ready, 1, timeout=1, concurrency=1)) == {}
