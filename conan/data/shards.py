"""The layout every stage reads: a directory of parquet shards with a manifest.

    <dir>/manifest.json   {"format": "conan-shards/1", "kind": ..., "schema": {column: arrow type},
                           "groups": {group: [{"path", "rows", "sha256"}, ...]}, "rows": N, "stats": {...}}
    <dir>/<part files>.parquet

A group is what a global batch shares (a weak pair's source/lang, a supervised row's task/lang); every file holds rows
of one group, so a worker streams a group without scanning the others. Row ids are positions in manifest order (group
by group, file by file), so they are stable for as long as the manifest is.

Writers: `shard_file` turns one input file into group-partitioned shards (streamed by record batch), `convert` runs it
over many files as a Ray Data job and writes the manifest; the demo-data builder, curation, CLR and the pretraining
packer (conan.data.tokenize) all end in this layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conan.data.files import ShardError, input_files
from conan.data.input_rows import RowSpec, count_records, read_blocks

MANIFEST = "manifest.json"
FORMAT = "conan-shards/1"
ROWS_PER_SHARD = 50_000  # rows a shard file holds at most
REJECTS = "rejects"  # the rows an input had that a stage cannot train on, with their reasons
ROW_GROUP_BYTES = 4 << 20  # a shard's row groups hold about this much in memory: the unit a worker reads (a
# worker holds one or two of each group it reads, whatever data.reader_memory_mb says)


@dataclass(frozen=True)
class ShardFile:
    """One parquet file of a group: its path relative to the manifest, row count and content hash."""

    path: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """What a shard directory holds."""

    directory: Path
    kind: str
    schema: dict[str, str]
    groups: dict[str, list[ShardFile]]
    stats: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows over every group."""
        return sum(f.rows for files in self.groups.values() for f in files)

    def group_rows(self) -> dict[str, int]:
        """Rows per group."""
        return {g: sum(f.rows for f in files) for g, files in self.groups.items()}

    def fingerprint(self) -> str:
        """A hash of the files in order: equal fingerprints, equal rows and row ids."""
        return hashlib.sha256(json.dumps({g: [f.sha256 for f in files] for g, files in sorted(self.groups.items())}
                                         ).encode()).hexdigest()[:16]

    def save(self) -> Path:
        """Write manifest.json (last, so a directory with a manifest is complete)."""
        body = {"format": FORMAT, "kind": self.kind, "schema": self.schema, "rows": self.rows, "stats": self.stats,
                "groups": {g: [asdict(f) for f in files] for g, files in sorted(self.groups.items())}}
        path = self.directory / MANIFEST
        path.write_text(json.dumps(body, indent=1))
        return path


def is_shard_dir(path: str | Path) -> bool:
    """True when `path` is a directory with a manifest."""
    return (Path(path) / MANIFEST).is_file()


def load_manifest(directory: str | Path) -> Manifest:
    """Read and check a shard directory's manifest."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory}: no {MANIFEST} (not a shard directory; `conan shard <stage>` writes one)")
    body = json.loads(path.read_text())
    if body.get("format") != FORMAT:
        raise ShardError(f"{path}: format {body.get('format')!r}, expected {FORMAT!r}")
    groups = {g: [ShardFile(**f) for f in files] for g, files in body["groups"].items()}
    return Manifest(directory, body["kind"], body["schema"], groups, body.get("stats", {}))


def merge_manifests(manifests: list[Manifest]) -> dict[str, list[tuple[Path, int]]]:
    """Every group's files (absolute path, rows) over several shard directories, in the given order."""
    files: dict[str, list[tuple[Path, int]]] = {}
    for m in manifests:
        for g, parts in m.groups.items():
            files.setdefault(g, []).extend((m.directory / f.path, f.rows) for f in parts)
    return files


