"""Tokenize and pack pretraining documents upstream of the GPU workers: a Ray Data job on a CPU actor pool.

Each documents shard becomes one blocks shard: its documents tokenized (each ends with <|eos|>), laid end to end in
shard order and cut into blocks of seq_len tokens; the shard's last block keeps what is left (shorter), so the blocks of
the manifest, joined in order, are exactly the tokenized documents joined. Token ids are uint16 when the vocabulary fits
(≤ 65,536 ids), else uint32. The manifest's stats carry the token count and the corpus's unigram entropy (what a
causal LM's loss must fall below to have learned more than token frequencies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.shards import Manifest, ShardFile, file_sha256, load_manifest, merge_manifests
from conan.train.diagnostics import unigram_entropy

BLOCKS_KIND = "lm_blocks"


def token_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type that holds every id."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def pack_stream(ids: list[list[int]], seq_len: int) -> list[np.ndarray]:
    """Documents' ids joined end to end and cut into seq_len blocks, the last one shorter when the stream runs out."""
    stream = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]


class ShardPacker:
    """Ray Data actor: tokenizes one documents shard per call and writes its blocks shard (the tokenizer loads once)."""

    def __init__(self, tokenizer_dir: str, out_dir: str, seq_len: int):
        from conan.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.out_dir, self.seq_len = Path(out_dir), seq_len
        self.dtype = token_type(len(self.tokenizer))

    def __call__(self, batch: dict) -> dict:
        """batch: {index, path} of documents shards → {path, rows, sha256, counts} of the blocks shards written."""
        out = {"path": [], "rows": [], "sha256": [], "counts": []}
        for index, src in zip(batch["index"], batch["path"]):
            texts = pq.read_table(src, columns=["text"])["text"].to_pylist()
            ids = self.tokenizer(texts)["input_ids"] if texts else []
            blocks = pack_stream(ids, self.seq_len)
            path = self.out_dir / f"blocks-{int(index):05d}.parquet"
            pq.write_table(pa.table({"ids": pa.array(blocks, pa.list_(self.dtype))}), path)
            counts = np.bincount(np.concatenate(blocks), minlength=len(self.tokenizer)) if blocks else \
                np.zeros(len(self.tokenizer), dtype=np.int64)
            out["path"].append(path.name)
            out["rows"].append(len(blocks))
            out["sha256"].append(file_sha256(path))
            out["counts"].append(counts.astype(np.int64))
        return out


def pack_documents(document_dirs: list[str], out_dir: str | Path, tokenizer_dir: str, seq_len: int,
                   concurrency: int = 2) -> Manifest:
    """Documents shard directories → a blocks shard directory (reused when its manifest exists)."""
    import ray.data

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return load_manifest(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [p for parts in merge_manifests([load_manifest(d) for d in document_dirs]).values() for p, _ in parts]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    jobs = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(files)])
    written = jobs.map_batches(ShardPacker, batch_size=1, concurrency=max(1, min(concurrency, len(files))),
                               num_cpus=1, fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir),
                                                                  "out_dir": str(out_dir), "seq_len": seq_len}
                               ).take_all()
    written.sort(key=lambda r: r["path"])
    counts = np.sum([np.asarray(r["counts"]) for r in written], axis=0)
    parts = [ShardFile(r["path"], int(r["rows"]), r["sha256"]) for r in written if r["rows"]]
    manifest = Manifest(out_dir, BLOCKS_KIND, {"ids": str(pa.list_(token_type(len(counts))))}, {"all": parts},
                        {"seq_len": seq_len, "tokens": int(counts.sum()), "unigram_entropy": unigram_entropy(counts),
                         "inputs": [str(d) for d in document_dirs]})
    manifest.save()
    return manifest
