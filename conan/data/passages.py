"""Passages by id for the DHNM negatives, without any worker loading the corpus or tokenizing.

The pool hands a worker passage ids at the step that draws them, so their tokens cannot be joined upstream. The
corpus (dhnm.passages: parquet, column `text`, id = row) is rewritten once, a record batch at a time, as an
uncompressed Arrow IPC file holding each passage's text, token ids (as the stage's token shards encode texts) and
content key (the positive-copies mask's); each worker memory-maps it and takes the ids it needs. Only the pages of
the passages read are touched, they sit in the page cache that every worker of a node shares (file-backed,
reclaimable), and a lookup is a binary search over the file's batches plus an offset read. Mining reads the texts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.dedup import content_keys
from conan.data.tokenize import TokenEncoder, tokenizer_fingerprint


def write_passage_lookup(passages: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
                         seq_len: int = 0, batch_rows: int = 65_536) -> Path:
    """The lookup file for a passage parquet: texts, and with a tokenizer their token ids (cut at seq_len) and mask
    keys; written beside `out`'s stamp (source path, size, mtime, tokenizer, seq_len) and reused while they are
    unchanged."""
    from conan.tokenizer import load_tokenizer

    src, out = Path(passages).resolve(), Path(out)
    stat = src.stat()
    stamp = {"source": str(src), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "tokens": [tokenizer_fingerprint(tokenizer_dir), seq_len] if tokenizer_dir else None}
    stamp_path = out.with_suffix(".json")
    if out.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    encoder = TokenEncoder(load_tokenizer(tokenizer_dir), seq_len) if tokenizer_dir else None
    fields = [("text", pa.large_string())] + ([("ids", encoder.type), ("key", pa.int64())] if encoder else [])
    schema = pa.schema(fields)
    source = pq.ParquetFile(src)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        for batch in source.iter_batches(batch_size=batch_rows, columns=["text"]):
            columns = [batch.column(0).cast(pa.large_string())]
            if encoder:
                texts = batch.column(0).to_pylist()
                columns += [encoder.ids(texts), pa.array(content_keys(texts), pa.int64())]
            w.write_batch(pa.record_batch(columns, schema=schema))
    tmp.rename(out)
    stamp_path.write_text(json.dumps(stamp))
    return out


class PassageLookup:
    """Texts, token ids and mask keys of passage ids from a memory-mapped lookup file (write_passage_lookup)."""

    def __init__(self, path: str | Path):
        self.table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, ids: Sequence[int]) -> list[str]:
        """The texts of these passage ids, in order."""
        return self.table.column("text").take(pa.array(ids, pa.int64())).to_pylist()

    def take_tokens(self, ids: Sequence[int]) -> tuple[list[list[int]], list[int]]:
        """(token ids, mask keys) of these passage ids, in order."""
        if "ids" not in self.table.column_names:
            raise ValueError("this passage lookup was written without a tokenizer (texts only)")
        rows = self.table.select(["ids", "key"]).take(pa.array(ids, pa.int64()))
        return rows.column("ids").to_pylist(), rows.column("key").to_pylist()
