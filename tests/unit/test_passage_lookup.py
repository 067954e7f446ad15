"""The DHNM passages' lookup file: ids → texts from a memory-mapped Arrow file, rewritten only when the corpus changes."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.passages import PassageLookup, write_passage_lookup


def test_lookup_returns_the_texts_of_ids_across_batches_and_is_reused(tmp_path, data_root):
    """Real CSL abstracts as a user's corpus, written 300 rows a batch: any ids (out of order, repeated, across
    batches) read back their rows; the file is memory-mapped (its buffers are not this process's heap) and rewritten
    only when the parquet changes."""
    from conan.data.public_sets import csl_rows

    texts = [abstract for split in ("dev", "test") for abstract, _ in csl_rows(data_root, "ts", split)]
    pq.write_table(pa.table({"text": texts, "other": list(range(len(texts)))}), tmp_path / "passages.parquet")
    out = write_passage_lookup(tmp_path / "passages.parquet", tmp_path / "lookup" / "passages.arrow", batch_rows=300)
    heap = pa.total_allocated_bytes()
    lookup = PassageLookup(out)
    assert pa.total_allocated_bytes() == heap  # zero-copy: the texts stay in the mapped file
    ids = [len(texts) - 1, 0, 300, 299, 300, 1234]
    assert len(lookup) == len(texts) > 1500 and lookup.take(ids) == [texts[i] for i in ids]
    written = out.stat().st_mtime_ns
    assert write_passage_lookup(tmp_path / "passages.parquet", out) == out and out.stat().st_mtime_ns == written
    pq.write_table(pa.table({"text": texts[:10]}), tmp_path / "passages.parquet")
    os.utime(tmp_path / "passages.parquet", ns=(written + 1, written + 1))
    assert len(PassageLookup(write_passage_lookup(tmp_path / "passages.parquet", out))) == 10
