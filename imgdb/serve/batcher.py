"""A micro-batcher: concurrent requests for a network forward share one batched forward.

One worker thread owns the network. A request waits only while the network is busy, so a lone
client pays no added latency; when requests arrive together (several clients), everything queued
for the same network when it becomes free runs as one batch. So that steady concurrent clients
form full batches instead of alternating small ones (1, 3, 1, 3 for four clients), the worker
lingers briefly when fewer requests wait than the recent batches held, or while requests it was
told about (`announce`: still being decoded) are on their way: at most `linger` seconds and at
most half the time the last forward took.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Sequence


class MicroBatcher:
    """`submit(key, item)` -> Future of `run(key, [items])[i]`; items of one key are batched."""

    def __init__(self, run: Callable[[Hashable, Sequence[Any]], Sequence[Any]],
                 max_batch: int = 8, linger: float = 0.05) -> None:
        self._run = run
        self.max_batch = max(1, int(max_batch))
        self.linger = float(linger)
        self._queue: deque[tuple[Hashable, Any, Future]] = deque()
        self._cond = threading.Condition()
        self._announced = 0
        self._closed = False
        self._seconds = 0.0  # how long the last batch took
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the recent batches
        self._thread = threading.Thread(target=self._loop, name="imgdb-forward", daemon=True)
        self._thread.start()

    @contextmanager
    def announce(self) -> Iterator[None]:
        """Around the decoding of a request that will be submitted: the worker may wait for it."""
        with self._cond:
            self._announced += 1
        try:
            yield
        finally:
            with self._cond:
                self._announced -= 1
                self._cond.notify_all()

    def submit(self, key: Hashable, item: Any) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the forward worker has stopped")
            self._queue.append((key, item, fut))
            self._cond.notify_all()
        return fut

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _take(self) -> list[tuple[Hashable, Any, Future]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            expected = min(self.max_batch, max(list(self.batches)[-3:], default=1))
            deadline = time.monotonic() + min(self.linger, 0.5 * self._seconds)
            while ((self._announced > 0 or len(self._queue) < expected)
                   and len(self._queue) < self.max_batch and not self._closed):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = self._queue[0][0]
            taken, kept = [], deque()
            while self._queue:
                entry = self._queue.popleft()
                (taken if entry[0] == key and len(taken) < self.max_batch else kept).append(entry)
            self._queue = kept
            return taken

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            live = [t for t in taken if t[2].set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches.append(len(live))
            started = time.monotonic()
            try:
                results = self._run(live[0][0], [item for _, item, _ in live])
            except BaseException as exc:  # every waiter learns why
                for _, _, fut in live:
                    fut.set_exception(exc)
                continue
            finally:
                self._seconds = time.monotonic() - started
            for (_, _, fut), result in zip(live, results):
                fut.set_result(result)
