"""Fetch ``GET /stats`` from every ready worker, concurrently but bounded.

One slow or dead worker must not hold up the others or the timer: each request has its own
timeout, at most ``concurrency`` run at once, and a failure is reported as text for that node
(it becomes part of a condition) instead of an exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import pydantic

from datahoard.stats import WorkerStats

from .status import WorkerPod


async def fetch_one(session: aiohttp.ClientSession, url: str) -> WorkerStats | str:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status} from {url}"
            return WorkerStats.model_validate(await resp.json(content_type=None))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return f"{type(exc).__name__} from {url}: {exc}".rstrip(": ")
    except (pydantic.ValidationError, ValueError) as exc:
        return f"unreadable stats from {url}: {str(exc).splitlines()[0]}"


async def collect(pods: Iterable[WorkerPod], port: int, timeout: float, concurrency: int
                  ) -> dict[str, WorkerStats | str]:
    """Stats per node for the ready workers that have an address."""
    targets = [p for p in pods if p.ready and p.ip]
    if not targets:
        return {}
    limit = asyncio.Semaphore(concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async with aiohttp.ClientSession(timeout=client_timeout) as session:

        async def one(pod: WorkerPod) -> tuple[str, WorkerStats | str]:
            host = f"[{pod.ip}]" if ":" in (pod.ip or "") else pod.ip
            async with limit:
                return pod.node, await fetch_one(session, f"http://{host}:{port}/stats")

        return dict(await asyncio.gather(*(one(p) for p in targets)))
