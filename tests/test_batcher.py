"""DynamicBatcher: results reach the right request, and no failure leaves a request waiting.
Every await is bounded, so a regression fails in seconds instead of hanging the suite."""

import asyncio
import threading

import numpy as np
import pytest

from fmnist.serving.batcher import BatcherUnavailable, DynamicBatcher


def one_hot_of_first_pixel(x: np.ndarray) -> np.ndarray:
    """(n, 28, 28) -> (n, 10): a stand-in model whose answer says which image it saw."""
    return np.eye(10)[x.reshape(len(x), -1)[:, 0] % 10]


def image(v: int, size: int = 28) -> np.ndarray:
    return np.full((1, size, size), v, np.uint8)


def run(coro_fn, *args, **kw):
    async def main():
        b = DynamicBatcher(*args, **kw)
        await b.start()
        try:
            return await asyncio.wait_for(coro_fn(b), 5)
        finally:
            await b.stop()
    return asyncio.run(main())


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    async def go(b):
        out = await asyncio.gather(*(b.submit(image(v)) for v in range(10)))
        return out, b.batches, b.items

    out, batches, items = run(go, one_hot_of_first_pixel, max_batch=32, max_wait_ms=20)
    assert [int(o[0].argmax()) for o in out] == list(range(10))
    assert items == 10 and batches < 10


@pytest.mark.parametrize("on_the_way", [0, 1])
def test_a_lone_request_waits_only_when_others_are_on_their_way(on_the_way):
    """With `incoming` (the server's running conversions) a request runs at once when nothing
    else is coming, and waits up to max_wait (here 300 ms) for company when something is."""
    async def go(b):
        loop = asyncio.get_running_loop()
        t = loop.time()
        await b.submit(image(1))
        return loop.time() - t

    took = run(go, one_hot_of_first_pixel, max_batch=32, max_wait_ms=300, incoming=lambda: on_the_way)
    assert (took < 0.1) if on_the_way == 0 else (0.25 < took < 1.0), took


def test_error_outside_inference_fails_the_batch_and_worker_goes_on():
    """Images of different shapes cannot be stacked: np.stack raised outside the worker's try,
    the worker died, and every later request hung."""
    async def go(b):
        bad = await asyncio.gather(b.submit(image(1)), b.submit(image(2, size=27)), return_exceptions=True)
        good = await b.submit(image(3))
        return bad, good, b.alive, b.failures

    bad, good, alive, failures = run(go, one_hot_of_first_pixel, max_batch=8, max_wait_ms=20)
    assert all(isinstance(e, ValueError) for e in bad)
    assert int(good[0].argmax()) == 3 and alive and failures == 1


def test_short_result_fails_the_batch_instead_of_hanging():
    async def go(b):
        with pytest.raises(RuntimeError, match="returned 1 rows for a batch of 2"):
            await asyncio.gather(b.submit(image(1)), b.submit(image(2)))

    run(go, lambda x: one_hot_of_first_pixel(x)[:-1], max_batch=8, max_wait_ms=20)


def test_submit_gives_up_after_its_timeout():
    for max_batch in (1, 8):  # both paths: straight to the thread, and through the worker
        release = threading.Event()

        def stuck(x):
            release.wait(5)
            return one_hot_of_first_pixel(x)

        async def go(b):
            loop = asyncio.get_running_loop()
            t = loop.time()
            try:
                with pytest.raises(BatcherUnavailable, match="within 0.2 s"):
                    await b.submit(image(1))
                return loop.time() - t
            finally:
                release.set()

        assert run(go, stuck, max_batch=max_batch, max_wait_ms=1, timeout_s=0.2) < 1.5


def test_dead_worker_fails_requests_at_once_and_reports_it():
    async def go(b):
        b.task.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        with pytest.raises(BatcherUnavailable, match="cancelled"):
            await b.submit(image(1))
        return b.state()

    state = run(go, one_hot_of_first_pixel, max_batch=8)
    assert state["alive"] is False and "cancelled" in state["error"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_wait_ms must be >= 0"):
        DynamicBatcher(one_hot_of_first_pixel, max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(one_hot_of_first_pixel, max_batch=0)
