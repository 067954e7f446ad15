"""Hard-negative candidate mining: embed corpus and queries (Ray Data actor pool; small jobs in-process), faiss top-k,
drop positives, and guard against false negatives as NV-Retriever does (Moreira et al. 2024):
a candidate scoring above `false_negative_ratio` × the positive's score is probably a positive too.

Memory is bounded by byte budgets (conan.config.MiningConfig), whatever the corpus and query counts:
- the corpus (passage id = row of the passage lookup file) is embedded, optionally at a Matryoshka prefix `dim`, into
  float32 .npy shards of `shard_bytes`, one actor call a shard;
- the queries are read from the stage's shard files as arrays (24 bytes a row: key, positive id, file, row) and
  their texts streamed `query_chunk_bytes` of embeddings at a time;
- the search loads one corpus shard and its index at a time (an IVF / HNSW index is built once per shard, one Ray
  task a shard, written beside it and read back for every query chunk and deeper pass), searches the queries in
  batches of `query_batch` and keeps each query's best `depth` over the shards seen, merged by score; queries still
  short of top_k under the guard when a pass would read the whole corpus are scored exactly, a block at a time;
- with Ray running, each query chunk is searched by a Ray task on any node (`search_tasks` at once, `search_cpus`
  each) while the next chunk is embedded; results are written in chunk order.

Output rows: (query_id, candidate_ids ranked by score, candidate_scores).
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conan.config import MiningConfig
from conan.data.shards import map_jobs, remote_or_local, resolved

EXACT_BLOCK, EXACT_QUERIES = 16_384, 256  # the exact pass's scores at once: 16 MiB (and 32 MiB of indices)
MINED_SCHEMA = pa.schema([("query_id", pa.string()), ("candidate_ids", pa.list_(pa.int64())),
                          ("candidate_scores", pa.list_(pa.float32()))])


class Embedder:
    """Ray Data actor: loads the platform's Encoder once (on the actor's GPU when it has one) and embeds batches."""

    def __init__(self, model_dir: str, max_length: int, dim: int | None):
        self.encoder, self.dim = actor_encoder(model_dir, max_length), dim

    def __call__(self, batch: dict) -> dict:
        """Add an `embedding` column (unit-norm float32, Matryoshka-truncated to dim) for the `text` column."""
        return {**batch, "embedding": self.encoder.encode(list(batch["text"]), dim=self.dim)}


def actor_encoder(model_dir: str, max_length: int):
    """An Encoder for an actor: on CUDA when the actor was given a GPU, else on one CPU thread (fractional CPUs)."""
    import torch

    from conan.encoder import Encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    return Encoder(model_dir, device=device, max_length=max_length)


def embedding_width(model_dir: str | Path, cfg: MiningConfig) -> int:
    """The width mining embeds at: cfg.dim, else the model's hidden size (read off config.json, no weights loaded)."""
    hidden = json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]
    if cfg.dim is not None and not 0 < cfg.dim <= hidden:
        raise ValueError(f"dhnm.mining.dim must be between 1 and the model's width {hidden}, got {cfg.dim}")
    return cfg.dim or hidden


