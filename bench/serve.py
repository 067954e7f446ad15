"""Serving throughput: texts/s of the OpenAI-compatible server ÷ offline `Encoder.encode`, same model and texts.

Two randomly initialised models share one byte-level BPE trained here on real sentences (nothing downloads):
"realistic", preset small-20m (6 layers × 384 hidden, ~22M parameters, the size of the small sentence encoders
people serve), and "tiny" (2 × 128, a text in well under a millisecond: its ratio measures the HTTP path).
Texts: a seeded sample of Tatoeba and STS-B sentences from the data root. Offline, per model, in this process,
before and after the server runs: Encoder.encode over all texts (sorted by length, packed passes of 64); the
server's forward passes with every text queued at once, packed (Encoder.encode_packed, as the server runs them), in
arrival order and over the texts sorted by length (attention groups of like lengths, which no online arrival order
gives). The baseline is the best of the six, so a ratio is never flattered by a slow baseline. The server is
`conan serve` in a subprocess (uvicorn, dynamic batching, ServeConfig's defaults); the client is another process:
`concurrency` keep-alive connections, each sending one request at a time, 1 or 16 texts per request, float vectors.
The client is raw asyncio HTTP/1.1 with pre-built bodies, because on a 2-core machine a client library's own CPU
time would be measured instead of the server's.

    python bench/serve.py [--texts 1024] [--concurrency 1 8 32] [--threads 1]

Last line: `serve realistic_c32_single=… realistic_c32_batch16=… tiny_c32_single=… p99_ms=…` (ratios to
offline; p99 request latency of realistic at concurrency 32, one text per request). Goals: realistic single
≥ 0.8, batch16 ≥ 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conan.config import ServeConfig, load_config
from conan.serve.batcher import DynamicBatcher

MODELS = {"realistic": "small-20m", "tiny": "tiny"}
ENCODE_64 = "Encoder.encode in packed passes of 64"
REQUEST_HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n")


async def _send_all(port: int, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Send every body over `concurrency` keep-alive connections; (seconds, per-request latencies)."""
    pending, latencies = iter(bodies), []

    async def connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for body in pending:
            start = time.perf_counter()
            writer.write(REQUEST_HEAD % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            latencies.append(time.perf_counter() - start)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def client_load(port: int, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Runs in the client process: _send_all on a fresh event loop."""
    return asyncio.run(_send_all(port, bodies, concurrency))


def request_bodies(texts: list[str], per_request: int) -> list[bytes]:
    """The JSON bodies sending texts per_request at a time."""
    return [json.dumps({"model": "bench", "input": texts[i:i + per_request], "encoding_format": "float"}).encode()
            for i in range(0, len(texts), per_request)]


def build_models(corpus: list[str], out: Path) -> dict[str, Path]:
    """Tokenizer trained on corpus + each preset of MODELS, random init (seed 0), saved under out/<name>."""
    import torch

    from conan.model import ConanConfig, ConanForEmbedding
    from conan.tokenizer import train_tokenizer_from_iterator

    tokenizer = train_tokenizer_from_iterator(corpus, vocab_size=32_000)
    dirs = {}
    for name, preset in MODELS.items():
        dirs[name] = out / name
        tokenizer.save_pretrained(str(dirs[name]))
        torch.manual_seed(0)
        model = ConanForEmbedding(ConanConfig.from_preset(preset, vocab_size=len(tokenizer),
                                                          attention_mode="bidirectional"))
        model.save_pretrained(str(dirs[name]))
    return dirs


def offline_rates(model_dir: Path, texts: list[str], serve: ServeConfig) -> dict[str, float]:
    """Texts/s of offline encoding over texts, after a warm-up: Encoder.encode (sorted by length, packed passes of
    64), and the server's forward passes with every text known at once (one request of all texts to the batcher),
    packed as the server runs them: in arrival order, and over the texts sorted by length."""
    from conan.encoder import Encoder

    encoder = Encoder(model_dir, batch_size=64)
    encoder.encode(texts[:128])
    start = time.perf_counter()
    encoder.encode(texts)
    rates = {ENCODE_64: len(texts) / (time.perf_counter() - start)}

    async def all_at_once(ordered: list[str]) -> None:
        batcher = DynamicBatcher(encoder.token_counts, encoder.encode_packed, encoder.max_length, encoder.max_length,
                                 serve.max_batch_size, serve.forward_tokens, max_queued_texts=len(texts))
        batcher.start()
        await batcher.submit(ordered, None, lambda vectors, counts: vectors)
        await batcher.stop()

    counts = encoder.token_counts(texts)
    by_length = [texts[i] for i in sorted(range(len(texts)), key=counts.__getitem__)]
    for name, ordered in (("Encoder.encode_packed in the server's passes, all texts at once", texts),
                          ("Encoder.encode_packed in the server's passes, texts sorted by length", by_length)):
        start = time.perf_counter()
        asyncio.run(all_at_once(ordered))
        rates[name] = len(texts) / (time.perf_counter() - start)
    return rates


def start_server(model_dir: Path, threads: int, overrides: list[str]) -> tuple[subprocess.Popen, int]:
    """`conan serve` (ServeConfig's defaults, then overrides) on a free loopback port, once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "conan.cli", "serve", "--set", f"model_dir={model_dir}",
                               "--set", "model_name=bench", "--set", f"port={port}",
                               *(arg for o in overrides for arg in ("--set", o))],
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server, port
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not start")


def check_answers(port: int, texts: list[str], model_dir: Path) -> None:
    """The server's vectors are the offline encoder's (a fast wrong answer is no result)."""
    import httpx
    import numpy as np

    from conan.encoder import Encoder

    response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", timeout=60,
                          json={"model": "bench", "input": texts, "encoding_format": "float"})
    served = np.array([d["embedding"] for d in response.json()["data"]])
    assert np.abs(served - Encoder(model_dir).encode(texts)).max() < 1e-4


def main() -> None:
    """Build the models, then per model: offline, the server at each concurrency and request size, offline again."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and the offline encoder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a ServeConfig override for the server (repeatable)")
    args = parser.parse_args()

    import torch

    from conan.config import default_data_root
    from conan.data.corpus import iter_corpus
    from conan.model import ConanConfig, count_parameters

    torch.set_num_threads(args.threads)
    serve = load_config(ServeConfig, None, args.set)  # what the server runs with
    corpus = [t for t, _, _ in iter_corpus(default_data_root(), sources=["tatoeba", "stsb_multi_mt"])]
    random.Random(0).shuffle(corpus)
    texts = corpus[:args.texts]
    ratios, p99 = {}, {}
    client = multiprocessing.get_context("spawn").Pool(1)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(corpus[:60_000], Path(tmp))
        print(f"{len(texts)} texts, torch threads {args.threads}, server: `conan serve` (uvicorn + dynamic batching)")
        for name, model_dir in models.items():
            before = offline_rates(model_dir, texts, serve)
            server, port = start_server(model_dir, args.threads, args.set)
            try:
                check_answers(port, texts[:16], model_dir)
                client.apply(client_load, (port, request_bodies(texts[:256], 1), 8))  # warm-up
                rows = []
                for per_request in (1, 16):
                    bodies = request_bodies(texts, per_request)
                    for c in args.concurrency:
                        elapsed, latencies = client.apply(client_load, (port, bodies, c))
                        latencies.sort()
                        rows.append((per_request, c, len(texts) / elapsed, latencies[len(latencies) // 2],
                                     latencies[int(len(latencies) * 0.99)]))
            finally:
                server.terminate()
                server.wait(30)
            after = offline_rates(model_dir, texts, serve)
            params = count_parameters(ConanConfig.from_pretrained(str(model_dir))) / 1e6
            print(f"{name} ({MODELS[name]}, {params:.1f}M parameters), offline texts/s before / after the server:")
            for way in before:
                print(f"  {way}: {before[way]:.1f} / {after[way]:.1f}")
            offline = max(*before.values(), *after.values())
            plain = max(before[ENCODE_64], after[ENCODE_64])
            for per_request, c, rate, p50, p99_s in rows:
                kind = "single" if per_request == 1 else f"batch{per_request}"
                ratios[f"{name}_c{c}_{kind}"], p99[f"{name}_c{c}_{kind}"] = rate / offline, p99_s * 1000
                print(f"  {per_request:2d} texts/request, concurrency {c:3d}: {rate:8.1f} texts/s"
                      f"   p50 {p50 * 1000:7.1f} ms   p99 {p99_s * 1000:7.1f} ms   server/offline = {rate / offline:.3f}"
                      f"   (÷ encode in packed passes of 64: {rate / plain:.2f})")
    client.close()
    print(f"serve realistic_c32_single={ratios['realistic_c32_single']:.3f} "
          f"realistic_c32_batch16={ratios['realistic_c32_batch16']:.3f} "
          f"tiny_c32_single={ratios['tiny_c32_single']:.3f} p99_ms={p99['realistic_c32_single']:.1f}")


if __name__ == "__main__":
    main()
