"""Dynamic batching for the server: concurrent requests share one forward pass.

Requests put (image, future) on a queue; one worker task takes the first item, then keeps
collecting until it has `max_batch` images or `max_wait` seconds have passed since the first,
and runs the batch in a worker thread, so the event loop never blocks on inference. Under
light load a request waits at most `max_wait`; under heavy load batches fill at once and
throughput grows with load.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 2.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        # One inference thread: torch already uses every core inside a forward pass.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmnist-infer")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """(n, 28, 28) uint8 -> (n, 10) probabilities, batched with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self.max_batch == 1 or self.queue is None:
            return await loop.run_in_executor(self.executor, self.infer, images)
        futs = []
        for img in images:
            fut = loop.create_future()
            await self.queue.put((img, fut))
            futs.append(fut)
        return np.stack(await asyncio.gather(*futs))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    # Past the deadline: still take what is already queued, without waiting.
                    try:
                        batch.append(self.queue.get_nowait())
                        continue
                    except asyncio.QueueEmpty:
                        break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            imgs = np.stack([b[0] for b in batch])
            try:
                probs = await loop.run_in_executor(self.executor, self.infer, imgs)
            except Exception as e:  # hand the failure to every waiting request, keep serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, fut), p in zip(batch, probs):
                if not fut.done():
                    fut.set_result(p)
