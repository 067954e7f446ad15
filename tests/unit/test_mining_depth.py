"""Mining searches deep enough: the false-negative guard drops the best passages, and a query must still get k."""

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.mining import MiningConfig, mine_candidates, query_chunks, scan_queries


def unit_rows(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    """n random unit vectors."""
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_every_query_with_enough_candidates_under_the_guard_gets_k():
    rng = np.random.default_rng(0)
    corpus, queries = unit_rows(rng, 400), unit_rows(rng, 50)
    # Positives are random passages: their median rank is deep, so most of the top passages sit above the guard.
    positives = [{int(p)} for p in rng.integers(0, 400, size=50)]
    mined = mine_candidates(queries, [corpus], positives, 10, 0.95, MiningConfig(index="flat"))
    scores = queries @ corpus.T
    short = 0
    for q, (ids, s) in enumerate(mined):
        pos = next(iter(positives[q]))
        limit = scores[q, pos] - 0.05 * abs(scores[q, pos])
        eligible = [j for j in np.argsort(-scores[q]) if j != pos and scores[q, j] <= limit + 1e-6]
        expected = eligible[:10]
        assert ids == [int(j) for j in expected], q  # the k best passages under the guard, ranked
        assert all(x <= limit + 1e-6 for x in s) and pos not in ids
        short += len(eligible) < 10
    assert short < 10  # most queries do have k candidates under the guard (the test would pass vacuously otherwise)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_approximate_index_leaves_no_query_short(kind):
    """A topic of 6,000 near-copies among 20,000 passages: the guard rules out every copy scoring near the positive,
    so a query's candidates lie deep. HNSW returns a few hundred rows however deep it is asked (it left queries
    with 0 to 15 candidates where thousands exist), an IVF index probes an eighth of its lists; the exact pass
    still gives each query 30 under the guard (the best 30 with the flat index)."""
    rng = np.random.default_rng(0)
    center = unit_rows(rng, 1, 32)
    topic = center + 0.05 * rng.normal(size=(6000, 32)).astype(np.float32)
    corpus = np.concatenate([topic / np.linalg.norm(topic, axis=1, keepdims=True), unit_rows(rng, 14000, 32)])
    queries = center + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    positives = [{q} for q in range(20)]
    mined = mine_candidates(queries, [corpus], positives, 30, 0.95, MiningConfig(index=kind, query_batch=7))
    scores = queries @ corpus.T
    for q, (ids, s) in enumerate(mined):
        limit = scores[q, q] - 0.05 * abs(scores[q, q])
        eligible = [int(j) for j in np.argsort(-scores[q], kind="stable") if j != q and scores[q, j] <= limit]
        assert len(eligible) > 1000 and len(ids) == 30 and q not in ids, q
        assert np.allclose(s, scores[q, ids], atol=1e-5) and max(s) <= limit + 1e-5 and s == sorted(s, reverse=True)
        if kind == "flat":
            assert ids == eligible[:30], q


def test_shards_searched_one_at_a_time_merge_into_the_single_index_result():
    """The corpus split into 3 uneven shards, queries searched 7 at a time: the same candidates and scores."""
    rng = np.random.default_rng(1)
    corpus, queries = unit_rows(rng, 300), unit_rows(rng, 40)
    positives = [{int(p)} for p in rng.integers(0, 300, size=40)]
    whole = mine_candidates(queries, [corpus], positives, 12, 0.95, MiningConfig(index="flat"))
    sharded = mine_candidates(queries, [corpus[:70], corpus[70:250], corpus[250:]], positives, 12, 0.95,
                              MiningConfig(index="flat", query_batch=7))
    assert [ids for ids, _ in sharded] == [ids for ids, _ in whole]
    assert all(np.allclose(a, b, atol=1e-6) for (_, a), (_, b) in zip(sharded, whole))
    assert any(max(ids) >= 250 for ids, _ in sharded) and any(min(ids) < 70 for ids, _ in sharded)


def test_shard_files_index_is_built_once_and_read_back(tmp_path):
    """Shards given as .npy files with an IVF index: the first search writes each shard's index beside it, later
    searches (another query chunk, a deeper pass) read it, and the candidates equal those of in-memory shards."""
    rng = np.random.default_rng(2)
    corpus, queries = unit_rows(rng, 600, 32), unit_rows(rng, 30, 32)
    paths = [tmp_path / "emb-000000.npy", tmp_path / "emb-000001.npy"]
    np.save(paths[0], corpus[:350])
    np.save(paths[1], corpus[350:])
    positives = [{int(p)} for p in rng.integers(0, 600, size=30)]
    cfg = MiningConfig(index="ivf")
    in_memory = mine_candidates(queries, [corpus[:350], corpus[350:]], positives, 8, 0.95, cfg)
    first = mine_candidates(queries, paths, positives, 8, 0.95, cfg)
    indexes = sorted(tmp_path.glob("*.faiss"))
    assert [p.name.split(".")[0] for p in indexes] == ["emb-000000", "emb-000001"]
    stamps = [p.stat().st_mtime_ns for p in indexes]
    again = mine_candidates(queries[:10], paths, positives[:10], 8, 0.95, cfg)
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("*.faiss"))] == stamps  # read, not rebuilt
    assert [ids for ids, _ in first] == [ids for ids, _ in in_memory]
    assert [ids for ids, _ in again] == [ids for ids, _ in first[:10]]


