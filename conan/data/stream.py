"""What each rank trains on, read straight from the shard files: a pure function of (seed, epoch, step, world size).

ShardStream    one group's files. Each epoch permutes the files (per seed, epoch, group), lays them end to end and
               gives rank r the r-th of `world` equal contiguous slices (the remainder, under `world` rows, is dropped
               so ranks stay in step); inside a file rows are permuted per (seed, epoch, file), and a rank's slice is
               read in windows of `window` rows permuted together (MosaicML streaming's shuffle blocks), so a batch
               mixes every file of its window instead of one file's neighbours. A rank holds only the files of its
               current window: memory is bounded by the window, whatever the data size. With `bucket` > 1, every
               run of `bucket` consecutive batches of an epoch is re-cut from the same rows sorted by length (the sum
               of the row's token-id list lengths) and the batches' order within it permuted: far fewer pad tokens,
               the same rows per epoch, and negatives still drawn from the whole shuffled window.
GroupedStream  micro-batches homogeneous in a group (a weak pair's source/lang, a supervised row's task/lang): the
               group of every micro-batch is drawn from the seed and the manifests' row counts alone, so every rank
               agrees and the gathered global batch is homogeneous.

Nothing here has state to save: a resumed run at step s asks for micro-batch s * grad_accum and gets exactly the rows an
uninterrupted run would have. A checkpoint records (seed, world size, manifests) so a resume under another world size
or other data fails loudly instead of silently reading other rows (`DataPosition`).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SHUFFLE_WINDOW = 50_000  # rows permuted together by default (data.shuffle_window): one full shard


class DataPositionError(ValueError):
    """A checkpoint's data position cannot be continued by this run."""


@dataclass(frozen=True)
class DataPosition:
    """What fixes the rows of every step besides the step itself: saved with every checkpoint."""

    seed: int
    world_size: int
    fingerprints: tuple[str, ...]  # the manifests', in data.paths order

    def check_resume(self, saved: dict) -> None:
        """Raise unless a checkpoint written under `saved` continues with exactly the same rows here."""
        if saved["world_size"] != self.world_size:
            raise DataPositionError(
                f"checkpoint written by {saved['world_size']} workers, this run has {self.world_size}: a rank's rows "
                f"depend on the world size, so the data position cannot be continued exactly; resume with "
                f"train.num_workers={saved['world_size']} or start a new run (another output_dir)")
        if saved["seed"] != self.seed or tuple(saved["fingerprints"]) != self.fingerprints:
            raise DataPositionError("checkpoint written for another train.seed or other data (the manifests' "
                                    "fingerprints differ): start a new run (another output_dir)")