def rows_within(budget: int, model_dir: str | Path, cfg: MiningConfig) -> int:
    """How many float32 embeddings of the mining width fit in `budget` bytes (at least one)."""
    return max(1, budget // (4 * embedding_width(model_dir, cfg)))


def embed_texts(model_dir: str | Path, texts: list[str], cfg: MiningConfig) -> np.ndarray:
    """Embed texts (at cfg.dim) on a Ray Data actor pool, or in this process, batch for batch, when the work is under
    cfg.in_process_work; float32 rows in input order."""
    width, size = embedding_width(model_dir, cfg), cfg.actors.batch_size
    if _in_process(model_dir, len(texts), cfg):
        from conan.encoder import Encoder

        encoder = Encoder(model_dir, max_length=cfg.max_length)
        batches = [encoder.encode(texts[i:i + size], dim=cfg.dim) for i in range(0, len(texts), size)]
        return np.concatenate(batches).astype(np.float32) if batches else np.zeros((0, width), np.float32)
    import ray.data

    ds = ray.data.from_items([{"order": n, "text": t} for n, t in enumerate(texts)])
    out = ds.map_batches(Embedder, fn_constructor_args=(str(model_dir), cfg.max_length, cfg.dim), batch_size=size,
                         num_cpus=cfg.actors.cpus, num_gpus=cfg.actors.gpus or None,
                         compute=ray.data.ActorPoolStrategy(size=cfg.actors.size))
    rows = sorted(out.take_all(), key=lambda r: r["order"])
    return np.stack([r["embedding"] for r in rows]).astype(np.float32)


def _in_process(model_dir: str | Path, texts: int, cfg: MiningConfig) -> bool:
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return texts * cfg.max_length * weights <= cfg.in_process_work


class PassageShardEmbedder:
    """Ray Data actor: embeds row ranges of the passage lookup file into float32 .npy shards."""

    def __init__(self, model_dir: str, lookup: str, out_dir: str, max_length: int, batch_size: int, dim: int | None):
        from conan.data.passages import PassageLookup

        self.encoder, self.lookup = actor_encoder(model_dir, max_length), PassageLookup(lookup)
        self.out_dir, self.batch_size, self.dim = Path(out_dir), batch_size, dim

    def __call__(self, batch: dict) -> dict:
        """One shard per job (index, start, stop): writes emb-<index>.npy; returns its path and rows."""
        paths = []
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"]):
            texts = self.lookup.table.column("text").slice(int(start), int(stop) - int(start)).to_pylist()
            emb = np.concatenate([self.encoder.encode(texts[i:i + self.batch_size], dim=self.dim)
                                  for i in range(0, len(texts), self.batch_size)]).astype(np.float32)
            path = self.out_dir / f"emb-{int(index):06d}.npy"
            np.save(path, emb)
            paths.append(str(path))
        return {"index": batch["index"], "path": np.asarray(paths, dtype=object),
                "rows": np.asarray(batch["stop"]) - np.asarray(batch["start"])}


def embed_passages(model_dir: str | Path, lookup: str | Path, out_dir: str | Path, cfg: MiningConfig) -> list[Path]:
    """Embed every passage of a lookup file (conan.data.passages) at cfg.dim into shards of cfg.shard_bytes, on a Ray
    Data actor pool (in this process when small); returns the shard paths in row order. What out_dir held before
    (another model's shards and their indexes) is removed first."""
    from conan.data.passages import PassageLookup
    from conan.data.tokenize import map_shards

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("emb-*"):
        old.unlink()
    rows = len(PassageLookup(lookup))
    if not rows:
        raise ValueError(f"{lookup}: the passage corpus is empty")
    shard_rows = rows_within(cfg.shard_bytes, model_dir, cfg)
    jobs = [{"index": i, "start": start, "stop": min(rows, start + shard_rows)}
            for i, start in enumerate(range(0, rows, shard_rows))]
    written = map_shards(PassageShardEmbedder, jobs, {"model_dir": str(model_dir), "lookup": str(lookup),
                                                      "out_dir": str(out_dir), "max_length": cfg.max_length,
                                                      "batch_size": cfg.actors.batch_size, "dim": cfg.dim},
                         cfg.actors.size, cfg.actors.cpus, in_process=_in_process(model_dir, rows, cfg),
                         gpus=cfg.actors.gpus)
    return [Path(r["path"]) for r in sorted(written, key=lambda r: r["index"])]


def index_kind(cfg: MiningConfig, corpus_rows: int) -> str:
    """The faiss index for a corpus of `corpus_rows` passages: cfg.index, or under auto flat below ivf_threshold."""
    kind = cfg.index if cfg.index != "auto" else ("flat" if corpus_rows < cfg.ivf_threshold else "ivf")
    if kind not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"unknown faiss index kind {kind!r}; expected auto, flat, ivf or hnsw")
    return kind


