"""Fair sharing of the decode pool and the encoder between requests and tenants, and refusal of late work.

Image features do not depend on the tenant, so queued images, whoever sent them, share encoder
calls. Fairness: work is queued per tenant and served round-robin between tenants (a tenant's
requests in order), one image at a time, both when decode workers pick their next image and when a
batch is formed, so a 64-image request cannot hold back another tenant's single image: that image
waits for at most the images already in progress, not for the whole request. Heavy decodes (many
pixels) may occupy all decode workers but one, at a lower OS priority, so a light image always
finds a worker and the CPU, whichever request of its tenant it belongs to.

Late work: the admission gate (service/admission.py) decides from the headers; what it admits too
optimistically is refused with `Overloaded` (503 + Retry-After) when its decode or its first batch
would start after the request has already waited past the deadline (RequestClock); the encoder
queue also refuses work beyond a count or its own expected wait.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import math
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

import torch

from service import metrics

T = TypeVar("T")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def name_os_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (Linux: /proc/PID/task/TID/comm, top -H, py-spy), so a
    thread's CPU time can be told apart from outside: the benchmark itemises CPU per request by it."""
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:
        prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # 15: PR_SET_NAME


BACKGROUND_NICE = 10  # the OS priority of work that must yield the CPU to the request path


def lower_os_priority(nice: int = BACKGROUND_NICE) -> None:
    """Run the calling thread at a lower OS priority (Linux: a thread's own nice value; raising it
    needs no privilege, and it cannot be lowered again without one)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        pass


def background_thread(name: str) -> None:
    """Initializer of a thread that does background work: named, at a lower OS priority."""
    name_os_thread(name)
    lower_os_priority()


class RequestClock:
    """How long a request has waited for others: its age since its bytes arrived (the kernel's
    record, stamped by service/connections.py) less its own work: the time its body took to arrive
    (the client's upload) and the time the decode pool spent on its own images. A large request
    decoding for seconds, or one uploaded over a slow link, is not waiting; a small one whose image
    sat behind other tenants' work is."""

    def __init__(self, arrived: float):
        self.arrived = arrived  # time.monotonic() when the request's bytes arrived
        self.own_work_s = 0.0  # its body's arrival and its decode time, added as they happen
        self.refused = False  # refused as late by the decode pool (counted once)

    def waited_s(self, now: float) -> float:
        return max(0.0, now - self.arrived - self.own_work_s)


REQUEST_CLOCK: contextvars.ContextVar[RequestClock | None] = contextvars.ContextVar("request_clock", default=None)


class Overloaded(RuntimeError):
    def __init__(self, retry_after_s: float, why: str = "the encoder queue is full"):
        super().__init__(f"{why}; retry in {max(1.0, retry_after_s):.0f} s")
        self.retry_after_s = max(1.0, retry_after_s)


class FairQueue(Generic[T]):
    """Round-robin between keys (tenants); within a key, FIFO between its groups (requests) and
    within a group. `pop(allowed)` looks at the head of each group, so a worker that may not take a
    tenant's first request's head (a light-only decode worker, a heavy image) takes the next
    request's: a tenant's small request does not wait behind its own large one. Between a key's
    groups FIFO, not round-robin: sharing among a burst of one tenant's requests would finish every
    one of them late. Not thread-safe by itself."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, OrderedDict[Hashable, deque[T]]] = OrderedDict()
        self._size = 0

    def put(self, key: str, item: T, group: Hashable = None) -> None:
        self._queues.setdefault(key, OrderedDict()).setdefault(group, deque()).append(item)
        self._size += 1

    def pop(self, allowed: Callable[[T], bool] = lambda item: True) -> T | None:
        """The head item of the first group, of the first key (in turn), whose head is allowed; that
        key goes to the back."""
        for key, groups in self._queues.items():
            for group, queue in groups.items():
                if allowed(queue[0]):
                    self._queues.move_to_end(key)
                    return self._remove_head(key, group)
        return None

    def turn(self) -> tuple[str, Hashable, T] | None:
        """The next key in turn, its first group and that group's head item, left in place; the key
        goes to the back."""
        if not self._queues:
            return None
        key, groups = next(iter(self._queues.items()))
        group, queue = next(iter(groups.items()))
        self._queues.move_to_end(key)
        return key, group, queue[0]

    def discard_head(self, key: str, group: Hashable = None) -> None:
        self._remove_head(key, group)

    def _remove_head(self, key: str, group: Hashable) -> T:
        groups = self._queues[key]
        item = groups[group].popleft()
        if not groups[group]:
            del groups[group]
            if not groups:
                del self._queues[key]
        self._size -= 1
        return item

    def __len__(self) -> int:
        return self._size

    @property
    def keys(self) -> int:
        """Keys with queued items."""
        return len(self._queues)


@dataclass
class _Task:
    fn: Callable[[], Any]
    heavy: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    clock: RequestClock | None = None  # the request's, to which the worker adds the time it ran fn


class FairPool:
    """Worker threads that take tasks round-robin between keys. With two or more workers, the last one
    takes light tasks only and the others (which may take heavy ones) run at a lower OS priority, so
    a large decode yields the CPU to the event loop and to small requests."""

    def __init__(self, workers: int, name: str = "decode", deadline_s: float | None = None):
        self.workers = workers
        self.deadline_s = deadline_s  # a task whose request has waited longer is refused, not run
        self.shed_late = 0  # requests so refused
        self._queue: FairQueue[_Task] = FairQueue()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(workers == 1 or i < workers - 1,),
                                          name=f"pf-{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def run(self, key: str, fn: Callable[[], T], heavy: bool = False) -> T:
        loop = asyncio.get_running_loop()
        task = _Task(fn, heavy, loop, loop.create_future(), REQUEST_CLOCK.get())
        with self._cond:
            self._queue.put(key, task, group=task.clock)  # a request is known by its clock
            self._cond.notify_all()
        return await task.future

    def _take(self, heavy_ok: bool) -> _Task | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                task = self._queue.pop(lambda t: heavy_ok or not t.heavy)
                if task is None:
                    self._cond.wait()
                elif not self._late(task):
                    return task

    def _late(self, task: _Task) -> bool:
        """Refuse (503), before its decode, a task whose request has already waited past the deadline:
        under a burst, decoding it would be work thrown away when the batcher refuses it as late."""
        clock = task.clock
        if self.deadline_s is None or clock is None:
            return False
        waited = clock.waited_s(time.monotonic())
        if waited <= self.deadline_s:
            return False
        if not clock.refused:
            clock.refused = True
            self.shed_late += 1
        error = Overloaded(waited - self.deadline_s, f"waited {waited:.1f} s for the decoders: it would finish "
                                                      f"past the {self.deadline_s:g} s deadline")
        task.loop.call_soon_threadsafe(_settle, task.future, None, error)
        return True

    def _work(self, heavy_ok: bool) -> None:
        name_os_thread(threading.current_thread().name)
        if heavy_ok and self.workers > 1:
            lower_os_priority()
        while (task := self._take(heavy_ok)) is not None:
            start = time.perf_counter()
            try:
                result, error = task.fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                result, error = None, e
            if task.clock is not None:
                task.clock.own_work_s += time.perf_counter() - start  # one float add: atomic under the GIL
            task.loop.call_soon_threadsafe(_settle, task.future, result, error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class _Job:
    images: torch.Tensor  # [n, 3, H, W]
    future: asyncio.Future
    queued_at: float = 0.0  # perf_counter when queued
    clock: RequestClock | None = None  # the request's wait so far, for shedding in the queue
    taken: int = 0  # rows handed to a batch
    parts: list[torch.Tensor] = field(default_factory=list)  # feature rows back, in order

    @property
    def done(self) -> int:
        return sum(p.shape[0] for p in self.parts)


class MicroBatcher:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_ms: float,
                 max_pending_images: int, deadline_s: float | None = None):
        self.encode_fn = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_pending = max_pending_images
        self.deadline_s = deadline_s
        self.pending_images = 0
        self.shed_in_queue = 0  # requests refused at batch formation: they would finish past the deadline
        self.batches = 0
        self.images = 0
        self._queue: FairQueue[_Job] = FairQueue()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pf-encoder",
                                            initializer=name_os_thread, initargs=("pf-encoder",))
        self._seconds_per_image = 0.01  # running estimate, for Retry-After and admission

    def _ensure_started(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._wakeup is None or self._loop is not loop:  # first use, or a new event loop (tests)
            if self._task is not None:
                self._task.cancel()
            self._loop, self._wakeup = loop, asyncio.Event()
            self._queue, self._queued_rows = FairQueue(), 0
            self._task = loop.create_task(self._run())
        return self._wakeup

    def expected_wait_s(self, extra_images: int = 0) -> float:
        return (self.pending_images + extra_images) * self._seconds_per_image

    async def encode(self, images: torch.Tensor, key: str = "", clock: RequestClock | None = None) -> torch.Tensor:
        """`[n, 3, H, W]` -> `[n, D]` features, batched with whatever else is queued (fairly by `key`).
        With a `clock`, a request that would finish past the deadline is refused (Overloaded) when
        its first row would join a batch: see `_late`."""
        wakeup = self._ensure_started()
        n = images.shape[0]
        if self.pending_images + n > self.max_pending:
            raise Overloaded(self.expected_wait_s())
        wait = self.expected_wait_s()  # the images ahead; a request's own encoding is not a wait
        if self.deadline_s is not None and wait > self.deadline_s:
            raise Overloaded(wait - self.deadline_s, f"expected encoder wait {wait:.1f} s exceeds the "
                                                     f"{self.deadline_s:g} s deadline")
        self.pending_images += n
        metrics.queue_depth.set(self.pending_images)
        job = _Job(images, asyncio.get_running_loop().create_future(), time.perf_counter(), clock)
        self._queue.put(key, job, group=clock)
        self._queued_rows += n
        wakeup.set()
        return await job.future

    def _take_batch(self) -> list[tuple[_Job, int, int]]:
        """Up to max_batch rows, one at a time round-robin between keys; (job, start, stop) slices."""
        slices: dict[int, list] = {}
        count = 0
        now = time.monotonic()
        while count < self.max_batch and (turn := self._queue.turn()) is not None:
            key, group, job = turn
            n = job.images.shape[0]
            if job.taken == 0 and self._late(job, now):
                self._queue.discard_head(key, group)
                continue
            if job.taken < n:  # a failed job's rows are skipped
                piece = slices.setdefault(id(job), [job, job.taken, job.taken])
                job.taken += 1
                piece[2] = job.taken
                count += 1
            if job.taken >= n:
                self._queue.discard_head(key, group)
        self._queued_rows -= count
        return [tuple(piece) for piece in slices.values()]

    def _late(self, job: _Job, now: float) -> bool:
        """Refuse (503) a job about to start whose wait so far plus the batches it will span (its rows
        are taken one a turn between the tenants queued) would end past the deadline plus one batch:
        the admission gate's estimate can be short under saturation, and this bounds what an admitted
        request waits. Its decoding is lost; nothing of it was encoded."""
        if self.deadline_s is None or job.clock is None:
            return False
        batch_s = self.max_batch * self._seconds_per_image
        share = max(1, self.max_batch // max(1, self._queue.keys))
        spans = math.ceil(job.images.shape[0] / share)
        waited = job.clock.waited_s(now)
        if waited + (spans - 1) * batch_s <= self.deadline_s:
            return False
        self.shed_in_queue += 1
        if not job.future.done():
            job.future.set_exception(Overloaded(waited - self.deadline_s + spans * batch_s,
                                                f"waited {waited:.1f} s in the queue: it would finish past the "
                                                f"{self.deadline_s:g} s deadline"))
        self._drop(job)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        while True:
            while not self._queued_rows:
                wakeup.clear()
                await wakeup.wait()
            deadline = time.perf_counter() + self.max_wait_s
            while self._queued_rows < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                wakeup.clear()
                try:
                    async with asyncio.timeout(left):  # no task per wait (wait_for made one)
                        await wakeup.wait()
                except TimeoutError:
                    break
            slices = self._take_batch()
            if not slices:  # every job in turn was refused as late
                continue
            count = sum(stop - start for _, start, stop in slices)
            parts = [job.images[start:stop] for job, start, stop in slices]
            batch = parts[0] if len(parts) == 1 else torch.cat(parts)
            start_time = time.perf_counter()
            for job, _, _ in slices:
                metrics.queue_wait.observe(start_time - job.queued_at)
            metrics.batch_size.observe(count)
            try:
                feats, cpu_seconds = await loop.run_in_executor(self._executor, self._encode, batch)
            except Exception as e:  # surface to every request in the batch, keep the loop alive
                self._fail(slices, e)
                continue
            elapsed = time.perf_counter() - start_time
            metrics.encoder_seconds.observe(elapsed)
            metrics.encoder_cpu.inc(cpu_seconds)
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / max(count, 1)
            self.batches += 1
            self.images += count
            offset = 0
            for job, start, stop in slices:
                job.parts.append(feats[offset : offset + stop - start])
                offset += stop - start
                if job.done == job.images.shape[0]:
                    self.pending_images -= job.images.shape[0]
                    metrics.queue_depth.set(self.pending_images)
                    if not job.future.done():
                        job.future.set_result(torch.cat(job.parts) if len(job.parts) > 1 else job.parts[0])

    def _encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The features and the CPU seconds this thread spent on them (in the encoder thread)."""
        cpu = time.thread_time()
        return self.encode_fn(batch), time.thread_time() - cpu

    def _fail(self, slices: list, error: Exception) -> None:
        for job, _, _ in slices:
            if not job.future.done():
                job.future.set_exception(error)
                self._drop(job)

    def _drop(self, job: _Job) -> None:
        """A failed job's rows still queued are removed and its images leave the pending count."""
        self.pending_images -= job.images.shape[0]
        metrics.queue_depth.set(self.pending_images)
        remaining = job.images.shape[0] - job.taken
        job.taken = job.images.shape[0]
        self._queued_rows -= remaining

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
