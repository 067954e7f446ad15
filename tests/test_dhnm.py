"""Dynamic hard-negative mining: eq. 6 on hand-made score sequences, pool exhaustion, the shared actor."""

import pytest

from conan.dhnm import NegativePoolClient, NegativePoolState, ReplacementRule, create_negative_pools, shard_of


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
    state.add("q", list(range(100, 100 + n_candidates)))
    return state


def test_first_sight_sets_s0_and_replaces_easy_negatives():
    state = _pool()
    assert state.assign(["q"]) == [[100, 101, 102]]
    state.report(["q"], [[100, 101, 102]], [[0.9, 0.3, 0.5]])  # 101 is easy at first sight
    assert state.assign(["q"]) == [[100, 103, 102]]
    active = {n.id: (n.s0, n.si) for n in state.pools["q"].active}
    assert active == {100: (0.9, None), 103: (None, None), 102: (0.5, None)}
    assert state.counters["replacements"] == 1 and state.counters["first_sight_replacements"] == 1


def test_decayed_negative_is_replaced_only_when_both_conditions_hold():
    state = _pool()
    state.report(["q"], [[100, 101, 102]], [[0.9, 0.8, 0.6]])  # S0s
    state.report(["q"], [[100, 101, 102]], [[0.72, 0.6, 0.55]])
    # 100: 1.2·0.72 = 0.864 < 0.9 but 0.72 ≥ 0.7 → keep; 101: 0.72 < 0.8 and 0.6 < 0.7 → replace;
    # 102: 0.66 ≥ 0.6 → keep.
    assert state.assign(["q"]) == [[100, 103, 102]]
    state.report(["q"], [[100]], [[0.69]])  # now 0.69 < 0.7 and 0.828 < 0.9
    assert state.assign(["q"]) == [[104, 103, 102]]


def test_stale_report_for_a_replaced_negative_is_ignored():
    state = _pool()
    state.report(["q"], [[101]], [[0.1]])  # replaced by 103
    state.report(["q"], [[101]], [[0.1]])  # late duplicate: 101 is no longer active
    assert state.assign(["q"]) == [[100, 103, 102]] and state.counters["replacements"] == 1


def test_exhausted_pool_keeps_the_negative_and_counts():
    state = _pool(n_candidates=4)
    state.report(["q"], [[100, 101, 102]], [[0.1, 0.1, 0.1]])  # one replacement left (103)
    assert state.assign(["q"]) == [[103, 101, 102]]
    assert state.counters == {"reports": 3, "replacements": 1, "first_sight_replacements": 1, "exhausted": 2}


def test_state_round_trip_is_exact():
    state = _pool()
    state.report(["q"], [[100, 101, 102]], [[0.9, 0.3, 0.5]])
    copy = NegativePoolState(num_active=3)
    copy.load_state_dict(state.state_dict())
    assert copy.state_dict() == state.state_dict() and copy.stats() == state.stats()


def test_sharded_actors_route_queries_and_apply_reports(ray_cluster):
    pools = {f"q{i}": list(range(i * 100, i * 100 + 12)) for i in range(20)}
    owner = create_negative_pools(pools, "test-dhnm", num_shards=3, num_active=7)
    client = NegativePoolClient.connect(owner.names)  # as a train worker does
    shards = {shard_of(q, 3) for q in pools}
    assert len(shards) == 3  # the 20 queries really spread over the 3 actors
    assert client.assign(["q3", "q17"]) == [list(range(300, 307)), list(range(1700, 1707))]
    client.report(["q3"], [[300, 301]], [[0.1, 0.9]])
    client.flush()
    assert client.assign(["q3"]) == [[307, 301, 302, 303, 304, 305, 306]]
    stats = client.stats()
    assert stats["replacements"] == 1 and stats["queries"] == 20 and stats["reports"] == 2
    saved = client.state_dict()
    client.report(["q3"], [[301]], [[0.0]])
    client.flush()
    client.load_state_dict(saved)
    assert client.assign(["q3"]) == [[307, 301, 302, 303, 304, 305, 306]]