class ShardStream:
    """Rank `rank`'s rows of one group's files, epoch after epoch."""

    def __init__(self, files: Sequence[tuple[Path, int]], seed: Sequence[int], rank: int, world: int,
                 columns: list[str] | None = None, first_row_id: int = 0, window: int = SHUFFLE_WINDOW,
                 bucket: int = 0):
        """files: (path, rows) in manifest order; first_row_id: the row id of the first file's first row; window:
        rows of a rank's slice permuted together; bucket: batches cut together from length-sorted rows (0, 1: off)."""
        self.paths = [Path(p) for p, _ in files]
        self.sizes = np.array([n for _, n in files], dtype=np.int64)
        self.base_ids = first_row_id + np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.seed, self.rank, self.world, self.columns = list(seed), rank, world, columns
        self.per_rank = int(self.sizes.sum()) // world
        self.window = max(1, min(window, self.per_rank))
        if self.per_rank == 0:
            raise ValueError(f"{int(self.sizes.sum())} rows cannot give each of {world} workers one; use fewer "
                             "workers or more data")
        self.bucket = bucket
        self._run: tuple[tuple | None, list] = (None, [])
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._lengths: dict[int, np.ndarray] = {}  # tokens per row of the cached files
        self._capacity = 2  # files kept: those of the window being read, plus one

    @functools.lru_cache(maxsize=4)
    def _file_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.paths))
        return order, np.concatenate([[0], np.cumsum(self.sizes[order])])

    @functools.lru_cache(maxsize=4)
    def _row_order(self, epoch: int, file: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch, file, 1]).permutation(int(self.sizes[file]))

    @functools.lru_cache(maxsize=4)
    def _window_order(self, epoch: int, window: int) -> np.ndarray:
        size = min(self.window, self.per_rank - window * self.window)
        return np.random.default_rng([*self.seed, epoch, window, 2]).permutation(size)

    @functools.lru_cache(maxsize=4)
    def _window_files(self, epoch: int, window: int) -> int:
        """How many files a window of this rank's slice covers."""
        order, starts = self._file_order(epoch)
        first = self.rank * self.per_rank + window * self.window
        last = min(first + self.window, (self.rank + 1) * self.per_rank) - 1
        k0, k1 = (int(np.searchsorted(starts, p, side="right")) - 1 for p in (first, last))
        return k1 - k0 + 1

    def positions(self, start: int, count: int) -> list[tuple[int, int]]:
        """(file, row in file) of positions start … start+count-1 of this rank's sequence (epoch after epoch)."""
        out = []
        for q in range(start, start + count):
            epoch, j = divmod(q, self.per_rank)
            order, starts = self._file_order(epoch)
            w, i = divmod(j, self.window)
            p = self.rank * self.per_rank + w * self.window + int(self._window_order(epoch, w)[i])
            self._capacity = self._window_files(epoch, w) + 1
            k = int(np.searchsorted(starts, p, side="right")) - 1
            file = int(order[k])
            out.append((file, int(self._row_order(epoch, file)[p - starts[k]])))
        return out

    def batch_positions(self, index: int, batch_size: int) -> list[tuple[int, int]]:
        """Positions of the index-th batch: an epoch holds per_rank // batch_size batches (the rest of a rank's slice
        is dropped, so no batch holds a row twice); a slice smaller than a batch wraps into the next epoch."""
        per_epoch = self.per_rank // batch_size
        if per_epoch == 0:
            return self.positions(index * batch_size, batch_size)
        epoch, k = divmod(index, per_epoch)
        if self.bucket > 1:
            run, slot = divmod(k, self.bucket)
            if self._run[0] != (epoch, run, batch_size):  # this stream's current run, kept until it is read
                self._run = ((epoch, run, batch_size), self._bucketed_run(epoch, run, batch_size))
            return self._run[1][slot]
        return self.positions(epoch * self.per_rank + k * batch_size, batch_size)

    def _bucketed_run(self, epoch: int, run: int, batch_size: int) -> list[list[tuple[int, int]]]:
        """The batches of an epoch's run-th run of `bucket` batches: its rows sorted by length (ties keep the shuffled
        order), cut into batches, the batches permuted per (seed, epoch, run)."""
        count = min(self.bucket, self.per_rank // batch_size - run * self.bucket)
        positions = self.positions(epoch * self.per_rank + run * self.bucket * batch_size, count * batch_size)
        lengths = np.array([self._row_lengths(f)[r] for f, r in positions])
        ordered = [positions[i] for i in np.argsort(lengths, kind="stable")]
        batches = [ordered[i * batch_size:(i + 1) * batch_size] for i in range(count)]
        return [batches[i] for i in np.random.default_rng([*self.seed, epoch, run, 3]).permutation(count)]

    def _row_lengths(self, file: int) -> np.ndarray:
        """Tokens of every row of a file: the summed lengths of its integer-list columns (token ids)."""
        table = self._table(file)
        if file not in self._lengths:
            lengths = np.zeros(table.num_rows, dtype=np.int64)
            for column in table.columns:
                if pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type):
                    lengths += pc.list_value_length(column).fill_null(0).to_numpy()
            self._lengths[file] = lengths
        return self._lengths[file]

    def row_ids(self, positions: list[tuple[int, int]]) -> list[int]:
        """Stable row ids (manifest order) of positions."""
        return [int(self.base_ids[f] + r) for f, r in positions]

    def read(self, positions: list[tuple[int, int]]) -> list[dict]:
        """The rows at positions, each with its row_id."""
        out: list[dict] = [{}] * len(positions)
        by_file: dict[int, list[int]] = {}
        for i, (f, _) in enumerate(positions):
            by_file.setdefault(f, []).append(i)
        for f, slots in sorted(by_file.items()):
            table = self._table(f).take(pa.array([positions[i][1] for i in slots], pa.int64()))
            for i, row in zip(slots, table.to_pylist()):
                out[i] = {**row, "row_id": int(self.base_ids[f] + positions[i][1])}
        return out

    def batch(self, index: int, batch_size: int) -> list[dict]:
        """The rows of the index-th batch."""
        return self.read(self.batch_positions(index, batch_size))

    def epoch_rows(self, epoch: int, chunk: int = 1024) -> Iterator[dict]:
        """Every row of this rank's slice of an epoch, in order."""
        for start in range(0, self.per_rank, chunk):
            yield from self.read(self.positions(epoch * self.per_rank + start, min(chunk, self.per_rank - start)))

    def _table(self, file: int) -> pa.Table:
        if file in self._cache:
            self._cache.move_to_end(file)
        else:
            self._cache[file] = pq.read_table(self.paths[file], columns=self.columns)
            while len(self._cache) > self._capacity:
                self._lengths.pop(self._cache.popitem(last=False)[0], None)
        return self._cache[file]


