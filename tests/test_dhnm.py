"""Dynamic hard-negative mining: eq. 6 on hand-made score sequences, pool exhaustion, the shared actor."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from conan.dhnm import (NegativePoolClient, NegativePoolState, ReplacementRule, create_negative_pools, pool_arrays,
                        query_keys, shards_of)

Q = query_keys(["q"])  # the one query of the hand-made pools


def test_rule_branches_of_eq6():
    rule = ReplacementRule()
    assert rule.replace(0.39, None) and not rule.replace(0.4, None)  # first sight: S0 < 0.4
    assert rule.replace(0.6, 0.49)            # 1.2 · 0.49 = 0.588 < 0.6 and 0.49 < 0.7
    assert not rule.replace(0.6, 0.5)         # 1.2 · 0.5 = 0.6, not < 0.6
    assert not rule.replace(0.95, 0.75)       # dropped a lot but still ≥ 0.7: still hard
    assert rule.replace(0.95, 0.69)           # 0.828 < 0.95 and < 0.7
    assert not rule.replace(0.5, 0.6)         # score rose
    custom = ReplacementRule(first_sight_min=0.2, decay_factor=1.5, stale_max=0.9)
    assert not custom.replace(0.3, None) and custom.replace(0.9, 0.5)


def _pool(n_candidates=10, num_active=3):
    state = NegativePoolState(num_active=num_active)
    state.load_candidates({"q": list(range(100, 100 + n_candidates))})
    return state


def test_a_pool_left_with_no_query_serves_every_query_its_static_negatives():
    """Every query had fewer candidates than the active slots (a small corpus, a collapsed model): the shard holds
    none, and assign answers None for each (it indexed an empty array and the stage failed)."""
    state = NegativePoolState(num_active=3)
    state.load_arrays(np.zeros(0, np.int64), np.zeros((0, 5), np.int32))
    assert state.assign([7, 8]) == [None, None]


def test_first_sight_sets_s0_and_replaces_easy_negatives():
    state = _pool()
    assert state.assign(Q) == [[100, 101, 102]]
    state.report(Q, [[100, 101, 102]], [[0.9, 0.3, 0.5]])  # 101 is easy at first sight
    assert state.assign(Q) == [[100, 103, 102]]
    # scores are kept as float32: 0.9 reads back as float32(0.9)
    assert state.active_scores(Q[0]) == {100: (float(np.float32(0.9)), None), 103: (None, None),
                                         102: (float(np.float32(0.5)), None)}
    assert state.counters["replacements"] == 1 and state.counters["first_sight_replacements"] == 1


def test_decayed_negative_is_replaced_only_when_both_conditions_hold():
    state = _pool()
    state.report(Q, [[100, 101, 102]], [[0.9, 0.8, 0.6]])  # S0s
    state.report(Q, [[100, 101, 102]], [[0.72, 0.6, 0.55]])
    # 100: 1.2·0.72 = 0.864 < 0.9 but 0.72 ≥ 0.7 → keep; 101: 0.72 < 0.8 and 0.6 < 0.7 → replace;
    # 102: 0.66 ≥ 0.6 → keep.
    assert state.assign(Q) == [[100, 103, 102]]
    state.report(Q, [[100]], [[0.69]])  # now 0.69 < 0.7 and 0.828 < 0.9
    assert state.assign(Q) == [[104, 103, 102]]


def test_stale_report_for_a_replaced_negative_is_ignored():
    state = _pool()
    state.report(Q, [[101]], [[0.1]])  # replaced by 103
    state.report(Q, [[101]], [[0.1]])  # late duplicate: 101 is no longer active
    assert state.assign(Q) == [[100, 103, 102]] and state.counters["replacements"] == 1


def test_exhausted_pool_keeps_the_negative_and_counts():
    state = _pool(n_candidates=4)
    state.report(Q, [[100, 101, 102]], [[0.1, 0.1, 0.1]])  # one replacement left (103)
    assert state.assign(Q) == [[103, 101, 102]]
    assert state.counters == {"reports": 3, "replacements": 1, "first_sight_replacements": 1, "exhausted": 2}


def test_state_round_trip_is_exact():
    state = _pool()
    state.report(Q, [[100, 101, 102]], [[0.9, 0.3, 0.5]])
    copy = NegativePoolState(num_active=3)
    copy.load_state_dict(state.state_dict())
    assert pickle.dumps(copy.state_dict()) == pickle.dumps(state.state_dict()) and copy.stats() == state.stats()
    copy.report(Q, [[100]], [[0.1]])  # the copy owns its arrays
    assert state.assign(Q) != copy.assign(Q)


def test_pools_are_dense_arrays_with_incremental_stats():
    """Many queries with unequal candidate counts: lookups by key, unknown queries unmanaged, the mean active score
    kept as reports arrive equals the one computed from the arrays, and a key collision is refused."""
    pools = {f"q{i}": list(range(1000 * i, 1000 * i + 7 + i % 5)) for i in range(50)}
    state = NegativePoolState(num_active=7)
    state.load_candidates(pools)
    keys = query_keys(["q7", "nope", "q3"])
    assert state.assign(keys) == [pools["q7"][:7], None, pools["q3"][:7]]
    assert state.candidates.dtype == np.int32 and state.s0.dtype == np.float32 and len(state.keys) == 50
    rng = np.random.default_rng(0)
    for _ in range(30):
        names = [f"q{i}" for i in rng.choice(50, 8, replace=False)]
        assigned = state.assign(query_keys(names))
        state.report(query_keys(names), assigned, rng.uniform(0, 1, (8, 7)).tolist())
    latest = np.where(np.isnan(state.si), state.s0, state.si)
    expected = float(np.nanmean(latest))
    assert state.stats()["mean_active_score"] == pytest.approx(expected, abs=1e-6)
    assert state.stats()["replacements"] > 0 and state.stats()["exhausted"] > 0
    with pytest.raises(KeyError):
        state.report(query_keys(["nope"]), [[1]], [[0.5]])
    with pytest.raises(ValueError, match="share a 64-bit key"):
        state.load_arrays(np.array([5, 5]), np.zeros((2, 7), np.int32))


def test_sharded_actors_route_queries_and_apply_reports(ray_cluster):
    pools = {f"q{i}": list(range(i * 100, i * 100 + 12)) for i in range(20)}
    owner = create_negative_pools(*pool_arrays(pools), "test-dhnm", num_shards=3, num_active=7)
    client = NegativePoolClient.connect(owner.names)  # as a train worker does
    assert len(set(shards_of(query_keys(list(pools)), 3).tolist())) == 3  # the 20 queries spread over 3 actors
    assert client.assign(["q3", "q17"]) == [list(range(300, 307)), list(range(1700, 1707))]
    client.report(["q3"], [[300, 301]], [[0.1, 0.9]])
    client.flush()
    assert client.assign(["q3"]) == [[307, 301, 302, 303, 304, 305, 306]]
    stats = client.stats()
    assert stats["replacements"] == 1 and stats["queries"] == 20 and stats["reports"] == 2
    # Three negatives scored 0.5 on another shard: the mean weighs every scored negative (0.9 + 3 × 0.5) / 4, not
    # each shard's mean alike ((0.9 + 0.5) / 2).
    other = next(q for q in pools if shards_of(query_keys([q]), 3)[0] != shards_of(query_keys(["q3"]), 3)[0])
    first = pools[other][:3]
    client.report([other], [first], [[0.5] * 3])
    client.flush()
    stats = client.stats()
    assert stats["scored_active"] == 4 and stats["mean_active_score"] == pytest.approx(0.6, abs=1e-6)
    saved = client.state_dict()
    client.report(["q3"], [[301]], [[0.0]])
    client.flush()
    client.load_state_dict(saved)
    assert client.assign(["q3"]) == [[307, 301, 302, 303, 304, 305, 306]]


def test_a_prefetched_assign_holds_the_reports_sent_before_it_and_serves_only_the_same_queries(ray_cluster):
    pools = {f"q{i}": list(range(i * 100, i * 100 + 12)) for i in range(8)}
    owner = create_negative_pools(*pool_arrays(pools), "test-dhnm-prefetch", num_shards=2, num_active=7)
    client = NegativePoolClient.connect(owner.names)
    # The training loop's order: report step t's scores, prefetch step t+1's queries, assign them at step t+1. The
    # report is submitted, not awaited: the prefetch still sees its replacement (one caller's calls run in order).
    client.report(["q3"], [[300, 301]], [[0.1, 0.9]])
    client.prefetch(["q3", "q5"])
    client.report(["q5"], [[500, 501]], [[0.1, 0.9]])  # after the prefetch: not in its answer
    assert client.assign(["q3", "q5"]) == [[307, 301, 302, 303, 304, 305, 306], list(range(500, 507))]
    client.flush()
    assert client.assign(["q5"]) == [[507, 501, 502, 503, 504, 505, 506]]  # asked anew: the later report shows
    # A prefetch serves only an assign of exactly its queries, once.
    client.prefetch(["q5"])
    client.report(["q5"], [[502]], [[0.1]])
    client.flush()
    assert client.assign(["q5", "q3"])[0] == [507, 501, 508, 503, 504, 505, 506]
    assert client.prefetched is None and client.assign(["q5"]) == [[507, 501, 508, 503, 504, 505, 506]]


def test_a_replacement_reported_by_one_worker_is_what_another_worker_gets(ray_cluster):
    import ray

    owner = create_negative_pools(*pool_arrays({"q": list(range(20))}), "test-dhnm-share", num_shards=2, num_active=7)

    @ray.remote(num_cpus=0.1)
    def worker(action, names):
        client = NegativePoolClient.connect(names)
        if action == "report":
            client.report(["q"], [[0, 1]], [[0.9, 0.2]])  # negative 1 is easy at first sight
            client.flush()
            return None
        return client.assign(["q"])[0]

    ray.get(worker.remote("report", owner.names))
    assert ray.get(worker.remote("assign", owner.names)) == [0, 7, 2, 3, 4, 5, 6]


def test_a_restarted_shard_refuses_to_serve_until_restored_or_reset(ray_cluster):
    """A pool shard whose process dies (as with its node) is restarted by Ray from the mined arrays it was created
    with, and answers PoolStateLost (so training resumes from its last checkpoint) until a checkpoint's state is
    loaded into it, or the run starts over (reset: the mined candidates again)."""
    import os

    import ray

    owner = create_negative_pools(*pool_arrays({"q": list(range(20))}), "test-dhnm-restart", num_active=7)
    owner.report(["q"], [[0, 1]], [[0.9, 0.2]])  # negative 1 replaced by candidate 7
    saved = owner.state_dict()
    owner.report(["q"], [[2]], [[0.1]])
    assert owner.assign(["q"]) == [[0, 7, 8, 3, 4, 5, 6]]
    pid = ray.get(owner.actors[0].__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, 9)
    with pytest.raises(ray.exceptions.RayTaskError, match="was restarted"):
        owner.assign(["q"])  # waits for the restart, then refuses
    with pytest.raises(ray.exceptions.RayTaskError, match="was restarted"):
        owner.state_dict()  # a checkpoint of lost state is never written
    owner.load_state_dict(saved)
    assert owner.assign(["q"]) == [[0, 7, 2, 3, 4, 5, 6]] and owner.stats()["replacements"] == 1
    owner.reset()
    assert owner.assign(["q"]) == [list(range(7))] and owner.stats()["reports"] == 0


def _random_embedding_model(tmp_path, tokenizer):
    import torch

    from conan.model import ConanConfig, ConanForEmbedding
    torch.manual_seed(0)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer), attention_mode="bidirectional"))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _search_tasks() -> int:
    """Ray tasks that have run mine_candidates in this session (the state API: task events)."""
    from ray.util.state import list_tasks

    return len(list_tasks(filters=[("name", "=", "mine_candidates")], limit=10_000, raise_on_missing_output=False))


def _wait_for(condition, seconds: float = 30) -> None:
    """Poll until condition() holds (task events reach the state API a second or so late)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


