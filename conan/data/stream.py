"""What each rank trains on, read straight from the shard files: a pure function of (seed, epoch, step, world size).

ShardStream    one group's files. Each epoch permutes the files (per seed, epoch, group), lays them end to end and
               gives rank r the r-th of `world` equal contiguous slices (the remainder, under `world` rows, is dropped
               so ranks stay in step); inside a file rows are permuted per (seed, epoch, file), and a rank's slice is
               read in windows of `window` rows permuted together (MosaicML streaming's shuffle blocks), so a batch
               mixes every file of its window instead of one file's neighbours. The order inside a file keeps its
               parquet row groups whole (the row groups permuted, then each one's rows), so a window spans a few row
               groups and a rank holds only those (in a RowGroupCache): memory is bounded by the window, whatever the
               data size. A file of one row group is simply permuted. With `bucket` > 1, every
               run of `bucket` consecutive batches of an epoch is re-cut from the same rows sorted by length (the sum
               of the row's token-id list lengths) and the batches' order within it permuted: far fewer pad tokens,
               the same rows per epoch, and negatives still drawn from the whole shuffled window.
GroupedStream  micro-batches homogeneous in a group (a weak pair's source/lang, a supervised row's task/lang): the
               group of every micro-batch is drawn from the seed and the manifests' row counts alone, so every rank
               agrees and the gathered global batch is homogeneous. Its groups share one RowGroupCache of
               `memory_bytes`, and each group's window is cut to its share of it (less one row group, never under
               one): the cache holds at most that much whatever the number of groups (thousands of source × language
               groups would otherwise each hold a window); past a row group a group, it reads a row group again when
               its group comes back instead of holding more.

Nothing here has state to save: a resumed run at step s asks for micro-batch s * grad_accum and gets exactly the rows an
uninterrupted run would have. A checkpoint records (seed, world size, manifests, the settings that order the rows: batch
sizes, gradient accumulation, group weights, shuffle and bucketing) so a resume under another world size, other data
or other settings fails loudly instead of silently reading other rows (`DataPosition`).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conan.config import ConfigError

SHUFFLE_WINDOW = 50_000  # rows permuted together by default (data.shuffle_window): one full shard
READER_MEMORY = 2048 << 20  # bytes of row groups a worker holds over all its groups by default (data.reader_memory_mb)


READING = ("data.shuffle_window", "data.bucket_batches", "data.reader_memory_mb")  # a "reading" checkpoint's order


class DataPositionError(ConfigError):
    """A checkpoint's data position cannot be continued by this run (the CLI says so in one line)."""


