"""Dynamic hard-negative mining (paper §3.4, eq. 5-6) served by shared Ray actors.

Each query has a ranked candidate pool (from faiss mining) and a few active negatives. The training
loss already computes S = cos(f(q), f(n)) for every active negative (eq. 5); workers report those
scores fire-and-forget, and the pool applies eq. 6 to each negative i with first-seen score S0 and
latest score S_i:

    replace at first sight      if S0 < 0.4
    replace later               if 1.2 · S_i < S0 and S_i < 0.7
    keep                        otherwise

A replaced negative gives way to the next unused candidate of its query's pool; when the pool is
exhausted the current negative stays and the exhaustion is counted. No extra forward pass is ever
made: the next batch simply asks `assign` for the query's current negatives. The thresholds follow
eq. 6 as written (the prose speaks of absolute values; the equation does not take them).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass(frozen=True)
class ReplacementRule:
    """Eq. 6's thresholds (paper defaults)."""

    first_sight_min: float = 0.4
    decay_factor: float = 1.2
    stale_max: float = 0.7

    def replace(self, s0: float, si: float | None) -> bool:
        """True when the negative is no longer hard: si is None at first sight."""
        if si is None:
            return s0 < self.first_sight_min
        return self.decay_factor * si < s0 and si < self.stale_max


@dataclass
class ActiveNegative:
    """One active negative of a query with its first-seen and latest scores."""

    id: int
    s0: float | None = None
    si: float | None = None


@dataclass
class QueryPool:
    """A query's ranked candidates, the next unused one, and its active negatives."""

    candidates: list[int]
    next_index: int
    active: list[ActiveNegative] = field(default_factory=list)


