"""Micro-batching of image encoding across concurrent requests and tenants.

Image features do not depend on the tenant, so every queued image, whoever sent it, can share one
encoder call. Requests put their preprocessed tensors in a queue; one loop takes up to `max_batch`
images (waiting at most `max_wait_ms` for a batch to fill), encodes them in a single worker thread
and hands each request its rows. A bounded queue turns overload into a fast `Overloaded` error
(503 + Retry-After) instead of a pile-up of slow requests.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch


class Overloaded(RuntimeError):
    def __init__(self, retry_after_s: float):
        super().__init__(f"the encoder queue is full; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    images: torch.Tensor  # [n, 3, H, W]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_ms: float,
                 max_pending_images: int):
        self.encode_fn = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_pending = max_pending_images
        self.pending_images = 0
        self.batches = 0
        self.images = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._seconds_per_image = 0.01  # running estimate, for Retry-After

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:  # first use, or a new event loop (tests)
            if self._task is not None:
                self._task.cancel()
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        return self._queue

    async def encode(self, images: torch.Tensor) -> torch.Tensor:
        """`[n, 3, H, W]` -> `[n, D]` features, batched with whatever else is queued."""
        queue = self._ensure_started()
        n = images.shape[0]
        if self.pending_images + n > self.max_pending:
            raise Overloaded(max(1.0, self.pending_images * self._seconds_per_image))
        self.pending_images += n
        job = _Job(images, asyncio.get_running_loop().create_future())
        await queue.put(job)
        return await job.future

    async def _run(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            jobs = [carry or await queue.get()]
            carry = None
            count = jobs[0].images.shape[0]
            deadline = time.perf_counter() + self.max_wait_s
            while count < self.max_batch:
                timeout = deadline - time.perf_counter()
                try:
                    job = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if count + job.images.shape[0] > self.max_batch:
                    carry = job  # keeps its place at the head of the next batch
                    break
                jobs.append(job)
                count += job.images.shape[0]
            batch = torch.cat([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images
            start = time.perf_counter()
            try:
                feats = await loop.run_in_executor(self._executor, self.encode_fn, batch)
            except Exception as e:  # surface to every waiting request, keep the loop alive
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                self.pending_images -= count
                continue
            elapsed = time.perf_counter() - start
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / max(count, 1)
            self.batches += 1
            self.images += count
            offset = 0
            for j in jobs:
                n = j.images.shape[0]
                if not j.future.done():
                    j.future.set_result(feats[offset : offset + n])
                offset += n
            self.pending_images -= count

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