class GroupedStream:
    """Micro-batches homogeneous in a group: the schedule of groups comes from (seed, row counts), a group's k-th
    micro-batch is that group's ShardStream's k-th batch on this rank."""

    def __init__(self, files: Mapping[str, Sequence[tuple[Path, int]]], weights: Mapping[str, float], total: int,
                 seed: int, rank: int, world: int, batch_size: int, columns: list[str] | None = None,
                 pool: Callable[[str], str] = lambda g: "mixed", window: int = SHUFFLE_WINDOW, bucket: int = 0):
        """files: every group's (path, rows); weights: a group's share of micro-batches (0 = never drawn); groups
        too small to give every rank `batch_size` rows are pooled into pool(group), their weights added; bucket:
        ShardStream's length bucketing (pooled groups are not bucketed)."""
        first_id, first_ids = 0, {}
        for g in sorted(files):  # row ids: groups in sorted order, files in manifest order
            first_ids[g], first_id = first_id, first_id + sum(n for _, n in files[g])
        # A group with fewer rows than ranks gives no rank any: it is the remainder, dropped.
        per_rank = {g: sum(n for _, n in fs) // world for g, fs in files.items()}
        merged = merge_small_groups({g: n for g, n in per_rank.items() if n}, batch_size, pool)
        members: dict[str, list[str]] = {}
        pooled_weights: dict[str, float] = {}
        for g in sorted(merged):
            members.setdefault(merged[g], []).append(g)
            pooled_weights[merged[g]] = pooled_weights.get(merged[g], 0.0) + weights.get(g, 0.0)
        self.groups = sorted(g for g, w in pooled_weights.items() if w > 0)
        if not self.groups:
            raise ValueError("no group with rows for every rank has a positive weight")
        self.streams: dict[str, ShardStream | PooledStream] = {}
        for i, g in enumerate(self.groups):
            parts = [ShardStream(files[m], [seed, i, j], rank, world, columns, first_ids[m], window,
                                 bucket if len(members[g]) == 1 else 0) for j, m in enumerate(members[g])]
            self.streams[g] = parts[0] if len(parts) == 1 else PooledStream(parts, [seed, i])
        p = np.array([pooled_weights[g] for g in self.groups])
        picks = np.random.default_rng([seed, 7]).choice(len(self.groups), total, p=p / p.sum())
        self.schedule = [self.groups[i] for i in picks]
        seen: dict[str, int] = {}
        self.occurrence = []  # how many earlier micro-batches drew the same group
        for group in self.schedule:
            self.occurrence.append(seen.get(group, 0))
            seen[group] = seen.get(group, 0) + 1

    def group(self, index: int) -> str:
        """The group of the index-th micro-batch."""
        return self.schedule[index % len(self.schedule)]

    def batch(self, index: int, batch_size: int) -> tuple[str, list[dict]]:
        """(group, rows) of the index-th micro-batch."""
        group = self.group(index)
        return group, self.streams[group].batch(self.occurrence[index % len(self.schedule)], batch_size)


class PooledStream:
    """Several small groups' streams read as one group: each epoch permutes their rows together."""

    def __init__(self, streams: list[ShardStream], seed: Sequence[int]):
        self.parts, self.seed = streams, list(seed)
        self.per_rank = sum(s.per_rank for s in streams)
        self.bounds = np.cumsum([0, *(s.per_rank for s in streams)])

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch]).permutation(self.per_rank)

    def batch(self, index: int, batch_size: int) -> list[dict]:
        """The rows of the index-th batch (epochs and remainders as in ShardStream.batch_positions)."""
        per_epoch = self.per_rank // batch_size
        start = index * batch_size if per_epoch == 0 else (
            index // per_epoch * self.per_rank + index % per_epoch * batch_size)
        rows = []
        for q in range(start, start + batch_size):
            epoch, j = divmod(q, self.per_rank)
            j = int(self._order(epoch)[j])
            k = int(np.searchsorted(self.bounds, j, side="right")) - 1
            part = self.parts[k]
            rows += part.read(part.positions(epoch * part.per_rank + j - int(self.bounds[k]), 1))
        return rows

    def epoch_rows(self, epoch: int) -> Iterator[dict]:
        """Every row of this rank's slice of an epoch, part after part."""
        for part in self.parts:
            yield from part.epoch_rows(epoch)


def merge_small_groups(per_rank: Mapping[Hashable, int], minimum: int,
                       pooled: Callable[[Hashable], Hashable] = lambda g: "mixed") -> dict[Hashable, Hashable]:
    """Map each group to itself, or to pooled(group) when it gives each rank fewer than `minimum` rows (so no
    micro-batch repeats a row); per_rank[group] = rows each rank gets."""
    return {g: g if n >= minimum else pooled(g) for g, n in per_rank.items()}
