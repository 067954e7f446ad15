"""Dynamic batching: the texts of concurrent requests share forward passes, behind a bounded queue.

Requests submit their texts and await a future. One worker thread owns the model. It counts the tokens of the
texts that arrived (a request with a text over the limit is refused), keeps every waiting text in a pool, and
runs one forward pass at a time over the oldest waiting texts of one key (Matryoshka dimension), in arrival
order, at most `max_pass_texts` texts and `max_pass_tokens` tokens. `encode` packs a pass's texts into one
unpadded row (Encoder.encode_packed): the projections and MLP, most of a pass's time, cost its texts' own tokens
whatever their mix of lengths (attention alone pads each text, to the longest of its group of like lengths
within the pass), so first come is first served. (Planning passes of like lengths for padded batches left 29 % of
a pass padding at 32 one-text clients: a pass is planned from the ~15 texts waiting.) A request
is answered as soon as its last text is embedded, its `finish` (writing the response) run in the worker thread,
so the event loop only reads and checks requests. A submit that would hold more than `max_queued_texts` texts is
refused at once with QueueFull: under overload clients are told to come back instead of waiting without bound.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np


class QueueFull(Exception):
    """The batcher holds too many texts; retry after `retry_after_s` seconds."""

    def __init__(self, queued: int, retry_after_s: int):
        super().__init__(f"{queued} texts are waiting to be embedded; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class TextTooLong(Exception):
    """Text `index` of a request has `tokens` tokens, over the limit."""

    def __init__(self, index: int, tokens: int):
        super().__init__(f"input[{index}] has {tokens} tokens")
        self.index, self.tokens = index, tokens


@dataclass(eq=False)
class _Request:
    texts: list[str]
    key: Hashable
    finish: Callable[[np.ndarray, list[int]], Any]
    future: asyncio.Future = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    counts: list[int] = field(default_factory=list)
    vectors: np.ndarray | None = None
    remaining: int = 0


@dataclass(eq=False)
class _Text:
    request: _Request
    index: int
    length: int  # tokens the forward pass sees (after truncation)
    seq: int  # arrival order


class DynamicBatcher:
    """Embeds the texts of concurrent submits in shared forward passes of `encode(texts, key) -> vectors`."""

    def __init__(self, count_tokens: Callable[[list[str]], list[int]],
                 encode: Callable[[list[str], Hashable], np.ndarray], max_text_tokens: int, truncate_at: int,
                 max_pass_texts: int = 64, max_pass_tokens: int = 1024, max_wait_ms: float = 0.0,
                 max_queued_texts: int = 2048):
        self.count_tokens, self.encode = count_tokens, encode
        self.max_text_tokens, self.truncate_at = max_text_tokens, truncate_at
        self.max_pass_texts, self.max_pass_tokens = max_pass_texts, max_pass_tokens
        self.max_wait, self.max_queued_texts = max_wait_ms / 1000, max_queued_texts
        self.ready = threading.Condition()  # guards intake, queued_texts, closing
        self.intake: list[_Request] = []
        self.pool: dict[int, _Text] = {}  # by seq: insertion order is arrival order (only the worker touches it)
        self.queued_texts = 0  # submitted and not yet embedded (what the bound applies to)
        self.texts_per_s = 0.0  # recent throughput, for Retry-After
        self.batches = 0  # forward passes run (for /metrics and tests)
        self.closing = False
        self.thread: threading.Thread | None = None
        self._seq = 0

    def start(self) -> None:
        """Start the worker thread."""
        self.thread = threading.Thread(target=self._work, name="conan-batcher", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        """Embed and answer everything already submitted, then stop the worker thread."""
        with self.ready:
            self.closing = True
            self.ready.notify()
        if self.thread:
            await asyncio.to_thread(self.thread.join)

    async def submit(self, texts: list[str], key: Hashable, finish: Callable[[np.ndarray, list[int]], Any]) -> Any:
        """finish(vectors of texts in order, their token counts), run in the worker once all are embedded.
        Raises QueueFull at once when the batcher is full, TextTooLong for a text over max_text_tokens."""
        loop = asyncio.get_running_loop()
        request = _Request(texts, key, finish, loop.create_future(), loop)
        with self.ready:
            if self.closing or self.thread is None:
                raise RuntimeError("the batcher is not running")
            if self.queued_texts + len(texts) > self.max_queued_texts:
                raise QueueFull(self.queued_texts, self.retry_after_s())
            self.queued_texts += len(texts)
            self.intake.append(request)
            self.ready.notify()
        return await request.future

    def retry_after_s(self) -> int:
        """Whole seconds the queued texts take at the recent throughput (at least 1)."""
        return max(1, math.ceil(self.queued_texts / self.texts_per_s)) if self.texts_per_s else 1

    def _work(self) -> None:
        while True:
            with self.ready:
                while not self.intake and not self.pool:
                    if self.closing:
                        return
                    self.ready.wait()
                if not self.pool and self.max_wait and not self.closing:  # idle until now: let company arrive
                    deadline = time.monotonic() + self.max_wait
                    while not self.closing and (left := deadline - time.monotonic()) > 0:
                        self.ready.wait(left)
                arrived, self.intake = self.intake, []
            if arrived:
                self._admit(arrived)
            if self.pool:
                self._run_pass(self._next_pass())

    def _admit(self, requests: list[_Request]) -> None:
        """Count the new texts' tokens (one call for all), refuse requests with a text over the limit, pool the rest."""
        try:
            counts = self.count_tokens([t for r in requests for t in r.texts])
        except Exception as err:
            for request in requests:
                self._answer(request, error=err)
            return
        start = 0
        for request in requests:
            request.counts, start = counts[start:start + len(request.texts)], start + len(request.texts)
            over = next((i for i, n in enumerate(request.counts) if n > self.max_text_tokens), None)
            if over is not None:
                self._answer(request, error=TextTooLong(over, request.counts[over]))
                continue
            request.remaining = len(request.texts)
            for i, n in enumerate(request.counts):
                self._seq += 1
                self.pool[self._seq] = _Text(request, i, min(n, self.truncate_at), self._seq)

    def _next_pass(self) -> list[_Text]:
        """The oldest waiting texts of the oldest text's key, in arrival order, within the pass's text and token
        budgets (a text over the token budget alone makes a pass)."""
        key = next(iter(self.pool.values())).request.key
        chosen, tokens = [], 0
        for text in self.pool.values():
            if text.request.key != key:
                continue
            if len(chosen) == self.max_pass_texts or (chosen and tokens + text.length > self.max_pass_tokens):
                break
            chosen.append(text)
            tokens += text.length
        for text in chosen:
            del self.pool[text.seq]
        return chosen

    def _run_pass(self, texts: list[_Text]) -> None:
        start = time.perf_counter()
        try:
            vectors = self.encode([t.request.texts[t.index] for t in texts], texts[0].request.key)
            if len(vectors) != len(texts):
                raise RuntimeError(f"encode returned {len(vectors)} vectors for {len(texts)} texts")
        except Exception as err:  # a failed pass fails its requests, never the batcher
            for request in {id(t.request): t.request for t in texts}.values():
                for seq in [s for s, t in self.pool.items() if t.request is request]:
                    del self.pool[seq]
                self._answer(request, error=err)
            return
        self.batches += 1
        rate = len(texts) / max(time.perf_counter() - start, 1e-6)
        self.texts_per_s = rate if not self.texts_per_s else 0.8 * self.texts_per_s + 0.2 * rate
        for text, vector in zip(texts, vectors):
            request = text.request
            if request.vectors is None:
                request.vectors = np.empty((len(request.texts), len(vector)), dtype=np.float32)
            request.vectors[text.index] = vector
            request.remaining -= 1
            if request.remaining == 0:
                try:
                    self._answer(request, result=request.finish(request.vectors, request.counts))
                except Exception as err:
                    self._answer(request, error=err)

    def _answer(self, request: _Request, result: Any = None, error: BaseException | None = None) -> None:
        """Settle the request's future on its event loop; its texts no longer count as queued."""
        with self.ready:
            self.queued_texts -= len(request.texts)
        try:
            request.loop.call_soon_threadsafe(_settle, request.future, result, error)
        except RuntimeError:  # its loop is closed: nobody waits for the answer
            pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
