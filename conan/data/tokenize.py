"""Tokenize upstream of the GPU workers: Ray Data jobs on CPU actor pools that write token shards (inputs of at most
IN_PROCESS_ROWS rows: the same code in the launching process).

Pretraining: each documents shard becomes one blocks shard: its documents tokenized (each ends with <|eos|>), laid
end to end in shard order and cut into blocks of seq_len tokens; the shard's last block keeps what is left (shorter),
so the blocks of the manifest, joined in order, are exactly the tokenized documents joined. Token ids are uint16 when
the vocabulary fits (≤ 65,536 ids), else uint32. The manifest's stats carry the token count and the corpus's unigram
entropy (what a causal LM's loss must fall below to have learned more than token frequencies).

Rows (SFT, weak, supervised): each text shard becomes one token shard of the same group and row count, in the same
order (so row ids do not change), with the columns the stage's `TokenColumns` makes of it: `<column>_ids` for its
texts (each ending with <|eos|>, cut at seq_len keeping the <|eos|>, as `encode_texts`; a list of texts becomes a list
of id lists), `<column>_key` (a text's 64-bit content key, for the positive-copies mask), and the non-text columns a
worker needs. Workers then read ids, never text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.dedup import content_keys
from conan.data.shards import (Manifest, ShardError, ShardFile, dirs_fingerprint, file_sha256, load_manifest,
                               merge_manifests, write_shard)
from conan.tokenizer import encode_texts, load_tokenizer, token_ids
from conan.train.diagnostics import unigram_entropy

BLOCKS_KIND = "lm_blocks"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """A hash of the tokenizer's own files (not a model's config beside them)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            h.update(name.encode() + (Path(tokenizer_dir) / name).read_bytes())
    return h.hexdigest()[:12]


def token_shards_key(dirs: list[str], tokenizer_dir: str | Path, seq_len: int) -> str:
    """Names token shards by what they are made of: the input shards, the tokenizer and seq_len; equal keys, equal
    token shards."""
    return f"{dirs_fingerprint(dirs)}-{tokenizer_fingerprint(tokenizer_dir)}-{seq_len}"


def token_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type that holds every id."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def pack_stream(ids: list[list[int]], seq_len: int) -> list[np.ndarray]:
    """Documents' ids joined end to end and cut into seq_len blocks, the last one shorter when the stream runs out."""
    stream = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]


# Below this many rows a Ray Data pool's start-up outweighs the work: the Rust tokenizer already runs on every core of
# the driver's machine, and a pool pays once the rows want more machines. On 2 cores the demo's 209k pretraining
# documents pack in 8.0 s in process against 10.6-13.5 s on a pool of two actors; its 88k supervised rows 8.9 vs 17.5 s.
IN_PROCESS_ROWS = 250_000


def map_shards(actor: type, jobs: list[dict], actor_kwargs: dict, concurrency: int, cpus: float,
               in_process: bool, gpus: float = 0.0) -> list[dict]:
    """One call of a Ray Data actor per job (a shard to turn into another), on a pool of `concurrency` actors of
    `cpus` (and `gpus`) each; the rows the calls return. Small inputs (`in_process`: a test's, a Tune trial's) are
    done by one instance of the actor in this process: same calls, same outputs, no pool to start."""
    if in_process:
        out = actor(**actor_kwargs)({key: [job[key] for job in jobs] for key in jobs[0]})
        return [dict(zip(out, values)) for values in zip(*out.values())]
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data.from_items(jobs).map_batches(
        actor, batch_size=1, concurrency=max(1, min(concurrency, len(jobs))), num_cpus=cpus, num_gpus=gpus or None,
        fn_constructor_kwargs=actor_kwargs).take_all()