class NegativePoolState:
    """The pool logic without Ray: what one NegativePool actor holds for its share of queries."""

    def __init__(self, rule: ReplacementRule = ReplacementRule(), num_active: int = 7):
        self.rule, self.num_active = rule, num_active
        self.pools: dict[Hashable, QueryPool] = {}
        self.counters = {"reports": 0, "replacements": 0, "first_sight_replacements": 0, "exhausted": 0}

    def add(self, query_id: Hashable, candidates: Sequence[int]) -> None:
        """Register a query's ranked candidates; the first num_active become active."""
        candidates = [int(c) for c in candidates]
        self.pools[query_id] = QueryPool(candidates, min(self.num_active, len(candidates)),
                                         [ActiveNegative(c) for c in candidates[:self.num_active]])

    def load_candidates(self, pools: dict[Hashable, Sequence[int]]) -> None:
        """Register many queries at once."""
        for q, c in pools.items():
            self.add(q, c)

    def assign(self, query_ids: Sequence[Hashable]) -> list[list[int] | None]:
        """The current active negative ids of each query (None for a query the pool does not manage)."""
        return [[n.id for n in self.pools[q].active] if q in self.pools else None for q in query_ids]

    def report(self, query_ids: Sequence[Hashable], negative_ids: Sequence[Sequence[int]],
               scores: Sequence[Sequence[float]]) -> None:
        """Record the scores the loss computed and replace negatives that eq. 6 says are no longer hard."""
        for q, ids, ss in zip(query_ids, negative_ids, scores):
            pool = self.pools[q]
            for neg_id, s in zip(ids, ss):
                slot = next((i for i, n in enumerate(pool.active) if n.id == neg_id), None)
                if slot is None:
                    continue  # already replaced by an earlier report
                self.counters["reports"] += 1
                neg = pool.active[slot]
                first_sight = neg.s0 is None
                if first_sight:
                    neg.s0 = float(s)
                else:
                    neg.si = float(s)
                if not self.rule.replace(neg.s0, None if first_sight else neg.si):
                    continue
                if pool.next_index >= len(pool.candidates):
                    self.counters["exhausted"] += 1
                    continue
                pool.active[slot] = ActiveNegative(pool.candidates[pool.next_index])
                pool.next_index += 1
                self.counters["replacements"] += 1
                self.counters["first_sight_replacements"] += first_sight

    def stats(self) -> dict:
        """Counters plus the mean latest score of active negatives that have been scored."""
        scored = [n.si if n.si is not None else n.s0 for p in self.pools.values() for n in p.active
                  if n.s0 is not None]
        return {**self.counters, "queries": len(self.pools),
                "mean_active_score": sum(scored) / len(scored) if scored else float("nan")}

    def state_dict(self) -> dict:
        """Everything needed to restore the pool exactly (saved with each training checkpoint)."""
        return {"counters": dict(self.counters),
                "pools": {q: (p.candidates, p.next_index, [(n.id, n.s0, n.si) for n in p.active])
                          for q, p in self.pools.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict."""
        self.counters = dict(state["counters"])
        self.pools = {q: QueryPool(list(c), i, [ActiveNegative(*a) for a in active])
                      for q, (c, i, active) in state["pools"].items()}


def _remote_pool_class():
    import ray

    @ray.remote(num_cpus=0)
    class NegativePool(NegativePoolState):
        """Named Ray actor holding one shard of the hard-negative pool; exports its counters as Ray metrics
        (Prometheus: ray_conan_dhnm_*) tagged with the shard's name."""

        def __init__(self, rule: ReplacementRule, num_active: int, name: str):
            from ray.util.metrics import Counter, Gauge

            super().__init__(rule, num_active)
            self.tags = {"pool": name}
            self.metric_counters = {key: Counter(f"conan_dhnm_{key}", f"DHNM {key.replace('_', ' ')}",
                                                 tag_keys=("pool",))
                                    for key in ("reports", "replacements", "exhausted")}
            self.score_gauge = Gauge("conan_dhnm_reported_negative_score",
                                     "mean cosine of the active negatives in the latest report", tag_keys=("pool",))

        def report(self, query_ids, negative_ids, scores) -> None:
            """NegativePoolState.report, then the counter increments and the reported scores' mean as metrics."""
            before = {k: self.counters[k] for k in self.metric_counters}
            super().report(query_ids, negative_ids, scores)
            for key, metric in self.metric_counters.items():
                if self.counters[key] > before[key]:
                    metric.inc(self.counters[key] - before[key], tags=self.tags)
            flat = [s for row in scores for s in row]
            if flat:
                self.score_gauge.set(sum(flat) / len(flat), tags=self.tags)

        def ping(self) -> bool:
            """Returns once every call submitted before it by the same caller has run."""
            return True

    return NegativePool


def shard_of(query_id: Hashable, num_shards: int) -> int:
    """Stable shard of a query id (the same in every process)."""
    return zlib.crc32(str(query_id).encode()) % num_shards


class NegativePoolClient:
    """View of the sharded pool: routes each query to its shard's actor. The driver's client holds the
    actors' handles (which keeps them alive); workers connect by name."""

    def __init__(self, names: Sequence[str], actors: Sequence):
        self.names, self.actors = list(names), list(actors)

    @classmethod
    def connect(cls, names: Sequence[str], namespace: str | None = None) -> "NegativePoolClient":
        """Look the named actors up from any process of the job (e.g. a train worker)."""
        import ray
        return cls(names, [ray.get_actor(n, namespace=namespace) for n in names])

    def _split(self, query_ids: Sequence[Hashable]) -> dict[int, list[int]]:
        by_shard: dict[int, list[int]] = {}
        for i, q in enumerate(query_ids):
            by_shard.setdefault(shard_of(q, len(self.actors)), []).append(i)
        return by_shard

    def assign(self, query_ids: Sequence[Hashable]) -> list[list[int] | None]:
        """Active negatives of each query, None where unmanaged (one round trip per shard, in parallel)."""
        import ray
        parts = self._split(query_ids)
        refs = {s: self.actors[s].assign.remote([query_ids[i] for i in idx]) for s, idx in parts.items()}
        out: list[list[int]] = [[] for _ in query_ids]
        for s, idx in parts.items():
            for i, negs in zip(idx, ray.get(refs[s])):
                out[i] = negs
        return out

    def report(self, query_ids: Sequence[Hashable], negative_ids: Sequence[Sequence[int]],
               scores: Sequence[Sequence[float]]) -> None:
        """Fire-and-forget score report; never blocks the training step."""
        for s, idx in self._split(query_ids).items():
            self.actors[s].report.remote([query_ids[i] for i in idx], [negative_ids[i] for i in idx],
                                         [scores[i] for i in idx])

    def flush(self) -> None:
        """Wait until this process's earlier reports have been applied."""
        import ray
        ray.get([a.ping.remote() for a in self.actors])

    def stats(self) -> dict:
        """Counters summed over shards, mean active score averaged over shards with scores."""
        import ray
        parts = ray.get([a.stats.remote() for a in self.actors])
        total = {k: sum(p[k] for p in parts) for k in parts[0] if k != "mean_active_score"}
        means = [p["mean_active_score"] for p in parts if p["mean_active_score"] == p["mean_active_score"]]
        total["mean_active_score"] = sum(means) / len(means) if means else float("nan")
        return total

    def state_dict(self) -> list[dict]:
        """Each shard's state, in shard order."""
        import ray
        return ray.get([a.state_dict.remote() for a in self.actors])

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """Restore every shard."""
        import ray
        ray.get([a.load_state_dict.remote(s) for a, s in zip(self.actors, states)])


def create_negative_pools(pools: dict[Hashable, Sequence[int]], name: str, num_shards: int = 1,
                          rule: ReplacementRule = ReplacementRule(), num_active: int = 7,
                          namespace: str | None = None) -> NegativePoolClient:
    """Create (or replace) the named pool actors and load the candidate pools; keep the returned client alive."""
    import ray
    actor_class = _remote_pool_class()
    names = [f"{name}-{s}" for s in range(num_shards)]
    actors = []
    for n in names:
        try:
            ray.kill(ray.get_actor(n, namespace=namespace))
        except ValueError:
            pass
        actors.append(actor_class.options(name=n, namespace=namespace).remote(rule, num_active, n))
    shards: dict[int, dict] = {}
    for q, c in pools.items():
        if len(c) < num_active:
            continue  # too few candidates after the false-negative guard: the query keeps its static negatives
        shards.setdefault(shard_of(q, num_shards), {})[q] = c
    ray.get([actors[s].load_candidates.remote(shards.get(s, {})) for s in range(num_shards)])
    return NegativePoolClient(names, actors)
