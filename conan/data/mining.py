"""Hard-negative candidate mining: embed corpus and queries (Ray Data actor pool; small jobs in-process), faiss top-k,
drop positives, and guard against false negatives as NV-Retriever does (Moreira et al. 2024):
a candidate scoring above `false_negative_ratio` × the positive's score is probably a positive too.

The corpus (passage id = row of the passage lookup file) is embedded into float32 .npy shards of `shard_rows`
passages, one actor call a shard; the search loads one shard at a time, searches the queries in batches of
`query_batch` and keeps each query's best `depth` over the shards seen (merged by score), so memory is one shard plus
the queries and their running top-k, whatever the corpus size.

Output rows: (query_id, candidate_ids ranked by score, candidate_scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MINED_SCHEMA = pa.schema([("query_id", pa.string()), ("candidate_ids", pa.list_(pa.int64())),
                          ("candidate_scores", pa.list_(pa.float32()))])


@dataclass
class MiningConfig:
    """How many candidates, which index, and the false-negative guard."""

    top_k: int = 30
    false_negative_ratio: float = 0.95
    index: str = "auto"  # auto | flat | ivf | hnsw
    ivf_threshold: int = 100_000  # auto: exact search below this corpus size, IVF above
    batch_size: int = 64
    max_length: int = 256
    actor_cpus: float = 0.5  # fractional, or Ray Data starves on 2-CPU machines
    num_actors: int = 1
    # texts × max_length × model bytes up to which this process embeds them itself: an actor pool's start-up (~7 s)
    # outweighs the work (the tiny demo's 2,000 queries at 5 MB of weights: about 3e12, 1 s).
    in_process_work: float = 1e13
    shard_rows: int = 262_144  # passages per embedding shard: 256 MB at dim 256, the search's corpus memory
    query_batch: int = 8192  # queries searched at once: bounds the score and merge buffers
    query_chunk: int = 1 << 20  # queries embedded and mined at a time: bounds their embeddings (1 GB at dim 256)


class Embedder:
    """Ray Data actor: loads the platform's Encoder once and embeds batches of text."""

    def __init__(self, model_dir: str, max_length: int):
        import torch

        from conan.encoder import Encoder

        torch.set_num_threads(1)
        self.encoder = Encoder(model_dir, max_length=max_length)

    def __call__(self, batch: dict) -> dict:
        """Add an `embedding` column (unit-norm float32) for the `text` column."""
        return {**batch, "embedding": self.encoder.encode(list(batch["text"]))}


def embed_texts(model_dir: str | Path, ids: list, texts: list[str], cfg: MiningConfig) -> tuple[list, np.ndarray]:
    """Embed texts on a Ray Data actor pool (in this process, batch for batch, when the work is under
    cfg.in_process_work); returns (ids, embeddings) in input order."""
    if _in_process(model_dir, len(texts), cfg):
        from conan.encoder import Encoder

        encoder = Encoder(model_dir, max_length=cfg.max_length)
        batches = [encoder.encode(texts[i:i + cfg.batch_size]) for i in range(0, len(texts), cfg.batch_size)]
        return list(ids), np.concatenate(batches).astype(np.float32)
    import ray.data

    ds = ray.data.from_items([{"id": i, "order": n, "text": t} for n, (i, t) in enumerate(zip(ids, texts))])
    out = ds.map_batches(Embedder, fn_constructor_args=(str(model_dir), cfg.max_length), batch_size=cfg.batch_size,
                         num_cpus=cfg.actor_cpus, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors))
    rows = sorted(out.take_all(), key=lambda r: r["order"])
    return [r["id"] for r in rows], np.stack([r["embedding"] for r in rows]).astype(np.float32)


def _in_process(model_dir: str | Path, texts: int, cfg: MiningConfig) -> bool:
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return texts * cfg.max_length * weights <= cfg.in_process_work


class PassageShardEmbedder:
    """Ray Data actor: embeds row ranges of the passage lookup file into float32 .npy shards."""

    def __init__(self, model_dir: str, lookup: str, out_dir: str, max_length: int, batch_size: int):
        import torch

        from conan.data.passages import PassageLookup
        from conan.encoder import Encoder

        torch.set_num_threads(1)
        self.encoder, self.lookup = Encoder(model_dir, max_length=max_length), PassageLookup(lookup)
        self.out_dir, self.batch_size = Path(out_dir), batch_size

    def __call__(self, batch: dict) -> dict:
        """One shard per job (index, start, stop): writes emb-<index>.npy; returns its path and rows."""
        paths = []
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"]):
            texts = self.lookup.table.column("text").slice(int(start), int(stop) - int(start)).to_pylist()
            emb = np.concatenate([self.encoder.encode(texts[i:i + self.batch_size])
                                  for i in range(0, len(texts), self.batch_size)]).astype(np.float32)
            path = self.out_dir / f"emb-{int(index):06d}.npy"
            np.save(path, emb)
            paths.append(str(path))
        return {"index": batch["index"], "path": np.asarray(paths, dtype=object),
                "rows": np.asarray(batch["stop"]) - np.asarray(batch["start"])}


