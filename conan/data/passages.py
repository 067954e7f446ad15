"""Passage text by id for the DHNM negatives, without any worker loading the corpus.

The pool hands a worker passage ids at the step that draws them, so their texts cannot be joined upstream. The
corpus (dhnm.passages: parquet, column `text`, id = row) is rewritten once, a record batch at a time, as an
uncompressed Arrow IPC file; each worker memory-maps it and takes the ids it needs. Only the pages of the passages
read are touched, they sit in the page cache that every worker of a node shares (file-backed, reclaimable), and a
lookup is a binary search over the file's batches plus an offset read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def write_passage_lookup(passages: str | Path, out: str | Path, batch_rows: int = 65_536) -> Path:
    """The lookup file for a passage parquet, written beside `out`'s stamp (source path, size, mtime) and reused
    while the parquet is unchanged."""
    src, out = Path(passages).resolve(), Path(out)
    stat = src.stat()
    stamp = {"source": str(src), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stamp_path = out.with_suffix(".json")
    if out.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    source = pq.ParquetFile(src)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.large_string())])) as w:
        for batch in source.iter_batches(batch_size=batch_rows, columns=["text"]):
            w.write_batch(pa.record_batch([batch.column(0).cast(pa.large_string())], names=["text"]))
    tmp.rename(out)
    stamp_path.write_text(json.dumps(stamp))
    return out


class PassageLookup:
    """Texts of passage ids from a memory-mapped lookup file (write_passage_lookup)."""

    def __init__(self, path: str | Path):
        self.texts = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().column("text")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, ids: Sequence[int]) -> list[str]:
        """The texts of these passage ids, in order."""
        return self.texts.take(pa.array(ids, pa.int64())).to_pylist()
