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


def test_lookup_with_a_tokenizer_holds_each_passages_ids_and_mask_key(tmp_path, data_root, small_tokenizer):
    """Written with the stage's tokenizer and seq_len, the lookup hands workers token ids (as the stage's token shards
    encode texts: cut at seq_len keeping <|eos|>) and content keys, so no worker tokenizes a negative; another seq_len
    rewrites it; a text-only lookup says it has no tokens."""
    import pytest

    from conan.data.dedup import content_keys
    from conan.data.public_sets import csl_rows
    from conan.tokenizer import encode_texts

    texts = [abstract for abstract, _ in csl_rows(data_root, "ts", "dev")][:500]
    pq.write_table(pa.table({"text": texts}), tmp_path / "passages.parquet")
    small_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    out = tmp_path / "passages.arrow"
    lookup = PassageLookup(write_passage_lookup(tmp_path / "passages.parquet", out, tmp_path / "tokenizer", 24, 128))
    ids = [499, 3, 128, 127]
    tokens, keys = lookup.take_tokens(ids)
    chosen = [texts[i] for i in ids]
    assert tokens == encode_texts(small_tokenizer, chosen, 24) and keys == content_keys(chosen).tolist()
    assert max(len(t) for t in tokens) == 24 and lookup.take(ids) == chosen
    longer = PassageLookup(write_passage_lookup(tmp_path / "passages.parquet", out, tmp_path / "tokenizer", 48))
    assert longer.take_tokens([499])[0] == encode_texts(small_tokenizer, [texts[499]], 48)
    with pytest.raises(ValueError, match="without a tokenizer"):
        PassageLookup(write_passage_lookup(tmp_path / "passages.parquet", out)).take_tokens([0])