def embed_passages(model_dir: str | Path, lookup: str | Path, out_dir: str | Path, cfg: MiningConfig) -> list[Path]:
    """Embed every passage of a lookup file (conan.data.passages) into shards of cfg.shard_rows rows, on a Ray Data
    actor pool (in this process when small); returns the shard paths in row order."""
    from conan.data.passages import PassageLookup
    from conan.data.tokenize import map_shards

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = len(PassageLookup(lookup))
    if not rows:
        raise ValueError(f"{lookup}: the passage corpus is empty")
    jobs = [{"index": i, "start": start, "stop": min(rows, start + cfg.shard_rows)}
            for i, start in enumerate(range(0, rows, cfg.shard_rows))]
    written = map_shards(PassageShardEmbedder, jobs, {"model_dir": str(model_dir), "lookup": str(lookup),
                                                      "out_dir": str(out_dir), "max_length": cfg.max_length,
                                                      "batch_size": cfg.batch_size},
                         cfg.num_actors, cfg.actor_cpus, in_process=_in_process(model_dir, rows, cfg))
    return [Path(r["path"]) for r in sorted(written, key=lambda r: r["index"])]


def build_index(embeddings: np.ndarray, cfg: MiningConfig, corpus_rows: int | None = None):
    """A faiss inner-product index: flat (exact) for small corpora, IVF or HNSW when the corpus (`corpus_rows`, the
    whole corpus when these embeddings are one shard of it) reaches cfg.ivf_threshold."""
    import faiss

    n, d = embeddings.shape
    kind = cfg.index if cfg.index != "auto" else ("flat" if (corpus_rows or n) < cfg.ivf_threshold else "ivf")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, int(np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = max(1, nlist // 8)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown faiss index kind {kind!r}; expected auto, flat, ivf or hnsw")
    index.add(embeddings)
    return index


def search_shards(query_emb: np.ndarray, shards: Sequence[np.ndarray], depth: int,
                  cfg: MiningConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best `depth` corpus rows over all shards, merged by score: (scores, rows), best first, -1 rows
    past the corpus. One shard's index is in memory at a time; queries go in batches of cfg.query_batch."""
    total = sum(len(shard) for shard in shards)
    best_scores = np.full((len(query_emb), depth), -np.inf, dtype=np.float32)
    best_rows = np.full((len(query_emb), depth), -1, dtype=np.int64)
    offset = 0
    for shard in shards:
        index = build_index(np.ascontiguousarray(shard, dtype=np.float32), cfg, corpus_rows=total)
        k = min(depth, len(shard))
        for q0 in range(0, len(query_emb), cfg.query_batch):
            q = slice(q0, q0 + cfg.query_batch)
            scores, rows = index.search(np.ascontiguousarray(query_emb[q]), k)
            scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
            rows = np.where(rows >= 0, rows + offset, -1)
            merged_scores = np.concatenate([best_scores[q], scores], axis=1)
            merged_rows = np.concatenate([best_rows[q], rows], axis=1)
            # Stable on the running best first: ties keep the earlier shard's (lower) rows ahead, as one index would.
            order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :depth]
            best_scores[q] = np.take_along_axis(merged_scores, order, axis=1)
            best_rows[q] = np.take_along_axis(merged_rows, order, axis=1)
        offset += len(shard)
        del index
    return best_scores, best_rows


def mine_candidates(query_emb: np.ndarray, shards: Sequence[np.ndarray], positives: list[set[int]],
                    cfg: MiningConfig) -> list[tuple[list[int], list[float]]]:
    """Ranked (candidate rows, scores) per query over the corpus `shards` (row ids run across them in order),
    positives removed and the false-negative guard applied.

    The guard drops the best-scoring passages, so a search top_k deep leaves most queries short: queries left with
    fewer than top_k candidates are searched again 4× deeper, down to the whole corpus, so every query whose corpus
    holds top_k passages under the guard gets top_k."""
    starts = np.cumsum([0] + [len(shard) for shard in shards])
    n = int(starts[-1])

    def row(r: int) -> np.ndarray:
        s = int(np.searchsorted(starts, r, side="right")) - 1
        return shards[s][r - starts[s]]

    limits = []
    for q, pos in enumerate(positives):
        pos_score = max((float(query_emb[q] @ row(p)) for p in pos if 0 <= p < n), default=None)
        # ratio × positive score, written so it stays below the positive when that score is negative.
        limits.append(np.inf if pos_score is None else pos_score - (1 - cfg.false_negative_ratio) * abs(pos_score))
    out: list[tuple[list[int], list[float]]] = [([], [])] * len(positives)
    pending = np.arange(len(positives))
    depth = min(n, cfg.top_k + max(map(len, positives), default=0))
    while len(pending):
        scores, rows = search_shards(query_emb[pending], shards, depth, cfg)
        short = []
        for q, s_row, r_row in zip(pending, scores, rows):
            kept = [(int(r), float(s)) for s, r in zip(s_row, r_row)
                    if r >= 0 and int(r) not in positives[q] and s <= limits[q]][:cfg.top_k]
            out[q] = ([c for c, _ in kept], [s for _, s in kept])
            if len(kept) < cfg.top_k:
                short.append(q)
        if depth == n:
            break
        pending, depth = np.asarray(short, dtype=np.int64), min(n, depth * 4)
    return out


def mined_table(query_ids: list[str], mined: list[tuple[list[int], list[float]]]) -> pa.Table:
    """Mining output as a table (query_id, candidate_ids, candidate_scores)."""
    return pa.table({"query_id": query_ids, "candidate_ids": [m[0] for m in mined],
                     "candidate_scores": [m[1] for m in mined]}, schema=MINED_SCHEMA)


def write_mined(path: str | Path, query_ids: list[str], mined: list[tuple[list[int], list[float]]]) -> None:
    """Save mining output as parquet (query_id, candidate_ids, candidate_scores)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(mined_table(query_ids, mined), path)


def read_passages(path: str | Path) -> list[str]:
    """The passage corpus (parquet, column text) that passage ids and mined candidate ids index, in row order."""
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def read_mined(path: str | Path) -> dict[str, list[int]]:
    """query_id → ranked candidate ids."""
    table = pq.read_table(path)
    return dict(zip(table.column("query_id").to_pylist(), table.column("candidate_ids").to_pylist()))


def read_mined_arrays(path: str | Path, batch_rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """The mined candidates as the DHNM pool's arrays, read a record batch at a time: query keys (int64,
    `conan.dhnm.query_keys`) and ranked candidate ids (int32 rows, -1 padded to the longest)."""
    from conan.dhnm import padded_candidates, query_keys

    keys, blocks = [], []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["query_id", "candidate_ids"]):
        ids = batch.column("candidate_ids")
        try:
            blocks.append(padded_candidates(ids.value_lengths().fill_null(0).to_numpy(), ids.flatten().to_numpy()))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        keys.append(query_keys(batch.column("query_id").to_pylist()))
    width = max((b.shape[1] for b in blocks), default=0)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=-1) for b in blocks]
    return (np.concatenate(keys) if keys else np.zeros(0, np.int64),
            np.concatenate(blocks) if blocks else np.zeros((0, 0), np.int32))


def mine_supervised_candidates(model_dir: str | Path, rows: list[dict], lookup: str | Path, out_path: str | Path,
                               cfg: MiningConfig) -> int:
    """Mine candidates in the passage lookup file's corpus for every row with a query_id (retrieval / CLR), its
    embedding shards written beside out_path (<out_path stem>_embeddings/) and the queries taken cfg.query_chunk at
    a time; the parquet appears whole or not at all. Returns the query count."""
    queries = {r["query_id"]: r for r in rows if r.get("query_id")}
    if not queries:
        raise ValueError("no rows with a query_id to mine for")
    query_ids = list(queries)
    out_path = Path(out_path)
    shards = [np.load(p, mmap_mode="r")
              for p in embed_passages(model_dir, lookup, out_path.with_name(out_path.stem + "_embeddings"), cfg)]
    partial = out_path.with_suffix(".partial")
    with pq.ParquetWriter(partial, MINED_SCHEMA) as writer:
        for start in range(0, len(query_ids), cfg.query_chunk):
            chunk = query_ids[start:start + cfg.query_chunk]
            _, query_emb = embed_texts(model_dir, chunk, [queries[q]["query"] for q in chunk], cfg)
            mined = mine_candidates(query_emb, shards, [{queries[q]["positive_id"]} for q in chunk], cfg)
            writer.write_table(mined_table(chunk, mined))
    partial.rename(out_path)
    return len(query_ids)
