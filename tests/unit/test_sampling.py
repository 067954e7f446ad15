"""Batches homogeneous in a group (supervised task, weak pair language × source), the same schedule on every rank."""

from collections import Counter

import pytest

from conan.train.sampling import GroupedSampler, merge_small_groups
from conan.train.stages import batch_groups, pool_small_groups


def _rows(rank: int, world: int) -> list[dict]:
    langs = ["en"] * 300 + ["de"] * 200 + ["zh"] * 100 + ["th"] * 6
    rows = [{"lang": lang, "source": "xquad" if i % 3 else "csl"} for i, lang in enumerate(langs)]
    return rows[rank::world]


def test_every_micro_batch_shares_language_and_source_and_ranks_agree():
    world, batch = 2, 8
    shards = [_rows(rank, world) for rank in range(world)]
    local = [batch_groups(rows, ["source", "lang"], batch)[0] for rows in shards]  # one process: no pooling yet
    counts = [{g: len(m) for g, m in members.items()} for members in local]  # what the workers all-gather
    samplers = []
    for rank, rows in enumerate(shards):
        members, weights = pool_small_groups(local[rank], counts, batch)
        samplers.append((rows, GroupedSampler(members, weights, 200, seed=3, rank=rank)))
    rows0, s0 = samplers[0]
    assert "xquad/th" not in s0.groups and "xquad/mixed" in s0.groups  # 2 Thai xquad rows a rank: pooled by source
    for index in range(200):
        groups = {s.group(index) for _, s in samplers}
        assert len(groups) == 1  # every rank draws the same group: the global batch is homogeneous
        group = groups.pop()
        for rows, sampler in samplers:
            _, chosen = sampler.batch(index, batch)
            keys = {f"{rows[i]['source']}/{rows[i]['lang']}" for i in chosen}
            assert keys == {group} or group.endswith("/mixed") and {k.split("/")[0] for k in keys} == {group[:-6]}
            # an unpooled group holds at least a batch on every rank: no row twice in a batch
            assert len(set(chosen)) == batch or group.endswith("/mixed")
    drawn = Counter(s0.group(i) for i in range(200))
    assert drawn["xquad/en"] > drawn["xquad/zh"]  # groups drawn in proportion to their rows


def test_grouped_batches_are_a_pure_function_of_seed_and_index():
    rows = _rows(0, 1)
    members, weights = batch_groups(rows, ["lang"], 4)
    a, b = (GroupedSampler(members, weights, 50, seed=1, rank=0) for _ in range(2))
    assert [a.batch(i, 4) for i in range(50)] == [b.batch(49 - j, 4) for j in range(50)][::-1]
    other_seed = GroupedSampler(members, weights, 50, seed=2, rank=0)
    assert [a.batch(i, 4) for i in range(50)] != [other_seed.batch(i, 4) for i in range(50)]


def test_no_grouping_is_one_group():
    members, weights = batch_groups(_rows(0, 1), [], 4)
    assert list(members) == ["all"] and weights == {"all": 606}


def test_small_groups_merge_and_empty_groups_fail():
    assert merge_small_groups({"a": [10, 9], "b": [10, 3]}, 4) == {"a": "a", "b": "mixed"}
    members, weights = pool_small_groups({"sts": [0, 1], "retrieval/de": [2], "retrieval/en": [3, 4, 5]},
                                         [{"sts": 2, "retrieval/de": 1, "retrieval/en": 3}], 2)
    assert members == {"sts": [0, 1], "retrieval/mixed": [2], "retrieval/en": [3, 4, 5]}  # a pool keeps its task
    assert weights == {"sts": 2, "retrieval/mixed": 1, "retrieval/en": 3}
    with pytest.raises(ValueError, match="no rows on rank 1"):
        GroupedSampler({"a": [1, 2]}, {"a": 1.0, "b": 1.0}, 10, seed=0, rank=1)
