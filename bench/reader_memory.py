"""A worker's reader over many shard groups: what it holds with data.reader_memory_mb binding, against the same
reader with memory unbounded (each group then holds its whole window, as every group did before the budget).

The bench writes synthetic weak-pair token shards itself (`--groups` source × language groups, one file of `--rows`
rows each, in the platform's ~8 MiB row groups; ids of 20-60 query and 60-190 passage tokens, uint32) and reads
`--batches` micro-batches of 32 as rank 0 of 2 in a fresh process per mode, sampling its RSS every 50 ms. The
budgeted run's shuffle windows are cut to fit (printed); each rank's rows per epoch are the same in both.

    python bench/reader_memory.py [--groups 100] [--rows 30000] [--budget-mb 512] [--batches 4000]

Last line: reader_memory groups=<G> rows=<total> budget_mb=<B> rss_ratio=<budgeted/unbounded peak RSS growth>
           throughput_ratio=<budgeted/unbounded rows/s> budgeted_peak_mb=<…> unbounded_peak_mb=<…>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]

READ = """
import json, sys, time
from pathlib import Path
from conan.data.stream import GroupedStream
spec = json.loads(sys.argv[1])
files = {g: [(Path(p), n) for p, n in fs] for g, fs in spec["files"].items()}
weights = {g: 1.0 for g in files}
print("READY", flush=True)
sys.stdin.readline()
stream = GroupedStream(files, weights, spec["batches"], 0, 0, 2, 32, memory_bytes=spec["budget"])
start, rows = time.perf_counter(), 0
for index in range(spec["batches"]):
    rows += len(stream.batch(index, 32)[1])
seconds = time.perf_counter() - start
cut = sorted(stream.windows.values())
print("RESULT " + json.dumps({"rows_per_s": rows / seconds, "cache_peak_mb": stream.cache.peak / 2**20,
                              "windows": [cut[0], cut[-1]] if cut else []}), flush=True)
"""


def write_groups(out: Path, groups: int, rows: int) -> dict[str, list]:
    """One token shard of `rows` synthetic pairs per group; returns group → [(path, rows)]."""
    from conan.data.shards import write_shard

    rng = np.random.default_rng(0)
    files = {}
    for g in range(groups):
        columns = {}
        for name, low, high in (("input_ids", 20, 61), ("output_ids", 60, 191)):
            lengths = rng.integers(low, high, rows)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = pa.array(rng.integers(0, 150_000, int(offsets[-1])).astype(np.uint32))
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
        path = out / f"group{g:04d}.parquet"
        write_shard(pa.table(columns), path)
        files[f"web/l{g:04d}"] = [(str(path), rows)]
    return files


def run(files: dict, budget: int, batches: int) -> dict:
    """Read the batches in a fresh process; its result and its RSS growth while reading (MiB)."""
    spec = json.dumps({"files": files, "budget": budget, "batches": batches})
    proc = subprocess.Popen([sys.executable, "-c", READ, spec], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    process = psutil.Process(proc.pid)
    base = process.memory_info().rss
    peak = [base]

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.stdin.write("\n")
    proc.stdin.flush()
    out = proc.stdout.read()
    proc.wait()
    sampler.join()
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, "rss_growth_mb": (peak[0] - base) / 2**20}


def main() -> None:
    """Write the groups, read them unbounded and under the budget, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--rows", type=int, default=30_000, help="rows a group")
    parser.add_argument("--budget-mb", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = write_groups(Path(tmp), args.groups, args.rows)
        data_mb = sum(Path(p).stat().st_size for fs in files.values() for p, _ in fs) / 2**20
        print(f"wrote {args.groups} groups × {args.rows:,} rows ({data_mb:,.0f} MiB of parquet) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        unbounded = run(files, 1 << 40, args.batches)
        budgeted = run(files, args.budget_mb << 20, args.batches)
    for name, r in (("unbounded", unbounded), ("budgeted", budgeted)):
        print(f"{name}: {r['rows_per_s']:,.0f} rows/s, RSS growth {r['rss_growth_mb']:,.0f} MiB, row groups held "
              f"at most {r['cache_peak_mb']:,.0f} MiB, windows cut to {r['windows'] or 'none'}", flush=True)
    print(f"reader_memory groups={args.groups} rows={args.groups * args.rows} budget_mb={args.budget_mb} "
          f"rss_ratio={budgeted['rss_growth_mb'] / unbounded['rss_growth_mb']:.3f} "
          f"throughput_ratio={budgeted['rows_per_s'] / unbounded['rows_per_s']:.3f} "
          f"budgeted_peak_mb={budgeted['rss_growth_mb']:.0f} unbounded_peak_mb={unbounded['rss_growth_mb']:.0f}")


if __name__ == "__main__":
    main()
