"""A stage's input files, as users write them: every row is kept as given or rejected with its reason, line and raw
text, and counted; one bad line costs that line (no Ray: the sharding runs in process)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conan.config import JobConfig, load_config
from conan.data.shards import ShardError, convert, input_files, load_manifest
from conan.train.stages import stage_class


def shard(tmp_path, stage: str, *inputs, name: str = "out"):
    """convert() with the stage's row spec; returns (kept rows in manifest order, rejects, stats)."""
    spec = stage_class(stage).row_spec(load_config(JobConfig, f"jobs/configs/{stage}_tiny.yaml"))
    manifest = convert([str(p) for p in inputs], tmp_path / name, stage_class(stage).input_kind, spec)
    rows = [r for g in sorted(manifest.groups) for f in manifest.groups[g]
            for r in pq.read_table(manifest.directory / f.path).to_pylist()]
    rejects = [r for f in sorted((manifest.directory / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return rows, rejects, manifest.stats


def lines(path, *texts: str | bytes, end: bytes = b"\n"):
    """A JSON-lines file of these lines (dicts are dumped)."""
    path.write_bytes(end.join(t if isinstance(t, bytes) else (json.dumps(t) if isinstance(t, dict) else t).encode()
                              for t in texts))
    return path


def test_pretraining_lines_are_kept_exactly_or_rejected_with_reason_and_line(tmp_path):
    """A BOM, CRLF endings, blank lines and a last line without newline are layout; a null, missing, blank or
    non-text value, a line that is not JSON and one that is not UTF-8 are one reject each, not a failed file."""
    path = lines(tmp_path / "docs.jsonl", b"\xef\xbb\xbf" + b'{"text": "first"}', {"text": None}, {"txt": "typo"},
                 b"", {"text": ""}, {"text": "   "}, {"text": 7}, b"{not json", b'{"text": "caf\xe9"}',
                 {"text": "second", "extra": {"nested": [1]}}, b"[1, 2]", {"text": "last"}, end=b"\r\n")
    rows, rejects, stats = shard(tmp_path, "pretrain", path)
    assert [r["text"] for r in rows] == ["first", "second", "last"]
    assert [(r["origin"].rsplit(":", 1)[1], r["reject_reason"]) for r in rejects] == [
        ("2", "missing_field:text"), ("3", "missing_field:text"), ("5", "empty_text:text"), ("6", "empty_text:text"),
        ("7", "wrong_type:text"), ("8", "bad_json"), ("9", "bad_utf8"), ("11", "not_an_object")]
    assert rejects[0]["raw"] == '{"text": null}' and rejects[0]["origin"].startswith(str(path))
    assert stats["rows_in"] == 11 and stats["rejected"] == 8 and sum(stats["reasons"].values()) == 8


def test_a_clean_file_parses_in_blocks_and_a_bad_chunk_loses_only_its_bad_line(tmp_path, monkeypatch):
    """Lines parse a chunk at a time; a chunk with one line of another type is parsed line by line: its other rows
    are kept, in order, and the line numbers carry across chunks."""
    monkeypatch.setattr("conan.data.input_rows.CHUNK_BYTES", 4096)
    texts = [{"text": f"document {i} " * (i % 7 + 1)} for i in range(600)]
    texts[350] = {"text": ["not", "a", "string"]}
    texts[420] = {"text": "lone \ud800 surrogate"}
    rows, rejects, stats = shard(tmp_path, "pretrain", lines(tmp_path / "docs.jsonl", *texts))
    assert [r["text"] for r in rows] == [t["text"] for i, t in enumerate(texts) if i not in (350, 420)]
    assert [(r["origin"].rsplit(":", 1)[1], r["reject_reason"]) for r in rejects] == [
        ("351", "wrong_type:text"), ("421", "invalid_unicode:text")]
    assert stats["rows_in"] == 600


def test_a_lines_reason_does_not_depend_on_its_neighbours(tmp_path):
    """Bytes that are not UTF-8 (in a field the stage reads or not), NaN, an object over two lines and two objects on
    one line: the same rejects and line numbers whether the chunk's other lines parse or not; CR-only line ends (old
    Macs) are lines."""
    bad = [b'{"text": "caf\xe9"}', b'{"text": "fine", "meta": "caf\xe9"}', b'{"text":', b' "split"}',
           b'{"text": "a"} {"text": "b"}']
    for neighbour in (b'{"text": "ok"}', b"{oops"):
        rows, rejects, _ = shard(tmp_path, "pretrain", lines(tmp_path / "docs.jsonl", neighbour, *bad,
                                                             {"text": "end"}), name=f"out-{neighbour[-3:].decode()}")
        got = [(r["origin"].rsplit(":", 1)[1], r["reject_reason"]) for r in rejects]
        assert got[-5:] == [("2", "bad_utf8"), ("3", "bad_utf8"), ("4", "bad_json"), ("5", "bad_json"),
                            ("6", "bad_json")]
        assert [r["text"] for r in rows] == (["ok", "end"] if b"ok" in neighbour else ["end"])
    sts = lines(tmp_path / "sts.jsonl", b'{"task": "sts", "s1": "a", "s2": "b", "score": NaN}', b"{oops",
                {"task": "sts", "s1": "a", "s2": "b", "score": 1})
    assert [r["reject_reason"] for r in shard(tmp_path, "supervised", sts, name="sts")[1]] == [
        "not_finite:score", "bad_json"]
    rows, rejects, stats = shard(tmp_path, "pretrain", lines(tmp_path / "mac.jsonl", {"text": "a"}, {"text": "b"}, b"",
                                                             b"{no", {"text": "c"}, end=b"\r"), name="mac")
    assert [r["text"] for r in rows] == ["a", "b", "c"] and stats["rows_in"] == 4
    assert [r["origin"].rsplit(":", 1)[1] for r in rejects] == ["4"]


def test_weak_pairs_take_each_rows_own_alias_and_rows_without_group_values_are_one_group(tmp_path):
    """input/output or curation's query/positive, row by row; lang and source default to "" and rows without them
    form the group `all` (they were dropped, or the file refused as empty)."""
    path = lines(tmp_path / "pairs.jsonl", {"input": "q1", "output": "p1"}, {"query": "q2", "positive": "p2"},
                 {"input": "q3", "output": "p3", "lang": "en"}, {"query": "q4", "output": None})
    rows, rejects, _ = shard(tmp_path, "weak", path)
    assert sorted((r["input"], r["output"], r["lang"]) for r in rows) == [("q1", "p1", ""), ("q2", "p2", ""),
                                                                          ("q3", "p3", "en")]
    assert [r["reject_reason"] for r in rejects] == ["missing_field:output"]


def test_supervised_rows_need_their_own_tasks_columns_only(tmp_path):
    """An STS-only file and (query, positive) pairs without negatives are inputs; a row misses what its task needs
    (an STS pair without a score was trained as 0.0), a score that is not finite (or beyond float32), an unknown or
    blank task, a null negative are rejects."""
    sts = lines(tmp_path / "sts.jsonl", {"task": "sts", "s1": "a", "s2": "b", "score": 4.5},
                {"task": "sts", "s1": "a", "s2": "b"}, b'{"task": "sts", "s1": "a", "s2": "b", "score": NaN}',
                {"task": "sts", "s1": "a", "s2": "b", "score": 1e39}, {"task": "sts", "s1": "a", "s2": "b", "score": 3})
    pairs = lines(tmp_path / "pairs.jsonl", {"task": "retrieval", "query": "q", "positive": "p", "lang": "en"},
                  {"task": "retrieval", "query": "q", "positive": "p", "doc_lang": "de"},
                  {"task": "retrieval", "query": "q", "positive": "p", "negatives": ["n", None]},
                  {"task": "ranking", "query": "q", "positive": "p"}, {"task": "", "query": "q", "positive": "p"},
                  {"task": "classification", "query": "  ", "positive": "p"})
    rows, rejects, stats = shard(tmp_path, "supervised", sts, pairs)
    assert sorted((r["task"], r["lang"], r["score"], r["negatives"]) for r in rows) == [
        ("retrieval", "de", 0.0, []), ("retrieval", "en", 0.0, []), ("sts", "", 3.0, []), ("sts", "", 4.5, [])]
    assert [r["reject_reason"] for r in rejects] == [
        "missing_field:score", "not_finite:score", "not_finite:score",
        "wrong_type:negatives", "unknown_task", "empty_text:task", "empty_text:query"]
    assert stats["reasons"]["not_finite:score"] == 2 and stats["rows_in"] == 11


def test_integer_query_ids_are_their_decimal_text(tmp_path):
    """MS MARCO's query ids are numbers: in JSON lines and in parquet they are the ids' text (every row was a
    wrong_type:query_id reject)."""
    jsonl = lines(tmp_path / "rows.jsonl", *[{"task": "retrieval", "query_id": i, "query": f"q{i}", "positive": "p"}
                                            for i in range(3)], {"task": "retrieval", "query_id": "x7", "query": "q",
                                                                 "positive": "p"})
    pq.write_table(pa.table({"task": ["retrieval"], "query_id": [11], "query": ["q"], "positive": ["p"]}),
                   tmp_path / "rows.parquet")
    rows, rejects, _ = shard(tmp_path, "supervised", jsonl, tmp_path / "rows.parquet")
    assert sorted(r["query_id"] for r in rows) == ["0", "1", "11", "2", "x7"] and not rejects


def test_parquet_columns_of_other_types_are_read_or_their_rows_rejected(tmp_path):
    """Dictionary-encoded and large strings, int32 ids: the same values; a text column of numbers: every row a
    reject, and an input with no row left is one line naming the rejects."""
    table = pa.table({"task": pa.array(["retrieval", "retrieval"]).dictionary_encode(),
                      "query": pa.array(["q1", "q2"], pa.large_string()), "positive": ["p1", "p2"],
                      "positive_id": pa.array([3, 4], pa.int32())})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows, _, _ = shard(tmp_path, "supervised", tmp_path / "rows.parquet")
    assert [(r["query"], r["positive_id"]) for r in rows] == [("q1", 3), ("q2", 4)]
    ids = pa.table({"task": ["retrieval"] * 4, "query": ["q1", "q2", "q3", "q4"], "positive": ["p"] * 4,
                    "positive_id": pa.array([3.0, float("nan"), 3.5, None]),
                    "query_id": pa.array(["a", "b", "c", "d"], pa.string_view())})
    pq.write_table(ids, tmp_path / "ids.parquet")  # pandas writes a nullable int as double; pyarrow string_view
    rows, rejects, _ = shard(tmp_path, "supervised", tmp_path / "ids.parquet", name="ids")
    assert [(r["query"], r["query_id"], r["positive_id"]) for r in rows] == [("q1", "a", 3), ("q2", "b", -1),
                                                                             ("q4", "d", -1)]
    assert [r["reject_reason"] for r in rejects] == ["wrong_type:positive_id"]
    unsigned = pa.table({"task": ["retrieval"] * 2, "query": ["q", "q"], "positive": ["p", "p"],
                         "positive_id": pa.array([1, 2**63], pa.uint64())})
    pq.write_table(unsigned, tmp_path / "unsigned.parquet")
    assert [r["reject_reason"] for r in shard(tmp_path, "supervised", tmp_path / "unsigned.parquet",
                                              name="unsigned")[1]] == ["wrong_type:positive_id"]
    utf8 = pa.table({"text": pa.array([b"fine", b"caf\xe9", b"also fine"], pa.binary()).view(pa.string())})
    pq.write_table(utf8, tmp_path / "utf8.parquet")  # parquet keeps a string column's bytes unchecked
    rows, rejects, _ = shard(tmp_path, "pretrain", tmp_path / "utf8.parquet", name="utf8")
    assert [r["text"] for r in rows] == ["fine", "also fine"]
    assert [(r["origin"].rsplit(":", 1)[1], r["reject_reason"]) for r in rejects] == [("2", "bad_utf8:text")]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ShardError, match=r"no rows to train on; 2 of 2 rows rejected \(wrong_type:text 2\) → .*rejects"):
        shard(tmp_path, "pretrain", tmp_path / "numbers.parquet", name="numbers")


def test_a_directory_is_read_whole_or_refused_naming_what_it_cannot_read(tmp_path):
    """Gzip'd and upper-case JSON lines are read (they were left out without a word); an empty file has no rows;
    _SUCCESS and dot files are not data; any other file is an error naming it."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["from parquet"]}), folder / "a.parquet")
    lines(folder / "b.jsonl", {"text": "from jsonl"})
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "from gzip"}\n'))
    lines(folder / "d.JSONL", {"text": "upper case"})
    (folder / "e.jsonl").write_bytes(b"")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "README.md").write_text("# a dataset card")  # a Hugging Face dataset folder's
    rows, _, stats = shard(tmp_path, "pretrain", folder)
    assert [r["text"] for r in rows] == ["from parquet", "from jsonl", "from gzip", "upper case"]
    assert stats["rows_in"] == 4
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ShardError, match=r"1 file\(s\) neither parquet nor JSON lines \(.*notes.txt\)"):
        input_files([folder])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(ShardError, match=r"cut.jsonl.gz: cannot be read"):
        shard(tmp_path, "pretrain", tmp_path / "cut.jsonl.gz", name="cut")


def test_a_sample_counts_its_rejects_among_the_rows_it_draws(tmp_path):
    """data.max_rows draws rows by position (blank lines not counted); a drawn bad row is a reject of the sample."""
    path = lines(tmp_path / "docs.jsonl", *[{"text": f"d{i}"} if i % 10 else {"text": ""} for i in range(1000)])
    spec = stage_class("pretrain").row_spec(load_config(JobConfig, "jobs/configs/pretrain_tiny.yaml"))
    manifest = convert([str(path)], tmp_path / "out", "documents", spec, max_rows=200, seed=3)
    assert manifest.stats["rows_in"] == 200 and manifest.rows + manifest.stats["rejected"] == 200
    assert manifest.stats["reasons"] == {"empty_text:text": manifest.stats["rejected"]} and manifest.stats["rejected"]
    assert load_manifest(tmp_path / "out").rows == manifest.rows