def test_mining_on_xquad_drops_positives_and_applies_the_false_negative_guard(ray_cluster, tmp_path, tokenizer, data_root):
    from dataclasses import replace

    import numpy as np

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conan.data import stage_data
    from conan.data.mining import (MiningConfig, embed_passages, embed_texts, embedding_width, mine_candidates,
                                   mine_supervised_candidates, read_mined)
    from conan.data.passages import write_passage_lookup

    model_dir = _random_embedding_model(tmp_path, tokenizer)
    rows = [r for r in stage_data.supervised_records(data_root, 7, 60, 0, ["en"]) if r["query_id"]]
    corpus = stage_data.xquad_corpus(data_root)
    assert len(corpus) == 180  # the 36 training articles' paragraphs: the 12 held-out articles are never mined
    pq.write_table(pa.table({"text": corpus}), tmp_path / "passages.parquet")
    lookup = write_passage_lookup(tmp_path / "passages.parquet", tmp_path / "passages.arrow")
    # The rows in two files, as a stage's shards are; a classification row with a query_id is not mined.
    files = [tmp_path / "rows-0.parquet", tmp_path / "rows-1.parquet"]
    pq.write_table(pa.Table.from_pylist(rows[:70]), files[0])
    pq.write_table(pa.Table.from_pylist([*rows[70:], {**rows[0], "task": "classification", "query_id": "c:0"}]),
                   files[1])
    width = embedding_width(model_dir, MiningConfig())
    # Embedded into 3 shards of 64 passages' bytes (64 + 64 + 52) and searched shard by shard, 16 queries at a time,
    # the queries embedded and mined 50 at a time, each chunk a Ray task (two at once): the same candidates as one
    # chunk, one batch and one shard.
    searches_before = _search_tasks()
    n = mine_supervised_candidates(model_dir, files, ["retrieval", "clr"], lookup, tmp_path / "mined.parquet", 20,
                                   0.95, MiningConfig(shard_bytes=64 * 4 * width, query_batch=16,
                                                      query_chunk_bytes=50 * 4 * width, search_tasks=2))
    _wait_for(lambda: _search_tasks() == searches_before + 3)  # 50 + 50 + 20 queries
    shards = sorted((tmp_path / "mined_embeddings").glob("emb-*.npy"))
    assert [len(np.load(p)) for p in shards] == [64, 64, 52]
    mined = read_mined(tmp_path / "mined.parquet")
    mine_supervised_candidates(model_dir, files, ["retrieval", "clr"], lookup, tmp_path / "whole.parquet", 20, 0.95,
                               MiningConfig())
    assert read_mined(tmp_path / "whole.parquet") == mined
    assert n == len(mined) == len({r["query_id"] for r in rows}) == 120  # 60 English + 60 cross-lingual queries
    assert list(mined) == [r["query_id"] for r in rows]  # in the files' order
    by_query = {r["query_id"]: r for r in rows}
    assert all(by_query[q]["positive_id"] not in c for q, c in mined.items())
    # The guard, checked against exact cosines: no kept candidate scores above 0.95 × its positive, and mining went
    # deep enough that each query has k = 20 candidates or every passage under the guard.
    cfg = MiningConfig()
    corpus_emb = embed_texts(model_dir, corpus, cfg)  # small: in this process
    pool_emb = embed_texts(model_dir, corpus, replace(cfg, in_process_work=0))
    assert np.allclose(pool_emb, corpus_emb, atol=1e-6)  # the actor pool embeds the same
    assert np.allclose(np.concatenate([np.load(p) for p in shards]), corpus_emb, atol=1e-6)  # so do the shards,
    pool_shards = embed_passages(model_dir, lookup, tmp_path / "pool",
                                 replace(cfg, in_process_work=0, shard_bytes=64 * 4 * width))
    assert np.allclose(np.concatenate([np.load(p) for p in pool_shards]), corpus_emb, atol=1e-6)  # on a pool too
    qids = list(by_query)[:30]
    q_emb = embed_texts(model_dir, [by_query[q]["query"] for q in qids], cfg)
    for q, e in zip(qids, q_emb):
        pos = float(e @ corpus_emb[by_query[q]["positive_id"]])
        limit = pos - 0.05 * abs(pos)
        assert all(float(e @ corpus_emb[c]) <= limit + 1e-5 for c in mined[q])
        under_guard = sum(float(e @ row) <= limit - 1e-5 for row in corpus_emb) - (pos <= limit - 1e-5)
        assert min(20, under_guard) <= len(mined[q]) <= 20, (q, len(mined[q]), under_guard)
    # Without the guard, the ranking is the plain top-k minus the positive (exact flat index).
    loose = mine_candidates(q_emb[:1], [corpus_emb], [{by_query[qids[0]]["positive_id"]}], 5, 10.0)[0]
    order = [i for i in np.argsort(-(corpus_emb @ q_emb[0])) if i != by_query[qids[0]]["positive_id"]][:5]
    assert loose[0] == [int(i) for i in order] and len(loose[0]) == 5
    # At a Matryoshka prefix: the shards hold 32 dims, the renormalised prefix of the full embeddings, and the
    # candidates are those of a search over that prefix.
    prefix = corpus_emb[:, :32] / np.linalg.norm(corpus_emb[:, :32], axis=1, keepdims=True)
    mine_supervised_candidates(model_dir, files, ["retrieval", "clr"], lookup, tmp_path / "d32.parquet", 20, 0.95,
                               replace(cfg, dim=32))
    d32 = np.concatenate([np.load(p) for p in sorted((tmp_path / "d32_embeddings").glob("emb-*.npy"))])
    assert d32.shape == (180, 32) and np.allclose(d32, prefix, atol=1e-5)
    q32 = embed_texts(model_dir, [by_query[q]["query"] for q in qids], replace(cfg, dim=32))
    expected = mine_candidates(q32, [prefix], [{by_query[q]["positive_id"]} for q in qids], 20, 0.95)
    assert [read_mined(tmp_path / "d32.parquet")[q] for q in qids] == [ids for ids, _ in expected]
    assert [read_mined(tmp_path / "d32.parquet")[q] for q in qids] != [mined[q] for q in qids]


