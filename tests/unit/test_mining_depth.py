"""Mining searches deep enough: the false-negative guard drops the best passages, and a query must still get k."""

import numpy as np

from conan.data.mining import MiningConfig, mine_candidates


def test_every_query_with_enough_candidates_under_the_guard_gets_k():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(400, 16)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # Positives are random passages: their median rank is deep, so most of the top passages sit above the guard.
    positives = [{int(p)} for p in rng.integers(0, 400, size=50)]
    cfg = MiningConfig(top_k=10, false_negative_ratio=0.95, index="flat")
    mined = mine_candidates(queries, corpus, list(range(400)), positives, cfg)
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
