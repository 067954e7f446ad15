"""Which rows make each micro-batch: pure functions of (seed, micro-batch index, rank), so a resumed run replays
exactly the batches an uninterrupted one would, with no sampler state to checkpoint.

EpochSampler      a fresh seeded permutation of a worker's rows every epoch.
GroupedSampler    every micro-batch from one group (a supervised task; a weak pair's language and source): the group
                  of each micro-batch is drawn from the seed alone, so every worker agrees and the gathered global batch
                  is homogeneous; rows within a group come from that group's own EpochSampler.
"""

from __future__ import annotations

import functools
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np


class EpochSampler:
    """Index batches over a shard: a fresh seeded permutation every epoch, no state to save."""

    def __init__(self, size: int, seed: int | Sequence[int]):
        if size == 0:
            raise ValueError("a worker's data shard is empty; use fewer workers or more data")
        self.size, self.seed = size, seed

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        seed = list(self.seed) if isinstance(self.seed, (list, tuple)) else [self.seed]
        return np.random.default_rng([*seed, epoch]).permutation(self.size)

    def batch(self, index: int, batch_size: int) -> list[int]:
        """Row indices of the index-th batch of batch_size rows. An epoch holds size // batch_size batches (its
        remainder is dropped, so no batch holds a row twice); a shard smaller than one batch wraps instead."""
        per_epoch = self.size // batch_size
        if per_epoch == 0:
            start = index * batch_size
            return [int(self._permutation(g // self.size)[g % self.size]) for g in range(start, start + batch_size)]
        epoch, k = divmod(index, per_epoch)
        return [int(i) for i in self._permutation(epoch)[k * batch_size:(k + 1) * batch_size]]


class GroupedSampler:
    """Micro-batches homogeneous in a group: the schedule of groups comes from (seed, weights), the rows of a group's
    k-th micro-batch from that group's k-th batch on this rank."""

    def __init__(self, members: Mapping[Hashable, Sequence[int]], weights: Mapping[Hashable, float], total: int,
                 seed: int, rank: int):
        """members: this rank's row indices per group; weights: the same on every rank (so schedules agree)."""
        self.groups = sorted((g for g in weights if weights[g] > 0), key=str)
        missing = [g for g in self.groups if not members.get(g)]
        if missing:
            raise ValueError(f"groups {missing} have no rows on rank {rank}")
        self.members = {g: list(members[g]) for g in self.groups}
        self.samplers = {g: EpochSampler(len(self.members[g]), [seed, rank, i]) for i, g in enumerate(self.groups)}
        p = np.array([weights[g] for g in self.groups], dtype=float)
        picks = np.random.default_rng([seed, 7]).choice(len(self.groups), total, p=p / p.sum())
        self.schedule = [self.groups[i] for i in picks]
        seen: dict[Hashable, int] = {}
        self.occurrence = []  # how many earlier micro-batches drew the same group
        for group in self.schedule:
            self.occurrence.append(seen.get(group, 0))
            seen[group] = seen.get(group, 0) + 1

    def group(self, index: int) -> Hashable:
        """The group of the index-th micro-batch."""
        return self.schedule[index % len(self.schedule)]

    def batch(self, index: int, batch_size: int) -> tuple[Hashable, list[int]]:
        """(group, row indices) of the index-th micro-batch."""
        group = self.group(index)
        occurrence = self.occurrence[index % len(self.schedule)]
        rows = self.members[group]
        return group, [rows[i] for i in self.samplers[group].batch(occurrence, batch_size)]


def merge_small_groups(counts: Mapping[Hashable, Sequence[int]], minimum: int,
                       pooled: Callable[[Hashable], Hashable] = lambda g: "mixed") -> dict[Hashable, Hashable]:
    """Map each group to itself, or to pooled(group) when some rank holds fewer than `minimum` of its rows (so no
    micro-batch repeats a row); counts[group] = rows per rank."""
    return {g: g if min(per_rank) >= minimum else pooled(g) for g, per_rank in counts.items()}
