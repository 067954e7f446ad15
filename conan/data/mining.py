"""Hard-negative candidate mining: embed corpus and queries (Ray Data actor pool; small jobs in-process), faiss top-k,
drop positives, and guard against false negatives as NV-Retriever does (Moreira et al. 2024):
a candidate scoring above `false_negative_ratio` × the positive's score is probably a positive too.

Output rows: (query_id, candidate_ids ranked by score, candidate_scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    if len(texts) * cfg.max_length * weights <= cfg.in_process_work:
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


def build_index(embeddings: np.ndarray, cfg: MiningConfig):
    """A faiss inner-product index: flat (exact) for small corpora, IVF or HNSW above cfg.ivf_threshold."""
    import faiss

    n, d = embeddings.shape
    kind = cfg.index if cfg.index != "auto" else ("flat" if n < cfg.ivf_threshold else "ivf")
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


def mine_candidates(query_emb: np.ndarray, corpus_emb: np.ndarray, corpus_ids: list[int],
                    positives: list[set[int]], cfg: MiningConfig) -> list[tuple[list[int], list[float]]]:
    """Ranked (candidate ids, scores) per query, positives removed and the false-negative guard applied.

    The guard drops the best-scoring passages, so a search top_k deep leaves most queries short: queries left with
    fewer than top_k candidates are searched again 4× deeper, down to the whole corpus, so every query whose corpus
    holds top_k passages under the guard gets top_k."""
    index = build_index(corpus_emb, cfg)
    n = len(corpus_ids)
    id_of = np.asarray(corpus_ids)
    row_of = {cid: r for r, cid in enumerate(corpus_ids)}
    limits = []
    for q, pos in enumerate(positives):
        pos_score = max((float(query_emb[q] @ corpus_emb[row_of[p]]) for p in pos if p in row_of), default=None)
        # ratio × positive score, written so it stays below the positive when that score is negative.
        limits.append(np.inf if pos_score is None else pos_score - (1 - cfg.false_negative_ratio) * abs(pos_score))
    out: list[tuple[list[int], list[float]]] = [([], [])] * len(positives)
    pending = np.arange(len(positives))
    depth = min(n, cfg.top_k + max(map(len, positives), default=0))
    while len(pending):
        scores, rows = index.search(query_emb[pending], depth)
        short = []
        for q, s_row, r_row in zip(pending, scores, rows):
            kept = [(int(id_of[r]), float(s)) for s, r in zip(s_row, r_row)
                    if r >= 0 and int(id_of[r]) not in positives[q] and s <= limits[q]][:cfg.top_k]
            out[q] = ([c for c, _ in kept], [s for _, s in kept])
            if len(kept) < cfg.top_k:
                short.append(q)
        if depth == n:
            break
        pending, depth = np.asarray(short, dtype=np.int64), min(n, depth * 4)
    return out


def write_mined(path: str | Path, query_ids: list[str], mined: list[tuple[list[int], list[float]]]) -> None:
    """Save mining output as parquet (query_id, candidate_ids, candidate_scores)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"query_id": query_ids, "candidate_ids": [m[0] for m in mined],
                             "candidate_scores": [m[1] for m in mined]}, schema=MINED_SCHEMA), path)


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


def mine_supervised_candidates(model_dir: str | Path, rows: list[dict], corpus: list[str], out_path: str | Path,
                               cfg: MiningConfig) -> int:
    """Mine candidates in `corpus` for every row with a query_id (retrieval / CLR); returns the query count."""
    queries = {r["query_id"]: r for r in rows if r.get("query_id")}
    if not queries:
        raise ValueError("no rows with a query_id to mine for")
    query_ids = list(queries)
    corpus_ids, corpus_emb = embed_texts(model_dir, list(range(len(corpus))), corpus, cfg)
    _, query_emb = embed_texts(model_dir, query_ids, [queries[q]["query"] for q in query_ids], cfg)
    mined = mine_candidates(query_emb, corpus_emb, corpus_ids, [{queries[q]["positive_id"]} for q in query_ids], cfg)
    write_mined(out_path, query_ids, mined)
    return len(query_ids)
