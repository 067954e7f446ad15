"""Data-step parts sort into input order whatever the batch boundaries were (the same rows, the same order, every run)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.sink import part_names, write_split

SCHEMA = pa.schema([("text", pa.string())])


def _write(batches: list[list[int]], origins: list[str], out) -> list[str]:
    """Writes the rows in these batches (row indices) and reads the kept texts back in file-name order."""
    for rows in batches:
        batch = {"origin": np.asarray([origins[i] for i in rows], dtype=object),
                 "text": np.asarray([f"t{i}" for i in rows], dtype=object),
                 "reject_reason": np.asarray(["too_short" if i % 7 == 0 else "" for i in rows], dtype=object),
                 "raw": np.asarray(["" for _ in rows], dtype=object)}
        counts = write_split(batch, str(out), SCHEMA, "test", "test")
        assert int(np.sum(counts["count"])) == len(rows)
    return [t for f in sorted((out / "data").glob("*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]


def test_parts_sort_into_input_order_for_any_batching(tmp_path):
    """Two input files (b.jsonl after a.jsonl), batched in two different ways, one batch spanning both files."""
    origins = [f"/in/a.jsonl:{n}" for n in range(1, 41)] + [f"/in/b.jsonl:{n}" for n in range(3, 33)]
    first = _write([list(range(0, 25)), list(range(25, 50)), list(range(50, 70))], origins, tmp_path / "one")
    second = _write([list(range(0, 8)), list(range(8, 61)), list(range(61, 70))], origins, tmp_path / "two")
    kept = [f"t{i}" for i in range(70) if i % 7]
    assert first == second and sorted(first) == sorted(kept)
    by_file = {f: [t for t in kept if (int(t[1:]) < 40) == (f == "a")] for f in "ab"}
    assert first in (by_file["a"] + by_file["b"], by_file["b"] + by_file["a"])  # each file's rows in line order
    # A retried batch writes the same names: it overwrites instead of duplicating.
    assert _write([list(range(0, 25))], origins, tmp_path / "one") == first


def test_origins_without_line_numbers_name_parts_by_their_rows():
    """Origins without a number: the part's name hashes all its origins, so equal batches from two files differ."""
    a, b = part_names(["s3://x/a.parquet"] * 3), part_names(["s3://x/b.parquet"] * 3)
    assert a[0][0] != b[0][0] and a[0][1].all()
    spans = part_names(["/in/a.jsonl:9", "/in/a.jsonl:10", "/in/b.jsonl:1"])
    assert [name.rsplit("-", 1)[1] for name, _ in spans] == ["000000000009", "000000000001"]
    assert [rows.tolist() for _, rows in spans] == [[True, True, False], [False, False, True]]