class ShardPacker:
    """Ray Data actor: tokenizes one documents shard per call and writes its blocks shard (the tokenizer loads once)."""

    def __init__(self, tokenizer_dir: str, out_dir: str, seq_len: int):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.out_dir, self.seq_len = Path(out_dir), seq_len
        self.dtype = token_type(len(self.tokenizer))

    def __call__(self, batch: dict) -> dict:
        """batch: {index, path} of documents shards → {path, rows, sha256, counts} of the blocks shards written."""
        out = {"path": [], "rows": [], "sha256": [], "counts": []}
        for index, src in zip(batch["index"], batch["path"]):
            texts = pq.read_table(src, columns=["text"])["text"].to_pylist()
            ids = token_ids(self.tokenizer, texts)
            blocks = pack_stream(ids, self.seq_len)
            path = self.out_dir / f"blocks-{int(index):05d}.parquet"
            write_shard(pa.table({"ids": pa.array(blocks, pa.list_(self.dtype))}), path)
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
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return load_manifest(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests = [load_manifest(d) for d in document_dirs]
    files = [p for parts in merge_manifests(manifests).values() for p, _ in parts]
    written = map_shards(ShardPacker, [{"index": i, "path": str(p)} for i, p in enumerate(files)],
                         {"tokenizer_dir": str(tokenizer_dir), "out_dir": str(out_dir), "seq_len": seq_len},
                         concurrency, cpus=1, in_process=sum(m.rows for m in manifests) <= IN_PROCESS_ROWS)
    written.sort(key=lambda r: r["path"])
    counts = np.sum([np.asarray(r["counts"]) for r in written], axis=0)
    parts = [ShardFile(r["path"], int(r["rows"]), r["sha256"]) for r in written if r["rows"]]
    manifest = Manifest(out_dir, BLOCKS_KIND, {"ids": str(pa.list_(token_type(len(counts))))}, {"all": parts},
                        {"seq_len": seq_len, "tokens": int(counts.sum()), "unigram_entropy": unigram_entropy(counts),
                         "inputs": [str(d) for d in document_dirs]})
    manifest.save()
    return manifest


class TokenEncoder:
    """Texts → Arrow token id columns of the narrowest id type: each text ends with <|eos|>, cut at seq_len keeping it
    (`encode_texts`)."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.type = pa.list_(token_type(len(tokenizer)))

    def ids(self, texts: list[str]) -> pa.Array:
        """One id list per text."""
        return pa.array(encode_texts(self.tokenizer, texts, self.seq_len), self.type)

    def nested(self, lists: list[list[str]]) -> pa.Array:
        """One list of id lists per row of a list-of-texts column (a row's hard negatives)."""
        offsets = np.concatenate([[0], np.cumsum([len(texts) for texts in lists])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), self.ids([t for texts in lists for t in texts]))


# What a stage turns one shard file of a group into: its token columns (the rows, their number and order kept).
TokenColumns = Callable[[str, pa.Table, TokenEncoder], dict[str, pa.Array]]


def text_token_columns(table: pa.Table, encoder: TokenEncoder, texts: Sequence[str],
                       keyed: Sequence[str] = ()) -> dict[str, pa.Array]:
    """`<c>_ids` for each text column, `<c>_key` (its 64-bit content key, for the positive-copies mask) for the keyed
    ones."""
    columns = {f"{c}_ids": encoder.ids(table[c].to_pylist()) for c in texts}
    columns.update({f"{c}_key": pa.array(content_keys(table[c].to_pylist()), pa.int64()) for c in keyed})
    return columns


class ShardTokenizer:
    """Ray Data actor: turns one text shard per call into its token shard with a stage's `TokenColumns` (the tokenizer
    loads once)."""

    def __init__(self, tokenizer_dir: str, out_dir: str, seq_len: int, token_columns: TokenColumns):
        self.encoder = TokenEncoder(load_tokenizer(tokenizer_dir), seq_len)
        self.out_dir, self.token_columns = Path(out_dir), token_columns

    def __call__(self, batch: dict) -> dict:
        """batch: {index, group, path} of text shards → {index, group, path, rows, sha256, schema} of the token
        shards."""
        out = {"index": [], "group": [], "path": [], "rows": [], "sha256": [], "schema": []}
        for index, group, src in zip(batch["index"], batch["group"], batch["path"]):
            table = pq.read_table(src)
            tokens = pa.table(self.token_columns(group, table, self.encoder))
            path = self.out_dir / f"tokens-{int(index):05d}.parquet"
            write_shard(tokens, path)
            schema = json.dumps({field.name: str(field.type) for field in tokens.schema})
            for key, value in (("index", int(index)), ("group", group), ("path", path.name),
                               ("rows", table.num_rows), ("sha256", file_sha256(path)), ("schema", schema)):
                out[key].append(value)
        return out


def tokenize_shards(shard_dirs: list[str], out_dir: str | Path, tokenizer_dir: str, seq_len: int, kind: str,
                    token_columns: TokenColumns, concurrency: int = 2, cpus: float = 0.5) -> Manifest:
    """Text shard directories → a token shard directory of `kind`, file for file, so groups, row counts and row ids
    are the input's (reused when its manifest exists). The manifest's schema is every column a group's files hold.

    cpus: per tokenizer actor; fractional so that it starts beside a Tune trial's reserved CPUs on a small machine."""
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        existing = load_manifest(out_dir)
        if existing.kind != kind:
            raise ShardError(f"{out_dir} holds {existing.kind} shards, not {kind}: delete it")
        return existing
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests = [load_manifest(d) for d in shard_dirs]
    files = [(g, p) for g, parts in merge_manifests(manifests).items() for p, _ in parts]
    if not files:
        raise ShardError(f"{shard_dirs}: no shards to tokenize")
    written = map_shards(ShardTokenizer, [{"index": i, "group": g, "path": str(p)} for i, (g, p) in enumerate(files)],
                         {"tokenizer_dir": str(tokenizer_dir), "out_dir": str(out_dir), "seq_len": seq_len,
                          "token_columns": token_columns}, concurrency, cpus,
                         sum(m.rows for m in manifests) <= IN_PROCESS_ROWS)
    groups: dict[str, list[ShardFile]] = {}
    schema: dict[str, str] = {}
    for r in sorted(written, key=lambda r: r["index"]):  # each group's files in their input order: same row ids
        groups.setdefault(r["group"], []).append(ShardFile(r["path"], int(r["rows"]), r["sha256"]))
        schema.update(json.loads(r["schema"]))
    manifest = Manifest(out_dir, kind, schema, groups,
                        {**manifests[0].stats, "seq_len": seq_len, "inputs": [str(d) for d in shard_dirs]})
    manifest.save()
    return manifest
