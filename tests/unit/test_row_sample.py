"""data.max_rows: a seeded sample of rows over all input files, split per file (conan.data.shards._sample)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def test_the_sample_is_seeded_uniform_over_files_and_split_per_file(tmp_path):
    from conan.data.shards import _sample

    counts = [50, 0, 70, 1, 30]
    files = []
    for i, n in enumerate(counts):
        files.append(tmp_path / f"f{i}.parquet")
        pq.write_table(pa.table({"text": [f"{i}:{r}" for r in range(n)]}), files[-1])
    keep = _sample(files, 60, seed=3)
    assert sum(len(k) for k in keep.values()) == 60 and set(keep) == set(range(len(files)))
    assert all(np.all(np.diff(k) > 0) and (len(k) == 0 or 0 <= k[0] <= k[-1] < n) for k, n in zip(keep.values(), counts))
    # The rows a seed picks are the rows it picked before (the demo's SFT sample rests on them): one draw of 60 of the
    # 151 rows in order of the files.
    chosen = np.sort(np.random.default_rng([3, 11]).choice(151, 60, replace=False))
    starts = np.cumsum([0, *counts])
    assert all(keep[i].tolist() == [c - starts[i] for c in chosen if starts[i] <= c < starts[i + 1]]
               for i in range(len(files)))
    assert _sample(files, 60, seed=4)[0].tolist() != keep[0].tolist()
    assert _sample(files, 151, seed=3) == {} and _sample(files, None, seed=3) == {}
