"""Micro-batching: concurrent requests that arrive within a few milliseconds of each other
run as one model batch in a dedicated inference thread, so the event loop never blocks."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgclf.serve.config import SERVE_FIELDS


class MicroBatcher:
    """Collect concurrent requests for up to ``wait_ms`` (or ``max_batch`` images), run them
    as one batch in a dedicated inference thread, hand each caller its rows (``fn``'s result
    sliced: an array or a list). ``thread_of``: another batcher whose inference thread this one
    uses too, so that all model work of the server runs in one thread, one batch at a time."""

    def __init__(self, fn, *, max_batch: int = SERVE_FIELDS["max_batch"].default, wait_ms: float = SERVE_FIELDS["batch_wait_ms"].default,
                 thread_of: "MicroBatcher | None" = None):
        self.fn = fn
        self.thread_of = thread_of
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.executor: ThreadPoolExecutor | None = None  # made on first use, again after close()
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.loop = None
        self.requests = 0  # counters for /v1/model's stats
        self.batches = 0
        self.images = 0

    def _ensure_started(self):
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((batch, fut))
        return await fut

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0][0])
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                items.append(item)
                n += len(item[0])
            live = [(b, f) for b, f in items if not f.cancelled()]
            if not live:
                continue
            batch = np.concatenate([b for b, _ in live]) if len(live) > 1 else live[0][0]
            self.requests += len(live)
            self.batches += 1
            self.images += len(batch)
            try:
                out = await loop.run_in_executor(self._pool(), self.fn, batch)
            except Exception as e:  # noqa: BLE001 - handed to every waiter
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            k = 0
            for b, f in live:
                if not f.done():
                    f.set_result(out[k:k + len(b)])
                k += len(b)

    def _pool(self) -> ThreadPoolExecutor:
        if self.thread_of is not None:
            return self.thread_of._pool()
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-infer")
        return self.executor

    def close(self):
        """Stop the inference thread (the app's shutdown). Not final: an app can be started
        again (a second lifespan, e.g. one test client after another), and the next batch
        makes a new thread."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