@dataclass(frozen=True)
class DataPosition:
    """What fixes the rows of every step besides the step itself: saved with every checkpoint."""

    seed: int
    world_size: int
    fingerprints: tuple[str, ...]  # the manifests', in data.paths order
    # The settings that order a rank's rows, {setting: value} (Stage.ordering): which rows a micro-batch reads,
    # how many micro-batches a step takes, which group each is drawn from.
    ordering: dict[str, object] = field(default_factory=dict)

    def check_resume(self, saved: dict) -> None:
        """Raise unless a checkpoint written under `saved` continues with exactly the same rows here."""
        # Checkpoints written before the ordering was recorded in full kept three of its settings as "reading" (and
        # the first ones none): only what they recorded is checked.
        recorded = saved.get("ordering") or dict(zip(READING, saved.get("reading", ())))
        changed = [key for key, value in self.ordering.items() if key in recorded and recorded[key] != value]
        if changed:
            raise DataPositionError(
                f"checkpoint written with {', '.join(f'{k}={recorded[k]}' for k in changed)}; this run has "
                f"{', '.join(f'{k}={self.ordering[k]}' for k in changed)}: they order a rank's rows, so the data "
                "position cannot be continued exactly; resume with the checkpoint's values or start a new run "
                "(another output_dir)")
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
                 bucket: int = 0, cache: RowGroupCache | None = None):
        """files: (path, rows) in manifest order; first_row_id: the row id of the first file's first row; window:
        rows of a rank's slice permuted together; bucket: batches cut together from length-sorted rows (0, 1: off);
        cache: where the row groups read are kept (shared by a GroupedStream's groups; default: this stream's own)."""
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
        self.cache = cache or RowGroupCache(READER_MEMORY)
        self._run: tuple[tuple | None, list] = (None, [])
        self._group_starts: dict[int, np.ndarray] = {}  # first row of each row group, per file touched
        # Caches of this stream's own (a method's lru_cache is one cache for every stream and keeps each alive),
        # holding the row orders of every file a shuffle window spans, so reading a window computes each once.
        spans = int(self.window // max(1, int(self.sizes.min()))) + 2
        self._file_order = functools.lru_cache(maxsize=4)(self._compute_file_order)
        self._row_order = functools.lru_cache(maxsize=min(len(self.paths), spans) + 1)(self._compute_row_order)
        self._window_order = functools.lru_cache(maxsize=4)(self._compute_window_order)

    def _compute_file_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's order of the files and the first position of each in it."""
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.paths))
        return order, np.concatenate([[0], np.cumsum(self.sizes[order])])

    def _compute_row_order(self, epoch: int, file: int) -> np.ndarray:
        """A file's rows in this epoch's order: each row group's rows permuted in turn, then the row groups' order
        (one generator per seed, epoch and file), so a run of positions stays within few row groups."""
        rng = np.random.default_rng([*self.seed, epoch, file, 1])
        starts = self._starts(file)
        rows = [start + rng.permutation(int(end - start)) for start, end in zip(starts[:-1], starts[1:])]
        return np.concatenate([rows[g] for g in rng.permutation(len(rows))])

    def _starts(self, file: int) -> np.ndarray:
        """The first row of each of a file's row groups, and its row count last (from the parquet footer)."""
        if file not in self._group_starts:
            metadata = pq.read_metadata(self.paths[file])
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self._group_starts[file] = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        return self._group_starts[file]

    def _compute_window_order(self, epoch: int, window: int) -> np.ndarray:
        """The permutation of one shuffle window of this rank's slice."""
        size = min(self.window, self.per_rank - window * self.window)
        return np.random.default_rng([*self.seed, epoch, window, 2]).permutation(size)

    def positions(self, start: int, count: int) -> list[tuple[int, int]]:
        """(file, row in file) of positions start … start+count-1 of this rank's sequence (epoch after epoch)."""
        out = []
        for q in range(start, start + count):
            epoch, j = divmod(q, self.per_rank)
            order, starts = self._file_order(epoch)
            w, i = divmod(j, self.window)
            p = self.rank * self.per_rank + w * self.window + int(self._window_order(epoch, w)[i])
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
        lengths = np.zeros(len(positions), dtype=np.int64)
        for slots, _, table in self._row_groups(positions):
            lengths[slots] = token_counts(table)
        ordered = [positions[i] for i in np.argsort(lengths, kind="stable")]
        batches = [ordered[i * batch_size:(i + 1) * batch_size] for i in range(count)]
        return [batches[i] for i in np.random.default_rng([*self.seed, epoch, run, 3]).permutation(count)]

    def row_ids(self, positions: list[tuple[int, int]]) -> list[int]:
        """Stable row ids (manifest order) of positions."""
        return [int(self.base_ids[f] + r) for f, r in positions]

    def read(self, positions: list[tuple[int, int]]) -> list[dict]:
        """The rows at positions, each with its row_id."""
        out: list[dict] = [{}] * len(positions)
        for slots, file, table in self._row_groups(positions):
            for i, row in zip(slots, table.to_pylist()):
                out[i] = {**row, "row_id": int(self.base_ids[file] + positions[i][1])}
        return out

    def _row_groups(self, positions: list[tuple[int, int]]) -> Iterator[tuple[list[int], int, pa.Table]]:
        """(slots of positions, file, their rows) for each row group the positions fall in."""
        slots: dict[tuple[int, int], list[int]] = {}
        for i, (f, r) in enumerate(positions):
            slots.setdefault((f, int(np.searchsorted(self._starts(f), r, side="right")) - 1), []).append(i)
        for (f, g), where in sorted(slots.items()):
            first = int(self._starts(f)[g])
            local = pa.array([positions[i][1] - first for i in where], pa.int64())
            yield where, f, self.cache.get(self.paths[f], g, self.columns).take(local)

    def batch(self, index: int, batch_size: int) -> list[dict]:
        """The rows of the index-th batch."""
        return self.read(self.batch_positions(index, batch_size))

    def epoch_rows(self, epoch: int, chunk: int = 1024) -> Iterator[dict]:
        """Every row of this rank's slice of an epoch, in order."""
        for start in range(0, self.per_rank, chunk):
            yield from self.read(self.positions(epoch * self.per_rank + start, min(chunk, self.per_rank - start)))


def token_counts(table: pa.Table) -> np.ndarray:
    """Tokens of every row: the summed lengths of its integer-list columns (token ids)."""
    counts = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        if pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type):
            counts += pc.list_value_length(column).fill_null(0).to_numpy()
    return counts