def test_queries_stream_from_shard_files_as_arrays(tmp_path):
    """Mining's queries read from shard files: rows of the mined tasks with a query_id, one entry per query id (its
    first row, in file order) with every positive of its rows, texts read back `chunk` at a time."""
    def rows(*spec):
        return pa.Table.from_pylist([{"task": t, "query_id": q, "query": f"text {q}", "positive_id": p}
                                     for t, q, p in spec])
    pq.write_table(rows(("retrieval", "a", 1), ("sts", "", -1), ("clr", "b", 2), ("retrieval", "", 3)),
                   tmp_path / "0.parquet")
    pq.write_table(rows(("classification", "k", 4), ("retrieval", "c", 5), ("retrieval", "a", 6),
                        ("clr", "d", 7), ("retrieval", "e", 8)), tmp_path / "1.parquet")
    files = [tmp_path / "0.parquet", tmp_path / "1.parquet"]
    queries = scan_queries(files, ["retrieval", "clr"], batch_rows=2)
    assert len(queries) == 5 and queries.file.tolist() == [0, 0, 1, 1, 1] and queries.row.tolist() == [0, 2, 1, 3, 4]
    chunks = list(query_chunks(queries, 2, batch_rows=2))
    assert [ids for ids, _, _ in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert chunks[0][1] == ["text a", "text b"]
    assert [p for _, _, ps in chunks for p in ps] == [{1, 6}, {2}, {5}, {7}, {8}]
    assert len(scan_queries(files, ["sts"])) == 0


def test_positive_ids_beyond_the_passage_corpus_are_one_error(tmp_path, small_embedding_model_dir):
    """positive_id is a row number of dhnm.passages: rows naming ids past its end (the corpus of another dataset)
    stop mining before any embedding, naming how many (mining went on, and those positives could be mined as
    negatives)."""
    from conan.data.mining import mine_supervised_candidates
    from conan.data.passages import write_passage_lookup

    pq.write_table(pa.table({"text": ["one passage", "another passage"]}), tmp_path / "passages.parquet")
    lookup = write_passage_lookup(tmp_path / "passages.parquet", tmp_path / "passages.arrow")
    pq.write_table(pa.table({"task": ["retrieval"] * 3, "query_id": ["a", "b", "c"], "positive_id": [0, 5, 9]}),
                   tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"2 rows name a positive_id beyond the 2 passages of dhnm.passages "
                                         r"\(largest 9\)"):
        mine_supervised_candidates(small_embedding_model_dir, [tmp_path / "rows.parquet"], ["retrieval"], lookup,
                                   tmp_path / "mined.parquet", 5, 0.05, MiningConfig())
