"""Admission: whether a classify request is admitted, decided from its headers before its body is read.

A request is shed (503 + Retry-After) when the wait it has already had before the app plus the
wait expected in the app exceeds the deadline. The batcher and the decode pool refuse what this
estimate let through too optimistically (service/batcher.py).
"""

from __future__ import annotations

import time
from collections import deque

from service.batcher import Overloaded


class AdmissionGate:
    """Sheds a request when the wait it has had plus the time it will spend in the app exceeds the deadline.

    Under overload most of the queue is in the kernel (accept queue, unread sockets), before any
    Python code sees a request; the server measures that part per request (`waited_s`). The wait
    in the app is the upper quartile among the last 64 classify requests to finish in the last 10 s,
    each its time in the app less its own work (its body's upload, its decode; RequestClock): it
    grows when requests wait (congestion), while large legal requests (a minute of decoding) and
    slow uploads do not make the gate shed the small ones beside them. Upper, not lower or median: a request the
    gate admits too optimistically is refused in the encoder queue anyway (`MicroBatcher._late`),
    after its body was read and its images decoded; at 120% of capacity the lower quartile (of 16)
    left 13% of requests to that costlier refusal and served 67% of capacity, the median (of 64)
    8.5% and 88%, the upper quartile 4.7% and 87%.
    """

    RECENT = 64
    RECENT_S = 10.0  # older samples are forgotten: a past burst does not shed the requests after it

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.in_flight = 0
        self.shed = 0
        self.waited_s = 0.0  # running mean of the wait before the app, for /info
        self._recent: deque[tuple[float, float]] = deque(maxlen=self.RECENT)  # (when, wait in the app)

    @property
    def in_app_s(self) -> float:
        horizon = time.monotonic() - self.RECENT_S
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        recent = sorted(wait for _, wait in self._recent)
        return recent[3 * len(recent) // 4] if recent else 0.0  # the upper quartile

    def expected_wait_s(self, waited_s: float = 0.0) -> float:
        return waited_s + (self.in_app_s if self.in_flight else 0.0)  # nothing in flight: nothing ahead

    def admit(self, waited_s: float = 0.0) -> None:
        """Overloaded (503) when the expected wait is over the deadline."""
        self.waited_s = 0.95 * self.waited_s + 0.05 * waited_s
        wait = self.expected_wait_s(waited_s)
        if wait > self.deadline_s:
            self.shed += 1
            raise Overloaded(wait - self.deadline_s, f"expected queue wait {wait:.1f} s exceeds the "
                                                      f"{self.deadline_s:g} s deadline")
        self.in_flight += 1

    def done(self, waited_in_app_s: float) -> None:
        """An admitted request finished (answered or refused) after waiting `waited_in_app_s` in the
        app: its time there less its own work (its body's upload, its decode), so a large request or
        a slow uploader does not make the gate shed the small requests beside it."""
        self.in_flight -= 1
        self._recent.append((time.monotonic(), waited_in_app_s))
