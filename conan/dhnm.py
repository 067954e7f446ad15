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

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

from conan.data.dedup import content_keys


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


def query_keys(query_ids: Sequence[Hashable]) -> np.ndarray:
    """The pool's 64-bit key of each query id (int64; equal in every process)."""
    return content_keys([str(q) for q in query_ids])


def padded_candidates(lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each query's ranked candidate ids, given flat (`values`, `lengths` per query), as int32 rows, -1 padded."""
    lengths, values = np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.int64)
    if len(values) and (values.max() >= 1 << 31 or values.min() < 0):
        raise ValueError(f"candidate ids must lie in [0, 2**31): the pool stores them as int32 (got {values.max()})")
    block = np.full((len(lengths), int(lengths.max(initial=0))), -1, dtype=np.int32)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    block[np.repeat(np.arange(len(lengths)), lengths), np.arange(len(values)) - starts] = values
    return block


def pool_arrays(pools: dict[Hashable, Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """{query id: ranked candidate ids} as the pool's arrays: keys (int64) and candidates (int32, -1 padded)."""
    lengths = [len(c) for c in pools.values()]
    values = np.concatenate([np.asarray(c, dtype=np.int64) for c in pools.values()]) if pools else np.zeros(0)
    return query_keys(list(pools)), padded_candidates(lengths, values)


def shards_of(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """The pool shard of each query key (the same in every process)."""
    return (np.asarray(keys, dtype=np.int64).view(np.uint64) % np.uint64(num_shards)).astype(np.int64)


ARRAYS = ("keys", "candidates", "num_candidates", "next_index", "active", "s0", "si")
SCORE_UNIT = 1e-6  # the running sum of active scores counts whole micro-units: exact, the same in any report order


class NegativePoolState:
    """The pool logic without Ray: what one NegativePool actor holds for its share of queries, as dense arrays.

    Row r of each array belongs to the query whose key (`query_keys`) is keys[r] (sorted; found by binary search):
    candidates[r] its ranked candidate ids (-1 past num_candidates[r]), next_index[r] its next unused candidate,
    active[r] its active negative ids (-1: empty slot) and s0[r] / si[r] their first-seen and latest scores (float32,
    NaN until seen; eq. 6 is applied to the stored values, so a restored pool decides as the original did).
    4 · (C + 3·A + 4) bytes a query: 220 at 30 candidates and 7 active, 2.2 GB for 10M queries. The counters and the
    active scores' running sum are kept as reports arrive, so `stats` reads no array."""

    def __init__(self, rule: ReplacementRule = ReplacementRule(), num_active: int = 7):
        self.rule, self.num_active = rule, num_active
        self.load_arrays(np.zeros(0, np.int64), np.zeros((0, num_active), np.int32))

    def load_arrays(self, keys: np.ndarray, candidates: np.ndarray) -> None:
        """Hold these queries (keys int64, candidates int32 rows ranked, -1 padded) instead of any held before; the
        first num_active candidates of each become active. Arrays already sorted by key are kept, not copied (the
        candidates are only read: an actor's may be a view of the object store)."""
        keys, candidates = np.asarray(keys, dtype=np.int64), np.asarray(candidates, dtype=np.int32)
        if len(keys) > 1 and not bool((keys[1:] >= keys[:-1]).all()):  # sorted arrays are used as they are
            order = np.argsort(keys, kind="stable")
            keys, candidates = keys[order], candidates[order]
        self.keys = keys
        if len(self.keys) > 1 and bool((self.keys[1:] == self.keys[:-1]).any()):
            raise ValueError("two queries of the pool share a 64-bit key: their query ids repeat")
        if candidates.shape[1] < self.num_active:
            candidates = np.pad(candidates, ((0, 0), (0, self.num_active - candidates.shape[1])), constant_values=-1)
        self.candidates = np.ascontiguousarray(candidates)
        self.num_candidates = (self.candidates >= 0).sum(axis=1).astype(np.int32)
        self.next_index = np.minimum(self.num_candidates, self.num_active).astype(np.int32)
        self.active = self.candidates[:, :self.num_active].copy()
        self.s0 = np.full(self.active.shape, np.nan, dtype=np.float32)
        self.si = np.full(self.active.shape, np.nan, dtype=np.float32)
        self.counters = {"reports": 0, "replacements": 0, "first_sight_replacements": 0, "exhausted": 0}
        self.scored, self.score_units = 0, 0  # active negatives with a score, and the sum of their latest scores

    def load_candidates(self, pools: dict[Hashable, Sequence[int]]) -> None:
        """Hold {query id: ranked candidate ids} (see load_arrays)."""
        self.load_arrays(*pool_arrays(pools))

    def rows(self, keys: Sequence[int]) -> np.ndarray:
        """The row of each key, -1 where the pool does not manage the query."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, at, -1)

    def assign(self, keys: Sequence[int]) -> list[list[int] | None]:
        """The current active negative ids of each query (None for a query the pool does not manage)."""
        rows = self.rows(keys)
        if not len(self.keys):  # a shard left no query (too few candidates for all of them): every query is static
            return [None] * len(rows)
        active = self.active[np.maximum(rows, 0)].tolist()
        return [[i for i in ids if i >= 0] if r >= 0 else None for r, ids in zip(rows.tolist(), active)]

    def report(self, keys: Sequence[int], negative_ids: Sequence[Sequence[int]],
               scores: Sequence[Sequence[float]]) -> None:
        """Record the scores the loss computed and replace negatives that eq. 6 says are no longer hard."""
        rows = self.rows(keys)
        if (rows < 0).any():
            raise KeyError(f"scores reported for {int((rows < 0).sum())} queries this pool does not manage")
        for r, ids, ss in zip(rows.tolist(), negative_ids, scores):
            # one query's slots as Python lists: a few array reads and writes per query, not per negative
            active, s0, si = self.active[r].tolist(), self.s0[r].tolist(), self.si[r].tolist()
            nxt, count = int(self.next_index[r]), int(self.num_candidates[r])
            for neg_id, s in zip(ids, ss):
                if neg_id not in active:
                    continue  # already replaced by an earlier report
                slot = active.index(neg_id)
                self.counters["reports"] += 1
                self._untally(s0[slot], si[slot])
                s = float(np.float32(s))
                first_sight = s0[slot] != s0[slot]  # NaN: never scored
                if first_sight:
                    s0[slot] = s
                else:
                    si[slot] = s
                self._tally(s, +1)
                if not self.rule.replace(s0[slot], None if first_sight else si[slot]):
                    continue
                if nxt >= count:
                    self.counters["exhausted"] += 1
                    continue
                self._tally(s, -1)
                active[slot], s0[slot], si[slot] = int(self.candidates[r, nxt]), float("nan"), float("nan")
                nxt += 1
                self.counters["replacements"] += 1
                self.counters["first_sight_replacements"] += first_sight
            self.active[r], self.s0[r], self.si[r], self.next_index[r] = active, s0, si, nxt

    def _tally(self, score: float, sign: int) -> None:
        self.scored += sign
        self.score_units += sign * round(score / SCORE_UNIT)

    def _untally(self, s0: float, si: float) -> None:
        """Take a negative's latest score (si, else s0; none before it is seen) out of the running sum."""
        latest = si if si == si else s0
        if latest == latest:
            self._tally(latest, -1)

    def active_scores(self, key: int) -> dict[int, tuple[float | None, float | None]]:
        """{active negative id: (first-seen score, latest score)} of one query, None where not seen."""
        r = int(self.rows([key])[0])
        def score(x): return None if np.isnan(x) else float(x)
        return {int(i): (score(a), score(b)) for i, a, b in zip(self.active[r], self.s0[r], self.si[r]) if i >= 0}

    def stats(self) -> dict:
        """Counters plus the mean latest score of the active negatives that have been scored (and their count)."""
        mean = self.score_units * SCORE_UNIT / self.scored if self.scored else float("nan")
        return {**self.counters, "queries": len(self.keys), "scored_active": self.scored, "mean_active_score": mean}

    def state_dict(self) -> dict:
        """Everything needed to restore the pool exactly (saved with each training checkpoint): the arrays as they
        are, the counters and the running sum."""
        return {"counters": dict(self.counters), "tally": (self.scored, self.score_units),
                **{name: getattr(self, name) for name in ARRAYS}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict (copies its arrays)."""
        if "keys" not in state:
            raise ValueError("this checkpoint holds a DHNM pool from before the array-based pools; restart the "
                             "supervised stage without resuming")
        for name in ARRAYS:
            setattr(self, name, np.array(state[name], copy=True))
        self.counters = dict(state["counters"])
        self.scored, self.score_units = state["tally"]


class PoolStateLost(RuntimeError):
    """A pool shard was restarted (its node died) and holds its mined candidates again, not the state training left it
    in: training resumes from its last checkpoint, which restores it."""


def _remote_pool_class():
    import ray

    # Restarted by Ray when its node dies, from the mined arrays it was created with (they live in the driver's object
    # store); calls made meanwhile wait for the restart and are retried.
    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class NegativePool(NegativePoolState):
        """Named Ray actor holding one shard of the hard-negative pool; exports its counters as Ray metrics
        (Prometheus: ray_conan_dhnm_*) tagged with the shard's name. After a restart it refuses to serve until the
        run either restores a checkpoint into it (`load_state_dict`) or starts over (`reset`)."""

        def __init__(self, rule: ReplacementRule, num_active: int, name: str, keys: np.ndarray,
                     candidates: np.ndarray):
            from ray.util.metrics import Counter, Gauge

            super().__init__(rule, num_active)
            self.mined = (keys, candidates)
            self.load_arrays(keys, candidates)
            self.lost = ray.get_runtime_context().was_current_actor_reconstructed
            self.tags = {"pool": name}
            self.metric_counters = {key: Counter(f"conan_dhnm_{key}", f"DHNM {key.replace('_', ' ')}",
                                                 tag_keys=("pool",))
                                    for key in ("reports", "replacements", "exhausted")}
            self.score_gauge = Gauge("conan_dhnm_reported_negative_score",
                                     "mean cosine of the active negatives in the latest report", tag_keys=("pool",))

        def _check(self) -> None:
            if self.lost:
                raise PoolStateLost(f"DHNM pool shard {self.tags['pool']} was restarted: its state since the last "
                                    "checkpoint is gone; resume from that checkpoint")

        def assign(self, keys):
            """NegativePoolState.assign, unless the shard's state was lost."""
            self._check()
            return super().assign(keys)

        def report(self, keys, negative_ids, scores) -> None:
            """NegativePoolState.report, then the counter increments and the reported scores' mean as metrics."""
            self._check()
            before = {k: self.counters[k] for k in self.metric_counters}
            super().report(keys, negative_ids, scores)
            for key, metric in self.metric_counters.items():
                if self.counters[key] > before[key]:
                    metric.inc(self.counters[key] - before[key], tags=self.tags)
            flat = [s for row in scores for s in row]
            if flat:
                self.score_gauge.set(sum(flat) / len(flat), tags=self.tags)

        def state_dict(self) -> dict:
            """NegativePoolState.state_dict, unless the shard's state was lost."""
            self._check()
            return super().state_dict()

        def load_state_dict(self, state: dict) -> None:
            """NegativePoolState.load_state_dict; the shard serves again."""
            super().load_state_dict(state)
            self.lost = False

        def reset(self) -> None:
            """Back to the mined candidates (a run starting at step 0, perhaps after a failed attempt); serves again."""
            if self.lost or self.counters["reports"]:
                self.load_arrays(*self.mined)
            self.lost = False

        def ping(self) -> bool:
            """Returns once every call submitted before it by the same caller has run."""
            return True

    return NegativePool


class NegativePoolClient:
    """View of the sharded pool: routes each query (by its key) to its shard's actor. The driver's client holds the
    actors' handles (which keeps them alive); workers connect by name.

    One thread of the client makes every call to the shards, in the order the client was asked: a training step
    neither waits for a report's serialisation nor for the round trips of a prefetched `assign`, and this caller's
    calls still reach each shard in that order (Ray runs one caller's calls to an actor in submission order)."""

    def __init__(self, names: Sequence[str], actors: Sequence, arrays: Sequence = ()):
        self.names, self.actors = list(names), list(actors)
        self.arrays = list(arrays)  # the driver's refs to the shards' mined arrays: what a restarted shard reloads
        self.submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhnm-pool")
        self.reports: deque[Future] = deque()  # report submissions not yet checked for errors
        self.prefetched: tuple[tuple, Future] | None = None  # (query ids, their assign's submission): `prefetch`

    @classmethod
    def connect(cls, names: Sequence[str], namespace: str | None = None) -> "NegativePoolClient":
        """Look the named actors up from any process of the job (e.g. a train worker)."""
        import ray
        return cls(names, [ray.get_actor(n, namespace=namespace) for n in names])

    def _split(self, query_ids: Sequence[Hashable]) -> tuple[np.ndarray, dict[int, list[int]]]:
        """The queries' keys, and the positions of the queries of each shard."""
        keys = query_keys(query_ids)
        shards = shards_of(keys, len(self.actors))
        return keys, {s: np.flatnonzero(shards == s).tolist() for s in np.unique(shards).tolist()}

    def _submit_assign(self, query_ids: Sequence[Hashable]) -> tuple[dict, dict]:
        keys, parts = self._split(query_ids)
        return parts, {s: self.actors[s].assign.remote(keys[idx]) for s, idx in parts.items()}

    def _submit_report(self, query_ids, negative_ids, scores) -> None:
        keys, parts = self._split(query_ids)
        for s, idx in parts.items():
            self.actors[s].report.remote(keys[idx], [negative_ids[i] for i in idx], [scores[i] for i in idx])

    def _on_every_shard(self, call: Callable[[object, int], object]) -> list:
        """call(actor, shard) → ref on every shard, submitted after every earlier call; the results in shard order."""
        import ray
        refs = self.submitter.submit(lambda: [call(a, s) for s, a in enumerate(self.actors)]).result()
        return ray.get(refs)

    def prefetch(self, query_ids: Sequence[Hashable]) -> None:
        """Ask the shards now for what the next `assign`, if it is of exactly these queries, returns, so that its
        round trips overlap the caller's compute. The answer holds every report this client was given before the
        prefetch, as an `assign` at that point would (assign changes no state)."""
        self.prefetched = (tuple(query_ids), self.submitter.submit(self._submit_assign, query_ids))

    def assign(self, query_ids: Sequence[Hashable]) -> list[list[int] | None]:
        """Active negatives of each query, None where unmanaged (one round trip per shard, in parallel; none to wait
        for when these queries were prefetched)."""
        import ray
        if self.prefetched is not None and self.prefetched[0] == tuple(query_ids):
            submitted = self.prefetched[1]
        else:
            submitted = self.submitter.submit(self._submit_assign, query_ids)
        self.prefetched = None
        parts, refs = submitted.result()
        out: list[list[int] | None] = [None] * len(query_ids)
        for s, idx in parts.items():
            for i, negs in zip(idx, ray.get(refs[s])):
                out[i] = negs
        return out

    def report(self, query_ids: Sequence[Hashable], negative_ids: Sequence[Sequence[int]],
               scores: Sequence[Sequence[float]]) -> None:
        """Fire-and-forget score report; never blocks the training step (a submission that failed raises at a later
        report or at `flush`)."""
        while self.reports and self.reports[0].done():
            self.reports.popleft().result()
        self.reports.append(self.submitter.submit(self._submit_report, query_ids, negative_ids, scores))

    def flush(self) -> None:
        """Wait until this client's earlier reports have been applied."""
        self._on_every_shard(lambda actor, _: actor.ping.remote())
        while self.reports:
            self.reports.popleft().result()

    def stats(self) -> dict:
        """Counters summed over shards; the mean active score over all shards' scored negatives."""
        parts = self._on_every_shard(lambda actor, _: actor.stats.remote())
        total = {k: sum(p[k] for p in parts) for k in parts[0] if k != "mean_active_score"}
        scored = [p for p in parts if p["scored_active"]]
        total["mean_active_score"] = (sum(p["mean_active_score"] * p["scored_active"] for p in scored)
                                      / total["scored_active"] if scored else float("nan"))
        return total

    def state_dict(self) -> list[dict]:
        """Each shard's state, in shard order."""
        return self._on_every_shard(lambda actor, _: actor.state_dict.remote())

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """Restore every shard."""
        self._on_every_shard(lambda actor, shard: actor.load_state_dict.remote(states[shard]))

    def reset(self) -> None:
        """Every shard back to its mined candidates."""
        self._on_every_shard(lambda actor, _: actor.reset.remote())


def create_negative_pools(keys: np.ndarray, candidates: np.ndarray, name: str, num_shards: int = 1,
                          rule: ReplacementRule = ReplacementRule(), num_active: int = 7,
                          namespace: str | None = None, resources: dict[str, float] | None = None
                          ) -> NegativePoolClient:
    """Create (or replace) the named pool actors, each with its share of the queries (keys int64, ranked candidates
    int32, -1 padded: `pool_arrays`, `read_mined_arrays`) put in the object store, where a restarted shard finds them
    again; keep the returned client alive (it holds the actors and those arrays). `resources`: Ray resources of each
    shard ("memory" in bytes, or custom ones that place them)."""
    import ray
    actor_class = _remote_pool_class()
    # Too few candidates after the false-negative guard: the query keeps its static negatives.
    enough = (np.asarray(candidates) >= 0).sum(axis=1) >= num_active
    keys, candidates = np.asarray(keys, dtype=np.int64)[enough], np.asarray(candidates, dtype=np.int32)[enough]
    order = np.argsort(keys, kind="stable")  # sorted: each shard uses its object-store arrays without a copy
    keys, candidates = keys[order], candidates[order]
    shards = shards_of(keys, num_shards)
    names = [f"{name}-{s}" for s in range(num_shards)]
    arrays = [(ray.put(keys[shards == s]), ray.put(candidates[shards == s])) for s in range(num_shards)]
    custom = dict(resources or {})
    memory = custom.pop("memory", None)
    actors = []
    for n, (shard_keys, shard_candidates) in zip(names, arrays):
        try:
            ray.kill(ray.get_actor(n, namespace=namespace))
        except ValueError:
            pass
        actors.append(actor_class.options(name=n, namespace=namespace, resources=custom, memory=memory)
                      .remote(rule, num_active, n, shard_keys, shard_candidates))
    ray.get([a.ping.remote() for a in actors])
    return NegativePoolClient(names, actors, arrays)
