"""Mining at the issue's scale on this machine: 1M passages × 100k queries at dim 256, through the sharded search.

Passage embeddings are synthetic: seeded unit vectors written as the float32 .npy shards that `embed_passages`
writes (`shard_bytes`, 256 MB: 262,144 passages at dim 256). Each query is its positive passage plus noise (cosine 0.8 to it), so the positives
rank first and the false-negative guard applies as on real data. `mine_candidates` then does what a supervised
run's mining does after embedding: it loads one shard file at a time, builds that shard's faiss index (IVF, as
`index: auto` picks above 100k passages; written beside the shard for later query chunks), searches the queries in batches, merges each query's running top-k by
score, applies the guard (and the deeper re-search for queries left short), and `write_mined` writes the parquet.
Seconds and peak RSS (this process's ru_maxrss, shard generation included) cover that search.

Embedding is measured apart (`--embed-texts`, default 20,000): passages of 40 real XQuAD words through
`embed_passages` with the tiny model in this process, reported as passages/s and extrapolated to --passages.

    python bench/mining.py [--passages 1000000] [--queries 100000] [--dim 256] [--embed-texts 20000]

Last line: `mining passages=<…> queries=<…> peak_rss_gb=<…> seconds=<…>` (goal: peak RSS ≤ 4 GB).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan.config import default_data_root
from conan.data.mining import MiningConfig, embed_passages, mine_candidates, write_mined
from conan.data.passages import write_passage_lookup
from conan.data.synthetic import vocabulary

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import tiny_embedding_model  # noqa: E402


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm."""
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_shards(out: Path, passages: int, dim: int, shard_rows: int) -> list[Path]:
    """Seeded random unit vectors as embedding shards, one shard in memory at a time."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, passages, shard_rows)):
        rows = np.random.default_rng(i).standard_normal((min(shard_rows, passages - start), dim), dtype=np.float32)
        paths.append(out / f"emb-{i:06d}.npy")
        np.save(paths[-1], unit(rows))
    return paths


def planted_queries(shards: list[np.ndarray], queries: int, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """One query per sampled passage: the passage plus orthogonal-ish noise at cosine 0.8; returns (queries, positives)."""
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0] + [len(s) for s in shards])
    rows = np.sort(rng.choice(int(starts[-1]), size=queries, replace=False))
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    positives = np.concatenate([shards[s][rows[shard_of == s] - starts[s]] for s in range(len(shards))])
    noise = unit(rng.standard_normal(positives.shape, dtype=np.float32))
    return unit(positives + 0.75 * noise).astype(np.float32), [{int(r)} for r in rows]


def embedding_rate(texts: int, tmp: Path) -> tuple[float, int]:
    """Passages/s of embed_passages (tiny model, in this process) on `texts` passages of 40 XQuAD words, and the dim."""
    words, rng = vocabulary(default_data_root()), random.Random(0)
    passages = [" ".join(rng.choices(words, k=40)) for _ in range(texts)]
    model = tiny_embedding_model(passages[:5000], tmp / "model")
    pq.write_table(pa.table({"text": passages}), tmp / "passages.parquet")
    lookup = write_passage_lookup(tmp / "passages.parquet", tmp / "passages.arrow")
    start = time.perf_counter()
    paths = embed_passages(model, lookup, tmp / "embedded", MiningConfig(in_process_work=float("inf")))
    seconds = time.perf_counter() - start
    return texts / seconds, int(np.load(paths[0], mmap_mode="r").shape[1])


def main() -> None:
    """Run the search at scale, then the embedding measurement, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--embed-texts", type=int, default=20_000)
    args = parser.parse_args()
    cfg, top_k = MiningConfig(), 30
    shard_rows = cfg.shard_bytes // (4 * args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_shards(tmp / "shards", args.passages, args.dim, shard_rows)
        query_emb, positives = planted_queries([np.load(p, mmap_mode="r") for p in paths], args.queries)
        start = time.perf_counter()
        mined = mine_candidates(query_emb, paths, positives, top_k, 0.95, cfg)
        write_mined(tmp / "mined.parquet", [f"q{i}" for i in range(args.queries)], mined)
        seconds = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        full = sum(len(ids) == top_k for ids, _ in mined)
        leaked = sum(bool(positives[q] & set(ids)) for q, (ids, _) in enumerate(mined))
        rate, model_dim = embedding_rate(args.embed_texts, tmp) if args.embed_texts else (float("nan"), 0)
    corpus_gb = args.passages * args.dim * 4 / 2**30
    print(f"search: {args.passages:,} passages in {len(paths)} shards of {shard_rows:,} (corpus {corpus_gb:.2f} GB "
          f"as float32), {args.queries:,} queries, dim {args.dim}, top_k {top_k}, index auto "
          f"({'IVF' if args.passages >= cfg.ivf_threshold else 'flat'} per shard)")
    print(f"  {seconds:.1f} s, peak RSS {peak_gb:.2f} GB; {full:,} queries with {top_k} candidates, "
          f"{leaked} with their positive among them")
    if args.embed_texts:
        print(f"embedding: {rate:,.0f} passages/s (tiny model, dim {model_dim}, 2 threads, in this process) → "
              f"{args.passages / rate / 60:.0f} min for {args.passages:,} passages on this machine")
    print(f"mining passages={args.passages} queries={args.queries} peak_rss_gb={peak_gb:.2f} seconds={seconds:.1f}")


if __name__ == "__main__":
    main()