def build_index(embeddings: np.ndarray, cfg: MiningConfig, corpus_rows: int | None = None):
    """A faiss inner-product index: flat (exact) for small corpora, IVF or HNSW when the corpus (`corpus_rows`, the
    whole corpus when these embeddings are one shard of it) reaches cfg.ivf_threshold."""
    import faiss

    n, d = embeddings.shape
    kind = index_kind(cfg, corpus_rows or n)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, int(np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.add(embeddings)
    return _probing(index)


def _probing(index):
    """An IVF index searching an eighth of its lists (the setting is not saved with the index)."""
    if hasattr(index, "nprobe"):
        index.nprobe = max(1, index.nlist // 8)
    return index


def shard_index(shard: np.ndarray | Path, cfg: MiningConfig, corpus_rows: int):
    """The faiss index of one corpus shard. A shard file's IVF / HNSW index (training and graph building are the cost)
    is written beside it the first time, named by the file's mtime, and read back after; flat indexes and in-memory
    shards are built."""
    import faiss

    if not isinstance(shard, Path) or index_kind(cfg, corpus_rows) == "flat":
        return build_index(np.ascontiguousarray(_array(shard), dtype=np.float32), cfg, corpus_rows)
    cache = shard.with_name(f"{shard.stem}.{index_kind(cfg, corpus_rows)}-{shard.stat().st_mtime_ns}.faiss")
    if cache.is_file():
        return _probing(faiss.read_index(str(cache)))
    index = build_index(np.ascontiguousarray(_array(shard), dtype=np.float32), cfg, corpus_rows)
    partial = cache.with_suffix(f".{os.getpid()}.partial")  # two processes building it never share a file
    faiss.write_index(index, str(partial))
    partial.rename(cache)
    return index


def _array(shard: np.ndarray | Path) -> np.ndarray:
    """A shard's embeddings: the array, or the .npy file memory-mapped."""
    return np.load(shard, mmap_mode="r") if isinstance(shard, Path) else shard


def search_shards(query_emb: np.ndarray, shards: Sequence[np.ndarray | Path], depth: int,
                  cfg: MiningConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best `depth` corpus rows over all shards (arrays or .npy files), merged by score: (scores, rows),
    best first, -1 rows past the corpus. One shard's index is in memory at a time; queries go in batches of
    cfg.query_batch."""
    sizes = [len(_array(shard)) for shard in shards]
    best_scores = np.full((len(query_emb), depth), -np.inf, dtype=np.float32)
    best_rows = np.full((len(query_emb), depth), -1, dtype=np.int64)
    offset = 0
    for shard, size in zip(shards, sizes):
        index = shard_index(shard, cfg, sum(sizes))
        k = min(depth, size)
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
        offset += size
        del index
    return best_scores, best_rows


def mine_candidates(query_emb: np.ndarray, shards: Sequence[np.ndarray | Path], positives: list[set[int]],
                    top_k: int, false_negative_ratio: float,
                    cfg: MiningConfig | None = None) -> list[tuple[list[int], list[float]]]:
    """Ranked (candidate rows, scores), top_k a query, over the corpus `shards` (arrays or .npy files; row ids run
    across them in order), positives removed and the false-negative guard at `false_negative_ratio` applied.

    The guard drops the best-scoring passages, so a search top_k deep leaves most queries short: queries left with
    fewer than top_k candidates are searched again 4× deeper, and those still short when the next pass would read
    the whole corpus are scored exactly against every passage (`guarded_top_k`: an IVF index probes an eighth of
    its lists and HNSW returns a few hundred rows whatever the depth), so every query whose corpus holds top_k
    passages under the guard gets top_k."""
    cfg = cfg or MiningConfig()
    arrays = [_array(shard) for shard in shards]
    starts = np.cumsum([0] + [len(a) for a in arrays])
    n = int(starts[-1])

    def row(r: int) -> np.ndarray:
        s = int(np.searchsorted(starts, r, side="right")) - 1
        return arrays[s][r - starts[s]]

    limits = []
    for q, pos in enumerate(positives):
        pos_score = max((float(query_emb[q] @ row(p)) for p in pos if 0 <= p < n), default=None)
        # ratio × positive score, written so it stays below the positive when that score is negative.
        limits.append(np.inf if pos_score is None else pos_score - (1 - false_negative_ratio) * abs(pos_score))
    out: list[tuple[list[int], list[float]]] = [([], [])] * len(positives)
    pending = np.arange(len(positives))
    depth = min(n, top_k + max(map(len, positives), default=0))
    while len(pending) and depth < n:
        scores, rows = search_shards(query_emb[pending], shards, depth, cfg)
        short = []
        for q, s_row, r_row in zip(pending, scores, rows):
            kept = [(int(r), float(s)) for s, r in zip(s_row, r_row)
                    if r >= 0 and int(r) not in positives[q] and s <= limits[q]][:top_k]
            out[q] = ([c for c, _ in kept], [s for _, s in kept])
            if len(kept) < top_k:
                short.append(q)
        pending, depth = np.asarray(short, dtype=np.int64), min(n, depth * 4)
    exact = guarded_top_k(query_emb[pending], shards, [positives[q] for q in pending],
                          np.array([limits[q] for q in pending], dtype=np.float64), top_k, cfg) if len(pending) else []
    for q, found in zip(pending, exact):
        out[q] = found
    return out


def guarded_top_k(query_emb: np.ndarray, shards: Sequence[np.ndarray | Path], positives: list[set[int]],
                  limits: np.ndarray, top_k: int, cfg: MiningConfig) -> list[tuple[list[int], list[float]]]:
    """Each query's top_k passages scoring at most its limit, its positives excluded, by exact inner products with
    every passage (best first; equal scores by row, except where a block's top_k cut falls between them). Queries
    go EXACT_QUERIES (at most cfg.query_batch) at a time against EXACT_BLOCK passages, so memory holds one block of
    scores whatever the corpus size."""
    out, batch = [], min(cfg.query_batch, EXACT_QUERIES)
    for q0 in range(0, len(query_emb), batch):
        q = np.ascontiguousarray(query_emb[q0:q0 + batch], dtype=np.float32)
        limit = limits[q0:q0 + batch, None]
        best_scores = np.full((len(q), top_k), -np.inf, dtype=np.float32)
        best_rows = np.full((len(q), top_k), -1, dtype=np.int64)
        offset = 0
        for shard in shards:
            array = _array(shard)
            for start in range(0, len(array), EXACT_BLOCK):
                block = np.asarray(array[start:start + EXACT_BLOCK], dtype=np.float32)
                scores = q @ block.T
                scores[scores > limit] = -np.inf
                first = offset + start
                for i, pos in enumerate(positives[q0:q0 + batch]):
                    scores[i, [p - first for p in pos if first <= p < first + len(block)]] = -np.inf
                rows = np.broadcast_to(np.arange(first, first + len(block)), scores.shape)
                if len(block) > top_k:  # the block's top_k only, then the exact merge
                    top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
                    scores, rows = np.take_along_axis(scores, top, axis=1), np.take_along_axis(rows, top, axis=1)
                merged_scores = np.concatenate([best_scores, scores], axis=1)
                merged_rows = np.concatenate([best_rows, rows], axis=1)
                order = np.lexsort((merged_rows, -merged_scores), axis=1)[:, :top_k]
                best_scores = np.take_along_axis(merged_scores, order, axis=1)
                best_rows = np.take_along_axis(merged_rows, order, axis=1)
            offset += len(array)
        for s_row, r_row in zip(best_scores, best_rows):
            found = s_row > -np.inf
            out.append((r_row[found].tolist(), s_row[found].astype(float).tolist()))
    return out


@dataclass
class QuerySet:
    """The distinct queries of a stage's shard files, as arrays (no text): each one's first row (file, row; in file
    order) and the positive ids of all its rows, positives[starts[q]:ends[q]]."""

    files: list[Path]
    file: np.ndarray
    row: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    positives: np.ndarray

    def __len__(self) -> int:
        return len(self.file)


def scan_queries(files: Sequence[str | Path], tasks: Sequence[str], batch_rows: int = 1 << 16) -> QuerySet:
    """Read the query_id, task and positive_id columns of the files (a record batch at a time): every row of `tasks`
    with a query_id becomes 24 bytes of arrays, merged by query id (its 64-bit key) into one entry per query."""
    from conan.dhnm import query_keys

    wanted = pa.array(sorted(tasks), pa.string())
    keys, positives, file, row = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int32)], [
        np.zeros(0, np.int64)]
    for i, path in enumerate(files):
        offset = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows,
                                                       columns=["task", "query_id", "positive_id"]):
            mask = pc.and_(pc.is_in(batch.column("task"), value_set=wanted),
                           pc.not_equal(batch.column("query_id"), ""))
            idx = np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))
            keys.append(query_keys(batch.column("query_id").take(idx).to_pylist()))
            positives.append(pc.fill_null(batch.column("positive_id").take(idx), -1).to_numpy().astype(np.int64))
            file.append(np.full(len(idx), i, np.int32))
            row.append(idx.astype(np.int64) + offset)
            offset += batch.num_rows
    keys, positives, file, row = (np.concatenate(a) for a in (keys, positives, file, row))
    order = np.argsort(keys, kind="stable")  # a query's rows stay in file order: its first row leads
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(keys)].astype(np.int64)
    first = order[starts]
    in_file_order = np.argsort(first, kind="stable")
    return QuerySet([Path(f) for f in files], file[first][in_file_order], row[first][in_file_order],
                    starts[in_file_order], ends[in_file_order], positives[order])


def query_chunks(queries: QuerySet, chunk: int,
                 batch_rows: int = 1 << 16) -> Iterator[tuple[list[str], list[str], list[set[int]]]]:
    """The distinct queries' (ids, texts, positive id sets), `chunk` at a time in file order, their texts read a
    record batch at a time."""
    ids: list[str] = []
    texts: list[str] = []
    positives: list[set[int]] = []
    for i, path in enumerate(queries.files):
        lo, hi = np.searchsorted(queries.file, [i, i + 1])
        rows, offset = queries.row[lo:hi], 0
        if not len(rows):
            continue
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["query_id", "query"]):
            a, b = np.searchsorted(rows, [offset, offset + batch.num_rows])
            take = pa.array(rows[a:b] - offset)
            ids += batch.column("query_id").take(take).to_pylist()
            texts += batch.column("query").take(take).to_pylist()
            positives += [set(queries.positives[queries.starts[q]:queries.ends[q]].tolist())
                          for q in range(lo + a, lo + b)]
            offset += batch.num_rows
            while len(ids) >= chunk:
                yield ids[:chunk], texts[:chunk], positives[:chunk]
                del ids[:chunk], texts[:chunk], positives[:chunk]
    if ids:
        yield ids, texts, positives


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


def mine_supervised_candidates(model_dir: str | Path, files: Sequence[str | Path], tasks: Sequence[str],
                               lookup: str | Path, out_path: str | Path, top_k: int, false_negative_ratio: float,
                               cfg: MiningConfig) -> int:
    """Mine top_k candidates in the passage lookup file's corpus for every distinct query_id of the `tasks` rows in
    the shard files, streamed: the queries are read as arrays, their texts embedded and searched cfg.query_chunk_bytes
    of embeddings at a time, the corpus embedded into shards beside out_path (<out_path stem>_embeddings/). The
    parquet appears whole or not at all. Returns the query count."""
    queries = scan_queries(files, tasks)
    if not len(queries):
        raise ValueError(f"no rows of the tasks {sorted(tasks)} with a query_id to mine for")
    from conan.data.passages import PassageLookup

    passages = len(PassageLookup(lookup))
    if beyond := int((queries.positives >= passages).sum()):  # their positives would be mined as negatives
        raise ValueError(f"{beyond} rows name a positive_id beyond the {passages} passages of dhnm.passages (largest "
                         f"{int(queries.positives.max())}): positive_id is a row number of dhnm.passages")
    out_path = Path(out_path)
    shards = embed_passages(model_dir, lookup, out_path.with_name(out_path.stem + "_embeddings"), cfg)
    corpus_rows = sum(len(_array(shard)) for shard in shards)
    if index_kind(cfg, corpus_rows) != "flat":  # each shard's index built once, in parallel, for every chunk to read
        map_jobs(lambda shard: _cache_index(shard, cfg, corpus_rows), shards, cfg.search_cpus)
    search = remote_or_local(mine_candidates, cfg.search_cpus)
    partial = out_path.with_suffix(".partial")
    in_flight: deque = deque()
    with pq.ParquetWriter(partial, MINED_SCHEMA) as writer:
        for ids, texts, positives in query_chunks(queries, rows_within(cfg.query_chunk_bytes, model_dir, cfg)):
            in_flight.append((ids, search(embed_texts(model_dir, texts, cfg), shards, positives, top_k,
                                          false_negative_ratio, cfg)))
            while len(in_flight) >= max(1, cfg.search_tasks):
                done_ids, mined = in_flight.popleft()
                writer.write_table(mined_table(done_ids, resolved(mined)))
        for done_ids, mined in in_flight:  # in chunk order: the output keeps the files' query order
            writer.write_table(mined_table(done_ids, resolved(mined)))
    partial.rename(out_path)
    return len(queries)


def _cache_index(shard: Path, cfg: MiningConfig, corpus_rows: int) -> None:
    """Build a shard's index and write it beside the shard (a no-op when it is there)."""
    shard_index(shard, cfg, corpus_rows)
