"""Mining searches deep enough: the false-negative guard drops the best passages, and a query must still get k."""

import numpy as np

from conan.data.mining import MiningConfig, mine_candidates


def unit_rows(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    """n random unit vectors."""
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_every_query_with_enough_candidates_under_the_guard_gets_k():
    rng = np.random.default_rng(0)
    corpus, queries = unit_rows(rng, 400), unit_rows(rng, 50)
    # Positives are random passages: their median rank is deep, so most of the top passages sit above the guard.
    positives = [{int(p)} for p in rng.integers(0, 400, size=50)]
    cfg = MiningConfig(top_k=10, false_negative_ratio=0.95, index="flat")
    mined = mine_candidates(queries, [corpus], positives, cfg)
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


def test_shards_searched_one_at_a_time_merge_into_the_single_index_result():
    """The corpus split into 3 uneven shards, queries searched 7 at a time: the same candidates and scores."""
    rng = np.random.default_rng(1)
    corpus, queries = unit_rows(rng, 300), unit_rows(rng, 40)
    positives = [{int(p)} for p in rng.integers(0, 300, size=40)]
    cfg = MiningConfig(top_k=12, false_negative_ratio=0.95, index="flat")
    whole = mine_candidates(queries, [corpus], positives, cfg)
    sharded = mine_candidates(queries, [corpus[:70], corpus[70:250], corpus[250:]], positives,
                              MiningConfig(top_k=12, false_negative_ratio=0.95, index="flat", query_batch=7))
    assert [ids for ids, _ in sharded] == [ids for ids, _ in whole]
    assert all(np.allclose(a, b, atol=1e-6) for (_, a), (_, b) in zip(sharded, whole))
    assert any(max(ids) >= 250 for ids, _ in sharded) and any(min(ids) < 70 for ids, _ in sharded)