def test_mined_candidates_are_read_as_pool_arrays_batch_by_batch(tmp_path):
    """The mined parquet, read 3 rows a batch (queries with 0 to 6 candidates): the same keys and -1 padded rows as
    building the arrays from {query id: candidates}."""
    from conan.data.mining import read_mined, read_mined_arrays, write_mined

    mined = [(list(range(10 * i, 10 * i + i % 7)), [0.5] * (i % 7)) for i in range(10)]
    write_mined(tmp_path / "mined.parquet", [f"de:{i}" for i in range(10)], mined)
    keys, candidates = read_mined_arrays(tmp_path / "mined.parquet", batch_rows=3)
    expected_keys, expected = pool_arrays(read_mined(tmp_path / "mined.parquet"))
    assert np.array_equal(keys, expected_keys) and np.array_equal(candidates, expected)
    assert candidates.shape == (10, 6) and candidates.dtype == np.int32 and candidates[0].tolist() == [-1] * 6
    assert candidates[9].tolist() == [90, 91, -1, -1, -1, -1]
    write_mined(tmp_path / "big.parquet", ["en:0"], [([1, 1 << 31], [0.5, 0.4])])
    with pytest.raises(ValueError, match="big.parquet: candidate ids must lie in"):
        read_mined_arrays(tmp_path / "big.parquet")


