"""Shard layout and the streaming reader: what each rank reads is a pure function of (seed, index, world size)."""

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conan.data.shards import RowSpec, ShardError, convert, load_manifest, merge_manifests
from conan.data.stream import DataPosition, DataPositionError, GroupedStream, ShardStream, merge_small_groups
from conan.data.tokenize import pack_stream

SPEC = RowSpec(("input", "output", "lang", "source"), {"input": "query"}, {"source": "web"}, ("source", "lang"))


@pytest.fixture
def shards(tmp_path: Path):
    """1,006 pairs in two input files (one with `query` for `input`, no `source`), sharded by source/lang."""
    langs = ["en"] * 500 + ["de"] * 300 + ["zh"] * 200 + ["th"] * 6
    rows = [{"query": f"q{i}", "output": f"p{i}", "lang": lang} for i, lang in enumerate(langs)]
    pq.write_table(pa.Table.from_pylist(rows[::2]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1::2]), tmp_path / "b.parquet")
    return convert([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path / "shards", "pairs", SPEC,
                   rows_per_shard=64)


def streams(manifest, world: int, batch: int = 8, seed: int = 3, total: int = 300) -> list[GroupedStream]:
    files = merge_manifests([manifest])
    weights = {g: float(n) for g, n in manifest.group_rows().items()}
    return [GroupedStream(files, weights, total, seed, rank, world, batch, pool=lambda g: "web/mixed")
            for rank in range(world)]


def test_manifest_records_groups_rows_and_hashes(shards):
    m = load_manifest(shards.directory)
    assert m.kind == "pairs" and m.stats["group_by"] == ["source", "lang"]
    assert m.group_rows() == {"web/en": 500, "web/de": 300, "web/zh": 200, "web/th": 6}
    assert all(f.rows <= 64 and len(f.sha256) == 64 for files in m.groups.values() for f in files)
    assert m.fingerprint() == shards.fingerprint()


def test_every_micro_batch_shares_its_group_and_ranks_agree(shards):
    ranks = streams(shards, world=2)
    assert ranks[0].groups == ["web/de", "web/en", "web/mixed", "web/zh"]  # 3 Thai rows a rank: pooled
    for index in range(300):
        groups = {s.group(index) for s in ranks}
        assert len(groups) == 1
        group = groups.pop()
        for s in ranks:
            _, rows = s.batch(index, 8)
            if group != "web/mixed":  # (the pool of 3 Thai rows a rank is smaller than a batch: it wraps)
                assert len({r["row_id"] for r in rows}) == 8  # no row twice in a batch
                assert {f"{r['source']}/{r['lang']}" for r in rows} == {group}
    drawn = Counter(ranks[0].group(i) for i in range(300))
    assert drawn["web/en"] > drawn["web/zh"]


def test_batches_are_a_pure_function_of_seed_and_index(shards):
    a, b = streams(shards, world=2)[1], streams(shards, world=2)[1]
    forward = [a.batch(i, 8) for i in range(60)]
    assert forward == [b.batch(59 - j, 8) for j in range(60)][::-1]
    assert forward != [streams(shards, world=2, seed=4)[1].batch(i, 8) for i in range(60)]


def test_an_epoch_covers_every_row_once_but_the_remainder(shards):
    files = merge_manifests([shards])["web/en"]  # 500 rows in 8 files
    for world in (1, 2, 3):
        ranks = [ShardStream(files, [5], rank, world) for rank in range(world)]
        ids = [i for s in ranks for i in s.row_ids(s.positions(0, s.per_rank))]
        assert len(ids) == len(set(ids)) == 500 - 500 % world  # the remainder (< world rows) is dropped
        first = ranks[0].row_ids(ranks[0].positions(0, ranks[0].per_rank))
        second = ranks[0].row_ids(ranks[0].positions(ranks[0].per_rank, ranks[0].per_rank))
        assert first != second and (set(first) != set(second) or world == 1)  # another order; another split


def test_a_rank_reads_only_the_files_of_its_slice(shards):
    files = merge_manifests([shards])["web/en"]
    s = ShardStream(files, [5], 0, 4)
    touched = {f for f, _ in s.positions(0, s.per_rank)}
    assert len(touched) <= 3 < len(files)


def test_a_batch_mixes_the_files_of_its_window_and_holds_no_more(shards):
    files = merge_manifests([shards])["web/en"]  # 500 rows in 8 files
    whole = ShardStream(files, [5], 0, 1)  # the default window covers the slice: a batch samples all of it
    assert len({f for f, _ in whole.batch_positions(0, 16)}) >= 5
    narrow = ShardStream(files, [5], 0, 1, window=50)  # 50 rows span one or two files
    for i in range(500 // 16):
        narrow.batch(i, 16)
        assert len({f for f, _ in narrow.batch_positions(i, 16)}) <= 3


def test_small_groups_pool_and_resume_under_another_world_size_fails():
    assert merge_small_groups({"a": 10, "b": 3}, 4) == {"a": "a", "b": "mixed"}
    position = DataPosition(0, 2, ("abc",))
    position.check_resume({"seed": 0, "world_size": 2, "fingerprints": ["abc"]})
    with pytest.raises(DataPositionError, match="train.num_workers=4"):
        position.check_resume({"seed": 0, "world_size": 4, "fingerprints": ["abc"]})
    with pytest.raises(DataPositionError, match="other data"):
        position.check_resume({"seed": 0, "world_size": 2, "fingerprints": ["abd"]})
    ordered = DataPosition(0, 2, ("abc",), {"data.shuffle_window": 50_000, "data.bucket_batches": 0,
                                            "data.reader_memory_mb": 2048, "train.grad_accum": 2,
                                            "supervised.task_weights": {"clr": 0.5, "retrieval": 0.5}})
    saved = {"seed": 0, "world_size": 2, "fingerprints": ["abc"], "ordering": dict(ordered.ordering)}
    ordered.check_resume(saved)
    for key, other in (("data.reader_memory_mb", 512),  # another memory cuts other shuffle windows
                       ("train.grad_accum", 1),  # step s would read micro-batch s · 1, not s · 2
                       ("supervised.task_weights", {"retrieval": 1.0})):  # other tasks drawn at each step
        with pytest.raises(DataPositionError, match=rf"checkpoint written with {key}={other}.*this run has {key}="):
            ordered.check_resume({**saved, "ordering": {**saved["ordering"], key: other}})
    # A checkpoint written before the ordering was recorded in full (its three reading settings) or at all.
    ordered.check_resume({**saved, "ordering": None, "reading": [50_000, 0, 2048]})
    with pytest.raises(DataPositionError, match="data.reader_memory_mb=512"):
        ordered.check_resume({**saved, "ordering": None, "reading": [50_000, 0, 512]})
    ordered.check_resume({"seed": 0, "world_size": 2, "fingerprints": ["abc"]})


def test_an_input_without_a_required_column_is_refused(tmp_path):
    pq.write_table(pa.table({"output": ["p"], "lang": ["en"]}), tmp_path / "bad.parquet")
    with pytest.raises(ShardError, match=r"lacks columns \['input'\]"):
        convert([str(tmp_path / "bad.parquet")], tmp_path / "out", "pairs", SPEC)


def test_packed_blocks_rejoin_into_the_document_stream():
    docs = [[5, 6, 1], [7, 1], [8, 9, 10, 11, 1]]
    blocks = pack_stream(docs, 4)
    assert [len(b) for b in blocks] == [4, 4, 2]
    assert [int(t) for b in blocks for t in b] == [t for d in docs for t in d]


def test_length_buckets_cut_the_padding_and_keep_each_epochs_rows(tmp_path):
    """bucket=8: each run of 8 batches is re-cut from the same rows sorted by length: an epoch trains on exactly the
    rows of the unbucketed epoch (none twice), padded tokens fall, and the batches are still a pure function of the
    index (a resumed run reads what an uninterrupted one would)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 120, 900)
    for i, part in enumerate(np.array_split(np.arange(900), 6)):
        pq.write_table(pa.table({"input_ids": [[7] * int(lengths[j]) for j in part],
                                 "output_ids": [[9] * int(lengths[j] // 3 + 1) for j in part]}),
                       tmp_path / f"s{i}.parquet")
    files = [(tmp_path / f"s{i}.parquet", len(part)) for i, part in enumerate(np.array_split(np.arange(900), 6))]
    batch, world = 16, 2
    for rank in range(world):
        plain, bucketed = ShardStream(files, [1], rank, world), ShardStream(files, [1], rank, world, bucket=8)
        per_epoch = plain.per_rank // batch  # 28 batches: three runs of 8 and one of 4
        for epoch in range(2):
            indices = range(epoch * per_epoch, (epoch + 1) * per_epoch)
            ids = [plain.row_ids(plain.batch_positions(i, batch)) for i in indices]
            bucketed_ids = [bucketed.row_ids(bucketed.batch_positions(i, batch)) for i in indices]
            flat = [i for b in bucketed_ids for i in b]
            assert len(flat) == len(set(flat)) and set(flat) == {i for b in ids for i in b}

            def padded(batches):  # tokens a batch pads to: its longest query and longest passage, per row
                return sum(batch * (max(lengths[i] for i in b) + max(lengths[i] // 3 + 1 for i in b))
                           for b in batches)
            assert padded(bucketed_ids) < 0.75 * padded(ids), (padded(bucketed_ids), padded(ids))
        again = ShardStream(files, [1], rank, world, bucket=8)
        assert [again.batch_positions(i, batch) for i in (30, 3, 27)] == [
            bucketed.batch_positions(i, batch) for i in (30, 3, 27)]


def test_row_groups_bound_what_a_worker_holds_over_many_groups(tmp_path):
    """20 groups of 2 files in row groups of ~60 rows: under a 1.5 MB budget each group's window is cut to its share,
    the row groups held never pass the budget, and each rank's epoch still trains on exactly the rows it would
    without the budget (the windows reorder a rank's slice; they do not change it). A window of a file with many row
    groups spans a few of them, not the file."""
    import numpy as np

    from conan.data.shards import write_shard

    files, first = {}, 0
    for g in range(20):
        files[f"web/l{g}"] = []
        for f in range(2):
            ids = np.arange(first, first + 600)
            first += 600
            path = tmp_path / f"g{g}-{f}.parquet"
            write_shard(pa.table({"row": ids, "input_ids": [[int(i) % 50] * 40 for i in ids]}), path,
                        row_group_bytes=20_000)
            files[f"web/l{g}"].append((path, 600))
    group_rows = pq.ParquetFile(files["web/l0"][0][0]).metadata.row_group(0).num_rows
    assert 40 <= group_rows <= 100
    weights = {g: 1.0 for g in files}
    world, batch, budget = 2, 16, 1_500_000
    for rank in range(world):
        bounded = GroupedStream(files, weights, 800, 3, rank, world, batch, memory_bytes=budget)
        free = GroupedStream(files, weights, 800, 3, rank, world, batch)
        assert len(bounded.windows) == 20 and max(bounded.windows.values()) < 300  # a rank has 600 rows a group
        assert not free.windows
        for index in range(800):
            bounded.batch(index, batch)
            assert bounded.cache.bytes <= budget
        for index in range(300):
            free.batch(index, batch)
        assert bounded.cache.peak <= budget < free.cache.peak
        for g, stream in bounded.streams.items():  # a rank's slice of an epoch: the same rows as without the budget
            ids = [r["row"] for r in stream.epoch_rows(0)]
            free_ids = [r["row"] for r in free.streams[g].epoch_rows(0)]
            assert sorted(ids) == sorted(free_ids) and ids != free_ids
        one = bounded.streams["web/l0"]
        touched = {(f, int(np.searchsorted(one._starts(f), r, side="right"))) for f, r in one.positions(0, one.window)}
        assert len(touched) <= one.window // group_rows + 4  # a window's row groups, not its files' (~20)


def test_a_stage_says_when_its_memory_budget_cuts_the_shuffle_windows(tmp_path, small_tokenizer, capsys):
    """A worker's stage names the budget, the groups and the cut windows at start-up (rank 0 only), and says
    nothing when the budget holds every window."""
    from conan.config import JobConfig, load_config
    from conan.data.shards import write_shard
    from conan.train.stages import WeakStage

    files = {}
    for g in range(4):
        path = tmp_path / f"g{g}.parquet"
        ids = list(range(600 * g, 600 * (g + 1)))
        write_shard(pa.table({"row": ids, "input_ids": [[i % 50] * 400 for i in ids],
                              "output_ids": [[i % 50] * 400 for i in ids]}), path, row_group_bytes=100_000)
        files[f"web/l{g}"] = [(path, 600)]
    for rank, budget_mb, said in ((0, 1, True), (1, 1, False), (0, 2048, False)):
        cfg = load_config(JobConfig, "jobs/configs/weak_tiny.yaml", [f"data.reader_memory_mb={budget_mb}",
                                                                     "train.steps=10", "train.micro_batch_size=8"])
        stage = WeakStage(cfg, small_tokenizer, rank, 2)
        stage.prepare(files, {})
        out = capsys.readouterr().out
        assert bool(stage.stream.windows) == (budget_mb == 1)
        if said:
            cut = sorted(stage.stream.windows.values())
            assert len(cut) == 4 and cut[-1] < 300  # each rank has 300 rows a group
            assert (f"[weak] data.reader_memory_mb=1 holds 4 groups: 4 shuffle windows cut to {cut[0]:,}-{cut[-1]:,} "
                    "rows") in out
        else:
            assert "shuffle windows cut" not in out


def test_a_group_is_pooled_by_its_own_tasks_batch_and_no_micro_batch_repeats_a_row(tmp_path):
    """Tasks read batches of different sizes (supervised.batch_sizes): an STS group of 10 rows a rank is pooled at
    STS's batch of 32, not at retrieval's 4; a group that even pooled holds fewer rows a rank than its batch gives
    each rank its whole slice, once, in every batch of it (equal on both ranks)."""
    files = {}
    for g, n in {"sts/fr": 20, "sts/de": 200, "retrieval/en": 400}.items():
        path = tmp_path / f"{g.replace('/', '_')}.parquet"
        pq.write_table(pa.table({"x": list(range(n))}), path)
        files[g] = [(path, n)]
    batch_of = {"sts": 32, "retrieval": 4}
    ranks = [GroupedStream(files, {g: 1.0 for g in files}, 60, 0, rank, 2, lambda g: batch_of[g.split("/")[0]],
                           pool=lambda g: f"{g.split('/')[0]}/mixed") for rank in range(2)]
    assert ranks[0].groups == ["retrieval/en", "sts/de", "sts/mixed"]
    sizes = {}
    for i in range(60):
        batches = [stream.batch(i, batch_of[stream.group(i).split("/")[0]]) for stream in ranks]
        (group, rows), (_, other) = batches
        ids = [r["row_id"] for r in rows]
        assert len(set(ids)) == len(ids) == len(other) and not set(ids) & {r["row_id"] for r in other}
        sizes.setdefault(group, set()).add(len(ids))
    assert sizes == {"retrieval/en": {4}, "sts/de": {32}, "sts/mixed": {10}}


def test_a_stream_keeps_its_own_orders_and_orders_each_file_of_a_window_once(tmp_path):
    """A window over 10 files of 50 rows computes each file's row order once (a cache of 4 shared by every stream
    recomputed most of them per row), and a stream dropped is freed (the shared cache kept every stream alive)."""
    import gc
    import weakref

    files = []
    for f in range(10):
        path = tmp_path / f"{f}.parquet"
        pq.write_table(pa.table({"x": list(range(50))}), path)
        files.append((path, 50))
    stream = ShardStream(files, [0], 0, 1, window=500)
    positions = stream.positions(0, 500)
    assert sorted(positions) == [(f, r) for f in range(10) for r in range(50)]
    assert stream._row_order.cache_info().misses == 10
    other = ShardStream(files, [1], 0, 1, window=500)
    assert other.positions(0, 500) != positions and stream._row_order.cache_info().misses == 10
    alive = weakref.ref(other)
    del other
    gc.collect()
    assert alive() is None


def test_jsonl_columns_keep_their_types_past_the_first_block(tmp_path):
    """20,000 pairs without negatives or ids, then 20,000 with them (pyarrow infers a JSON column's type from its
    first ~1 MB block: `[]` and absent fields first made the later values an error): every row is sharded, the
    first ones with the defaults (also in the block where the fields begin), the later ones with their values."""
    import json

    from conan.data.shards import shard_file

    spec = RowSpec(("query", "positive", "negatives", "query_id", "positive_id"),
                   defaults={"negatives": [], "query_id": "", "positive_id": -1})
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": []} for i in range(20000)]
    rows += [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"], "query_id": f"id{i}", "positive_id": i}
             for i in range(20000)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "out").mkdir()
    written, _ = shard_file(tmp_path / "rows.jsonl", tmp_path / "out", "f00000", spec)
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / f.path) for f in written["all"]])
    assert table.num_rows == 40000 and table["negatives"].to_pylist()[::20000] == [[], ["n0"]]
    assert table["positive_id"].to_pylist()[19999:20001] == [-1, 0] and table["query_id"][-1].as_py() == "id19999"


def test_two_groups_of_one_digest_are_an_error_not_one_file(tmp_path, monkeypatch):
    """Shard names carry a group's 64-bit digest; were two groups of a file ever to share it, one file would hold one
    group and list under both: it is an error instead (simulated by a constant digest)."""
    import hashlib

    from conan.data import shards

    pq.write_table(pa.table({"query": ["a", "b"], "lang": ["en", "de"]}), tmp_path / "rows.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out2").mkdir()
    spec = RowSpec(("query", "lang"), group_by=("lang",))
    assert sorted(shards.shard_file(tmp_path / "rows.parquet", tmp_path / "out", "f0", spec)[0]) == ["de", "en"]
    sha1 = hashlib.sha1
    monkeypatch.setattr(shards.hashlib, "sha1", lambda data: sha1(b"one digest"))
    with pytest.raises(ShardError, match="share the shard name digest"):
        shards.shard_file(tmp_path / "rows.parquet", tmp_path / "out2", "f0", spec)