def dirs_fingerprint(dirs: list[str]) -> str:
    """A hash of several shard directories' fingerprints, in order (names what is derived from them)."""
    return hashlib.sha256(json.dumps([load_manifest(d).fingerprint() for d in dirs]).encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def group_keys(table: pa.Table, columns: list[str]) -> pa.Array:
    """Each row's group: the non-empty values of `columns` joined by "/", "all" when there are none."""
    if not columns:
        return pa.array(["all"] * table.num_rows, pa.string())
    # Pairwise, without nulls: pyarrow's join skipping nulls drops the rows whose every part is null.
    key = pc.fill_null(pc.cast(table[columns[0]], pa.string()), "")
    for c in columns[1:]:
        part = pc.fill_null(pc.cast(table[c], pa.string()), "")
        key = pc.if_else(pc.equal(key, ""), part,
                         pc.if_else(pc.equal(part, ""), key, pc.binary_join_element_wise(key, part, "/")))
    return pc.if_else(pc.equal(key, ""), "all", key)


def write_shard(table: pa.Table, path: Path, row_group_bytes: int = ROW_GROUP_BYTES) -> None:
    """Write a shard file in row groups of about `row_group_bytes` (in memory): a worker's reader loads a row group
    at a time, so a shard of any size costs it a row group, not the file."""
    rows = max(1, int(row_group_bytes * table.num_rows / max(table.nbytes, 1)))
    pq.write_table(table, path, row_group_size=rows)


def shard_file(src: Path, out_dir: Path, prefix: str, spec: RowSpec, keep: np.ndarray | None = None,
               rows_per_shard: int = ROWS_PER_SHARD) -> tuple[dict[str, list[ShardFile]], dict[str, int]]:
    """Stream one input file into group-partitioned parquet shards `<prefix>-g<group digest>-<n>.parquet` under out_dir
    (a group's files share its 64-bit digest whatever the input file; two groups of a file with one digest are an
    error, never one file), and its rejected rows into `rejects/<prefix>.parquet` (origin, reason, raw);
    `keep`: sorted row indices of the file to keep (None = all). Returns the files written per group and the
    counts: rows read, and rejects per reason."""
    buffers: dict[str, list[pa.Table]] = {}
    written: dict[str, list[ShardFile]] = {}
    digests: dict[str, str] = {}  # digest → group, in this file
    rejects: pq.ParquetWriter | None = None  # written as they come: a file of rejects costs a block, not the file
    counts: dict[str, int] = {"rows_in": 0}

    def flush(group: str, final: bool) -> None:
        table = pa.concat_tables(buffers.pop(group, []))
        digest = hashlib.sha1(group.encode()).hexdigest()[:16]  # 8 hex digits collided from ~76k groups on
        if digests.setdefault(digest, group) != group:
            raise ShardError(f"{src}: groups {digests[digest]!r} and {group!r} share the shard name digest {digest}")
        while table.num_rows >= rows_per_shard or (final and table.num_rows):
            part, table = table.slice(0, rows_per_shard), table.slice(rows_per_shard)
            n = len(written.setdefault(group, []))
            path = out_dir / f"{prefix}-g{digest}-{n:05d}.parquet"
            write_shard(part, path)
            written[group].append(ShardFile(path.name, part.num_rows, file_sha256(path)))
        if table.num_rows:
            buffers[group] = [table]

    offset = 0
    try:
        for block in read_blocks(src, rows_per_shard, spec.read_types()):
            rows = block.table.num_rows
            if keep is not None:
                first, last = np.searchsorted(keep, [offset, offset + rows])  # keep is sorted
                block = block.take(keep[first:last] - offset)
            offset += rows
            table, rejected = spec.check(block, str(src))
            counts["rows_in"] += block.table.num_rows
            if rejected.num_rows:
                if rejects is None:
                    (out_dir / REJECTS).mkdir(exist_ok=True)
                    rejects = pq.ParquetWriter(out_dir / REJECTS / f"{prefix}.parquet", rejected.schema)
                rejects.write_table(rejected)
                for reason, n in zip(*np.unique(rejected["reject_reason"].to_numpy(zero_copy_only=False),
                                                return_counts=True)):
                    counts[reason] = counts.get(reason, 0) + int(n)
            keys = group_keys(table, list(spec.group_by))
            for group in pc.unique(keys).to_pylist():
                buffers.setdefault(group, []).append(table.filter(pc.equal(keys, group)))
                if sum(t.num_rows for t in buffers[group]) >= rows_per_shard:
                    flush(group, final=False)
    finally:
        if rejects is not None:
            rejects.close()
    for group in list(buffers):
        flush(group, final=True)
    return written, counts


def convert(paths: list[str], out_dir: str | Path, kind: str, spec: RowSpec, max_rows: int | None = None,
            seed: int = 0, rows_per_shard: int = ROWS_PER_SHARD) -> Manifest:
    """Input files (parquet / JSON lines, files or directories) → a shard directory, one Ray Data task per input
    file (the driver sees row counts only). max_rows keeps a seeded random sample of that many rows. Rows the stage
    cannot train on go to <out_dir>/rejects with their reasons, counted in the manifest's stats (rows_in, rejected,
    reasons)."""
    import shutil

    out_dir = Path(out_dir)
    if is_shard_dir(out_dir):
        return load_manifest(out_dir)
    files = input_files(paths)
    keep = _sample(files, max_rows, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / REJECTS, ignore_errors=True)  # an earlier attempt's
    jobs = [{"index": i, "src": str(f), "keep": keep.get(i)} for i, f in enumerate(files)]

    def run(job: dict) -> tuple[dict[str, list[ShardFile]], dict[str, int]]:
        keep_rows = None if job["keep"] is None else np.asarray(job["keep"], dtype=np.int64)
        return shard_file(Path(job["src"]), out_dir, f"f{job['index']:05d}", spec, keep_rows, rows_per_shard)

    groups: dict[str, list[ShardFile]] = {}
    counts: dict[str, int] = {}
    for written, file_counts in map_jobs(run, jobs):
        for g, parts in written.items():
            groups.setdefault(g, []).extend(parts)
        for key, n in file_counts.items():
            counts[key] = counts.get(key, 0) + n
    rows_in = counts.pop("rows_in")
    stats = {"rows_in": rows_in, "rejected": sum(counts.values()), "reasons": dict(sorted(counts.items()))}
    groups = {g: sorted(parts, key=lambda f: f.path) for g, parts in groups.items()}
    if not groups:
        raise ShardError(f"{paths}: no rows to train on" + (f"; {rejects_line(stats, out_dir)}" if stats["rejected"]
                                                             else ""))
    schema = {c: str(t) for c, t in zip(*_first_schema(out_dir, groups))}
    manifest = Manifest(out_dir, kind, schema, groups, {"inputs": [str(f) for f in files],
                                                           "group_by": list(spec.group_by), **stats})
    manifest.save()
    return manifest


def rejects_line(stats: dict, out_dir: Path) -> str:
    """'N of M rows rejected (reason n, …) → <dir>/rejects'."""
    top = sorted(stats["reasons"].items(), key=lambda kv: -kv[1])
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in top[:4]) + (", …" if len(top) > 4 else "")
    return f"{stats['rejected']:,} of {stats['rows_in']:,} rows rejected ({reasons}) → {out_dir / REJECTS}"


