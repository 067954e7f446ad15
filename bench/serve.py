"""Serving throughput: embeddings/s of the OpenAI-compatible server at concurrency 1, 8, 32 ÷ offline `encode`.

Same model, same texts (real sentences from ../shared/data), one run. The server runs as `conan serve` in a
subprocess on 127.0.0.1 (uvicorn, dynamic batching); clients are asyncio tasks sending one request at a time
each, `--texts-per-request` texts per request. Offline = Encoder.encode over all texts in batches of 64 in this
process. Prints embeddings/s, p50/p99 request latency and the ratio to offline (goal ≥ 0.9 at 32).

    python bench/serve.py [--texts 2048] [--texts-per-request 1] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from conan.config import default_data_root
from conan.data.corpus import iter_corpus
from conan.encoder import Encoder

from _tiny import tiny_embedding_model


async def load(url: str, texts: list[str], concurrency: int, per_request: int) -> tuple[float, list[float]]:
    """Send all texts with `concurrency` clients; returns (embeddings/s, per-request latencies)."""
    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient):
        while not queue.empty():
            chunk = queue.get_nowait()
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/embeddings", json={"model": "bench", "input": chunk})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(texts) / elapsed, latencies


def main() -> None:
    """Offline encode, then the server at each concurrency; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--model-dir", help="exported embedding model (default: a random tiny one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and the offline encoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = [t for t, _, _ in iter_corpus(default_data_root(), sources=["tatoeba", "stsb_multi_mt"])][:args.texts]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else tiny_embedding_model(texts, Path(tmp) / "model")
        encoder = Encoder(model_dir, batch_size=64)
        encoder.encode(texts[:128])  # warm-up
        start = time.perf_counter()
        encoder.encode(texts)
        offline = len(texts) / (time.perf_counter() - start)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen([sys.executable, "-m", "conan.cli", "serve", "--set", f"model_dir={model_dir}",
                                   "--set", "model_name=bench", "--set", f"port={port}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            asyncio.run(load(url, texts[:256], 8, args.texts_per_request))  # warm-up
            print(f"{len(texts)} texts, {args.texts_per_request} per request, torch threads {args.threads}, "
                  f"server: uvicorn + dynamic batching (max 64 texts)")
            print(f"offline Encoder.encode (batch 64): {offline:8.1f} embeddings/s")
            for c in args.concurrency:
                rate, lat = asyncio.run(load(url, texts, c, args.texts_per_request))
                lat.sort()
                print(f"server concurrency {c:3d}:          {rate:8.1f} embeddings/s   p50 {lat[len(lat) // 2] * 1000:7.1f} ms"
                      f"   p99 {lat[int(len(lat) * 0.99)] * 1000:7.1f} ms   server/offline = {rate / offline:.3f}")
        finally:
            server.terminate()
            server.wait(10)
    print("goal: server/offline ≥ 0.9 at concurrency 32")


if __name__ == "__main__":
    main()