def test_a_supervised_run_mines_the_users_own_corpus(ray_cluster, tmp_path, tokenizer, data_root):
    """A user's retrieval rows over their own corpus (CSL titles → abstracts, ids into a 320-abstract corpus; no
    XQuAD): the run mines that corpus only, drops the positives, keeps every candidate under the false-negative
    guard, and its pool manages exactly the queries left with at least num_negatives candidates."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conan.config import JobConfig, load_config
    from conan.data.mining import MiningConfig, embed_texts, read_mined
    from conan.data.public_sets import csl_title_pairs
    from conan.train.launcher import run_stage

    pairs = csl_title_pairs(data_root)[:320]
    corpus = [abstract for abstract, _ in pairs]
    pq.write_table(pa.table({"text": corpus}), tmp_path / "abstracts.parquet")
    queries = {f"csl:{i}": (title, i) for i, (_, title) in enumerate(pairs[:240])}  # 80 abstracts are distractors
    pq.write_table(pa.Table.from_pylist([{"task": "retrieval", "lang": "zh", "query_id": q, "query": title,
                                          "positive": corpus[i], "positive_id": i, "negatives": []}
                                         for q, (title, i) in queries.items()]), tmp_path / "rows.parquet")
    model_dir = _random_embedding_model(tmp_path, tokenizer)
    cfg = load_config(JobConfig, Path(__file__).resolve().parents[1] / "jobs" / "configs" / "supervised_tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.init_from={model_dir}", f"data.paths=[{tmp_path / 'rows.parquet'}]",
        f"dhnm.passages={tmp_path / 'abstracts.parquet'}", "dhnm.pool_size=20", "train.steps=4", "train.log_every=2",
        "train.checkpoint_every=100", "supervised.task_weights={retrieval: 1.0}", "supervised.batch_sizes={retrieval: 8}"])
    run_stage(cfg)
    assert not (tmp_path / "run" / "demo").exists()  # the demo data source was never written
    mined = read_mined(tmp_path / "run" / "mined_negatives.parquet")
    assert set(mined) == set(queries)
    embedded = sorted((tmp_path / "run" / "mined_negatives_embeddings").glob("emb-*.npy"))
    assert sum(len(np.load(p)) for p in embedded) == len(corpus)  # the user's corpus, all of it, nothing else
    corpus_emb = embed_texts(model_dir, corpus, MiningConfig())
    query_emb = embed_texts(model_dir, [title for title, _ in queries.values()], MiningConfig())
    enough = 0
    for (q, (_, pos)), e in zip(queries.items(), query_emb):
        scores = corpus_emb @ e
        limit = scores[pos] - 0.05 * abs(scores[pos])
        assert pos not in mined[q] and all(0 <= c < len(corpus) for c in mined[q])
        assert all(scores[c] <= limit + 1e-5 for c in mined[q])
        under_guard = int((scores <= limit - 1e-5).sum()) - int(scores[pos] <= limit - 1e-5)
        assert min(20, under_guard) <= len(mined[q]) <= 20
        enough += len(mined[q]) >= cfg.supervised.num_negatives
    reports = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert reports[-1]["dhnm_queries"] == enough > 200  # every query with enough candidates is managed
    assert reports[-1]["dhnm_reports"] > 0
