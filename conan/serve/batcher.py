"""Dynamic batching: texts of concurrent requests share forward passes.

Requests enqueue their texts and await a future. One background task takes everything queued (what
arrived while the previous batch ran), lets more join for up to `max_wait_ms` (0 = do not wait), stops at
`max_batch_size` texts, groups them by requested Matryoshka dimension and runs the encoder in a worker
thread, so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Pending:
    texts: list[str]
    dim: int | None
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Collects texts from concurrent callers into batches of at most max_batch_size texts."""

    def __init__(self, encode, max_batch_size: int = 64, max_wait_ms: float = 0.0):
        self.encode, self.max_batch_size, self.max_wait = encode, max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0  # forward batches run (for /metrics and tests)

    def start(self) -> None:
        """Start the batching task on the running loop."""
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the batching task."""
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def embed(self, texts: list[str], dim: int | None) -> np.ndarray:
        """Embeddings of texts (in order), computed in a shared batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(texts, dim, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        items = [await self.queue.get()]
        size, deadline = len(items[0].texts), asyncio.get_running_loop().time() + self.max_wait
        while size < self.max_batch_size:
            if self.queue.empty():  # what arrived while the last batch ran is taken at once; then wait briefly
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            items.append(item)
            size += len(item.texts)
        return items

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            by_dim: dict[int | None, list[_Pending]] = {}
            for item in items:
                by_dim.setdefault(item.dim, []).append(item)
            for dim, group in by_dim.items():
                texts = [t for item in group for t in item.texts]
                try:
                    vectors = await asyncio.to_thread(self.encode, texts, dim)
                except Exception as err:  # one bad batch fails its requests, never the batcher
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                self.batches += 1
                start = 0
                for item in group:
                    if not item.future.done():
                        item.future.set_result(vectors[start:start + len(item.texts)])
                    start += len(item.texts)