def _first_schema(out_dir: Path, groups: dict[str, list[ShardFile]]) -> tuple[list[str], list]:
    schema = pq.read_schema(out_dir / next(iter(groups.values()))[0].path)
    return schema.names, schema.types


def _sample(files: list[Path], max_rows: int | None, seed: int) -> dict[int, np.ndarray]:
    """Per input file, the row indices of a seeded random sample of max_rows rows over all files ({} = keep all).
    8 bytes a kept row, split in one pass (a Python list per file took 36 bytes a row, and masking the whole sample
    for each file took files × rows)."""
    if max_rows is None:
        return {}
    counts = [count_records(f) for f in files]
    total = sum(counts)
    if max_rows >= total:
        return {}
    chosen = np.sort(np.random.default_rng([seed, 11]).choice(total, max_rows, replace=False))
    starts = np.cumsum([0, *counts])
    bounds = np.searchsorted(chosen, starts)
    return {i: chosen[bounds[i]:bounds[i + 1]] - starts[i] for i in range(len(files))}


def remote_or_local(fn, num_cpus: float):
    """fn as a Ray task of num_cpus (its calls return ObjectRefs) when Ray runs, else fn itself. The tasks go to the
    whole cluster even from inside a Ray Tune trial, whose placement group (a tenth of a CPU in the ablation) would
    otherwise capture them and could never hold them."""
    import ray

    return ray.remote(num_cpus=num_cpus, scheduling_strategy="DEFAULT")(fn).remote if ray.is_initialized() else fn


def resolved(value):
    """A Ray task's result, or a value computed in this process (what remote_or_local's calls return)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def map_jobs(fn, jobs: list[dict], num_cpus: float = 1) -> list:
    """fn over jobs as Ray tasks on the cluster (remote_or_local; a single job in process); results in job order."""
    call = remote_or_local(fn, num_cpus) if len(jobs) > 1 else fn
    return [resolved(result) for result in [call(job) for job in jobs]]
