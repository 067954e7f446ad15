"""Tokenize upstream of the GPU workers: Ray Data jobs on CPU actor pools that write token shards.

Pretraining: each documents shard becomes one blocks shard: its documents tokenized (each ends with <|eos|>), laid
end to end in shard order and cut into blocks of seq_len tokens; the shard's last block keeps what is left (shorter),
so the blocks of the manifest, joined in order, are exactly the tokenized documents joined. Token ids are uint16 when
the vocabulary fits (≤ 65,536 ids), else uint32. The manifest's stats carry the token count and the corpus's unigram
entropy (what a causal LM's loss must fall below to have learned more than token frequencies).

Pairs (the weak stage): each pairs shard becomes one token shard of the same group and row count, in the same order
(so row ids do not change): `<column>_ids` for each text column (each text ending with <|eos|>, cut at seq_len keeping
the <|eos|>, as `encode_texts`), and `<column>_key` (the text's 64-bit content key, for the positive-copies mask) for
the keyed ones. Workers then read ids, never text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.dedup import exact_keys
from conan.data.shards import Manifest, ShardFile, file_sha256, load_manifest, merge_manifests
from conan.train.diagnostics import unigram_entropy

BLOCKS_KIND = "lm_blocks"
PAIR_TOKENS_KIND = "pair_tokens"


def encode_texts(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids of texts (each ending with <|eos|>), truncated to seq_len keeping the <|eos|>."""
    eos = tokenizer.eos_token_id
    out = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [ids if len(ids) <= seq_len else ids[:seq_len - 1] + [eos] for ids in out]


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """A hash of the tokenizer's files: token shards are reused only with the tokenizer that wrote them."""
    h = hashlib.sha256()
    for path in sorted(Path(tokenizer_dir).glob("*.json")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


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


class ShardTokenizer:
    """Ray Data actor: tokenizes the text columns of one pairs shard per call and writes its token shard."""

    def __init__(self, tokenizer_dir: str, out_dir: str, seq_len: int, columns: list[str], keyed: list[str]):
        from conan.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.out_dir, self.seq_len, self.columns, self.keyed = Path(out_dir), seq_len, columns, keyed
        self.dtype = token_type(len(self.tokenizer))

    def __call__(self, batch: dict) -> dict:
        """batch: {index, group, path} of pairs shards → {index, group, path, rows, sha256, dtype} of the token
        shards."""
        out = {"index": [], "group": [], "path": [], "rows": [], "sha256": [], "dtype": []}
        for index, group, src in zip(batch["index"], batch["group"], batch["path"]):
            table = pq.read_table(src, columns=sorted({*self.columns, *self.keyed}))
            columns = {}
            for c in self.columns:
                ids = encode_texts(self.tokenizer, table[c].to_pylist(), self.seq_len)
                columns[f"{c}_ids"] = pa.array(ids, pa.list_(self.dtype))
            for c in self.keyed:
                columns[f"{c}_key"] = pa.array(exact_keys(table[c].to_pylist()).view(np.int64), pa.int64())
            path = self.out_dir / f"tokens-{int(index):05d}.parquet"
            pq.write_table(pa.table(columns), path)
            for key, value in (("index", int(index)), ("group", group), ("path", path.name),
                               ("rows", table.num_rows), ("sha256", file_sha256(path)), ("dtype", str(self.dtype))):
                out[key].append(value)
        return out


def tokenize_pairs(shard_dirs: list[str], out_dir: str | Path, tokenizer_dir: str, seq_len: int,
                   columns: list[str], keyed: list[str], concurrency: int = 2, cpus: float = 0.5) -> Manifest:
    """Pairs shard directories → a token shard directory, file for file (reused when its manifest exists).

    cpus: per tokenizer actor; fractional so that it starts beside a Tune trial's reserved CPUs on a small machine."""
    import ray.data

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return load_manifest(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests = [load_manifest(d) for d in shard_dirs]
    files = [(g, p) for g, parts in merge_manifests(manifests).items() for p, _ in parts]
    if not files:
        raise ValueError(f"{shard_dirs}: no pairs shards to tokenize")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    jobs = ray.data.from_items([{"index": i, "group": g, "path": str(p)} for i, (g, p) in enumerate(files)])
    written = jobs.map_batches(ShardTokenizer, batch_size=1, concurrency=max(1, min(concurrency, len(files))),
                               num_cpus=cpus, fn_constructor_kwargs={
                                   "tokenizer_dir": str(tokenizer_dir), "out_dir": str(out_dir), "seq_len": seq_len,
                                   "columns": columns, "keyed": keyed}).take_all()
    groups: dict[str, list[ShardFile]] = {}
    for r in sorted(written, key=lambda r: r["index"]):  # each group's files in their input order: same row ids
        groups.setdefault(r["group"], []).append(ShardFile(r["path"], int(r["rows"]), r["sha256"]))
    dtype = str(pa.list_(pa.type_for_alias(written[0]["dtype"])))
    schema = {**{f"{c}_ids": dtype for c in columns}, **{f"{c}_key": "int64" for c in keyed}}
    manifest = Manifest(out_dir, PAIR_TOKENS_KIND, schema, groups,
                        {**manifests[0].stats, "seq_len": seq_len, "tokenizer": tokenizer_fingerprint(tokenizer_dir),
                         "inputs": [str(d) for d in shard_dirs]})
    manifest.save()
    return manifest

