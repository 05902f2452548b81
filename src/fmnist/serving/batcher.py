"""Dynamic batching for the server: concurrent requests share one forward pass.

Requests put (image, future) on a queue; one worker task takes the first item, then keeps
collecting until it has `max_batch` images or `max_wait` seconds have passed since the first,
and runs the batch in a worker thread, so the event loop never blocks on inference. Under
light load a request waits at most `max_wait`; under heavy load batches fill at once and
throughput grows with load. Given `incoming` (how many requests are on their way: the server
passes its running conversions), the worker waits only while some are: a lone request runs at
once instead of waiting `max_wait` for company that is not coming.

Safety net: an unexpected error in the worker fails the batch it was building and the worker
goes on; a result with the wrong number of rows fails its batch instead of leaving requests
waiting; `submit` gives up after `timeout_s`; and if the worker task ends anyway, `alive`
turns false, every waiting and later request fails at once with BatcherUnavailable (/healthz
reports it), and the error is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class BatcherUnavailable(RuntimeError):
    """The batcher cannot answer: its worker is not running, or the answer took too long."""


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 2.0,
                 timeout_s: float = 30.0, incoming: Callable[[], int] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.timeout_s = timeout_s
        self.incoming = incoming
        # One inference thread: torch already uses every core inside a forward pass.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmnist-infer")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0
        self.failures = 0      # batches that failed (each of their requests got the error)
        self.death: str | None = None  # why the worker stopped, once it has
        self._stopping = False

    @property
    def alive(self) -> bool:
        if self.max_batch == 1:  # no worker task: requests go straight to the inference thread
            return self.death is None
        return self.task is not None and not self.task.done()

    def state(self) -> dict:
        return {"alive": self.alive, "batches": self.batches, "items": self.items, "failures": self.failures,
                "queued": self.queue.qsize() if self.queue else 0, "error": self.death}

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.death = None
        if self.max_batch > 1:
            self.task = asyncio.create_task(self._run(), name="fmnist-batcher")
            self.task.add_done_callback(self._on_worker_exit)

    async def stop(self) -> None:
        self._stopping = True
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False)

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        """Fail loudly: log, remember why, and fail everything still queued."""
        if self._stopping:
            self.death = "the server is shutting down"
        elif task.cancelled():
            self.death = "the batching worker was cancelled"
        else:
            exc = task.exception()
            self.death = (f"the batching worker died: {type(exc).__name__}: {exc}" if exc
                          else "the batching worker exited")
        if not self._stopping:
            log.error("%s; inference requests now fail with 503 until the server is restarted", self.death,
                      exc_info=None if task.cancelled() else task.exception())
        while self.queue is not None and not self.queue.empty():
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(BatcherUnavailable(self.death))

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """(n, 28, 28) uint8 -> (n, 10) probabilities, batched with whatever else is waiting.
        Raises BatcherUnavailable when the worker is gone or no answer comes in `timeout_s`."""
        loop = asyncio.get_running_loop()
        if self.max_batch == 1 or self.queue is None:
            work = loop.run_in_executor(self.executor, self.infer, images)
            return await self._bounded(work, len(images))
        if not self.alive:
            raise BatcherUnavailable(self.death or "the batching worker is not running")
        futs = []
        for img in images:
            fut = loop.create_future()
            self.queue.put_nowait((img, fut))  # unbounded queue: never blocks
            futs.append(fut)
        try:
            return np.stack(await self._bounded(asyncio.gather(*futs), len(images)))
        finally:
            for fut in futs:  # timed out or cancelled: the worker skips what is done
                fut.cancel()

    async def _bounded(self, work, n: int):
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except TimeoutError:
            raise BatcherUnavailable(f"no result for {n} image(s) within {self.timeout_s:g} s") from None

    async def _collect(self) -> list:
        first = await self.queue.get()
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0 or (self.incoming is not None and self.incoming() == 0):
                # Past the deadline, or nobody else on the way: take what is already queued, without waiting.
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), timeout))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = []
            try:
                batch = [b for b in await self._collect() if not b[1].done()]  # drop requests that left
                if not batch:
                    continue
                imgs = np.stack([b[0] for b in batch])
                probs = await loop.run_in_executor(self.executor, self.infer, imgs)
                if len(probs) != len(batch):
                    raise RuntimeError(f"the model returned {len(probs)} rows for a batch of {len(batch)} images")
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except Exception as e:  # hand the failure to every waiting request, keep serving
                log.exception("inference failed for a batch of %d", len(batch))
                self.failures += 1
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, fut), p in zip(batch, probs):
                if not fut.done():
                    fut.set_result(p)