class RowGroupCache:
    """Parquet row groups a worker has read, the least recently used dropped once they exceed `budget` bytes (the
    row group being read is always kept)."""

    def __init__(self, budget: int):
        self.budget, self.bytes, self.peak = budget, 0, 0
        self.reads = 0  # row groups read from disk: climbing every step means the budget is too small for the groups
        self.tables: OrderedDict[tuple[Path, int], pa.Table] = OrderedDict()

    def get(self, path: Path, group: int, columns: list[str] | None) -> pa.Table:
        """Row group `group` of the file at path (its `columns`), read unless held."""
        key = (path, group)
        if key in self.tables:
            self.tables.move_to_end(key)
            return self.tables[key]
        table = pq.ParquetFile(path).read_row_group(group, columns=columns)
        self.reads += 1
        while self.tables and self.bytes + table.nbytes > self.budget:
            self.bytes -= self.tables.popitem(last=False)[1].nbytes
        self.tables[key] = table
        self.bytes += table.nbytes
        self.peak = max(self.peak, self.bytes)
        return table


class GroupedStream:
    """Micro-batches homogeneous in a group: the schedule of groups comes from (seed, row counts), a group's k-th
    micro-batch is that group's ShardStream's k-th batch on this rank."""

    def __init__(self, files: Mapping[str, Sequence[tuple[Path, int]]], weights: Mapping[str, float], total: int,
                 seed: int, rank: int, world: int, batch_size: int | Callable[[str], int],
                 columns: list[str] | None = None,
                 pool: Callable[[str], str] = lambda g: "mixed", window: int = SHUFFLE_WINDOW, bucket: int = 0,
                 memory_bytes: int = READER_MEMORY):
        """files: every group's (path, rows); weights: a group's share of micro-batches (0 = never drawn); groups
        too small to give every rank the rows of one of their micro-batches (`batch_size`, or batch_size(group)
        where tasks read batches of different sizes) are pooled into pool(group), their weights added; bucket:
        ShardStream's length bucketing (pooled groups are not bucketed); memory_bytes: the row groups held over all
        groups, each group's window cut to fit its share."""
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
        self.cache = RowGroupCache(memory_bytes)
        share = memory_bytes // sum(len(members[g]) for g in self.groups)
        self.windows: dict[str, int] = {}  # each input group's window where its share of memory_bytes cut it
        self.streams: dict[str, ShardStream | PooledStream] = {}
        for i, g in enumerate(self.groups):
            parts = []
            for j, m in enumerate(members[g]):
                fits = rows_within(files[m], columns, share)
                parts.append(ShardStream(files[m], [seed, i, j], rank, world, columns, first_ids[m],
                                         min(window, fits), bucket if len(members[g]) == 1 else 0, self.cache))
                if fits < min(window, parts[-1].per_rank):
                    self.windows[m] = parts[-1].window
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
        """(group, rows) of the index-th micro-batch: batch_size rows, or every row of this rank's slice of a group
        that, pooled or not, holds fewer (ranks hold equal slices, so their batches stay equal; no row repeats)."""
        group = self.group(index)
        stream = self.streams[group]
        return group, stream.batch(self.occurrence[index % len(self.schedule)], min(batch_size, stream.per_rank))


class PooledStream:
    """Several small groups' streams read as one group: each epoch permutes their rows together."""

    def __init__(self, streams: list[ShardStream], seed: Sequence[int]):
        self.parts, self.seed = streams, list(seed)
        self.per_rank = sum(s.per_rank for s in streams)
        self.bounds = np.cumsum([0, *(s.per_rank for s in streams)])
        self._order = functools.lru_cache(maxsize=2)(self._compute_order)  # this stream's own (see ShardStream)

    def _compute_order(self, epoch: int) -> np.ndarray:
        """This epoch's permutation of the pooled rows."""
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


def rows_within(files: Sequence[tuple[Path, int]], columns: list[str] | None, budget: int) -> int:
    """Rows of a group that `budget` bytes hold beside one row group being read, and at least a row group's (what
    a read loads anyway); the bytes of a row estimated from the first rows of its first file, so the same on every
    rank and every resume."""
    parquet = pq.ParquetFile(next(Path(p) for p, n in files if n))
    sample = next(parquet.iter_batches(batch_size=1024, columns=columns))
    per_row = max(sample.nbytes / max(sample.num_rows, 1), 1.0)
    group_rows = parquet.metadata.row_group(0).num_rows
    return max(group_rows, int(budget / per_row) - group_rows)


def merge_small_groups(per_rank: Mapping[Hashable, int], minimum: int | Callable[[Hashable], int],
                       pooled: Callable[[Hashable], Hashable] = lambda g: "mixed") -> dict[Hashable, Hashable]:
    """Map each group to itself, or to pooled(group) when it gives each rank fewer than `minimum` rows (or
    minimum(group): its own micro-batch), so small groups fill batches together; per_rank[group] = rows each rank
    gets."""
    least = minimum if callable(minimum) else lambda g: minimum
    return {g: g if n >= least(g) else pooled(g) for g, n in per_rank.items()}
