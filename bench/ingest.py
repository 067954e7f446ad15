"""Training ingest at scale: the weak stage over 1M and 20M synthetic pairs, streamed from shards, against the
in-memory path it replaced (commit IN_MEMORY_COMMIT, measured in the same run at --baseline rows: 1M by default; on
a 24 GiB machine it is killed for memory there, so pass a size it survives and the line compares against that).

The bench writes the synthetic pairs to parquet itself (1M rows a file, 4 languages × 2 sources), shards and
tokenizes them (the launcher's streamed, one-task-per-file conversion, then the Ray Data tokenizer pool), then trains
a tiny model on them with 2 workers. Peak RSS of the driver process and of each Ray Train worker is sampled every
0.2 s; throughput is the stage's reported samples/s after its first report window.

    python bench/ingest.py [--small 1000000] [--large 20000000] [--baseline 1000000] [--steps 200]
                           [--out /tmp/conan-ingest] [--reuse-shards]

Last line: ingest rows=<large> driver_rss_ratio=<large/small> worker_rss_ratio=<large/small>
           throughput_ratio=<streaming at large / in-memory at baseline>   (goals: ≤ 1.10, ≤ 1.10, ≥ 0.95)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
IN_MEMORY_COMMIT = "fbd6f15"  # the last commit whose launcher read every row on the driver and in every worker
ROWS_PER_FILE = 1_000_000
WORDS = [f"w{i}" for i in range(2000)]

STAGE = """
import json, sys
from conan.config import JobConfig, load_config
from conan.train.launcher import run_stage
cfg = load_config(JobConfig, "jobs/configs/weak_tiny.yaml", json.loads(sys.argv[1]))
print("METRICS " + json.dumps(run_stage(cfg).metrics), flush=True)
"""

SHARD = """
import json, sys
from conan.config import JobConfig, load_config
from conan.runtime import init_ray
from conan.train.launcher import absolute_paths, check_inputs, stage_shards
from conan.train.stages import WeakStage
cfg = absolute_paths(load_config(JobConfig, "jobs/configs/weak_tiny.yaml", json.loads(sys.argv[1])))
init_ray(None)
print("SHARDS " + json.dumps(stage_shards(cfg, WeakStage, check_inputs(cfg))), flush=True)
"""


def synthetic_pairs(out: Path, rows: int, seed: int = 0) -> Path:
    """`rows` (query, passage) pairs of random words in 1M-row parquet files (reused when present)."""
    out.mkdir(parents=True, exist_ok=True)
    words = pa.array(WORDS)
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        path = out / f"pairs-{i:04d}.parquet"
        if path.is_file():
            continue
        n = min(ROWS_PER_FILE, rows - start)
        rng = np.random.default_rng([seed, i])

        def text(k: int) -> pa.Array:
            return pc.binary_join_element_wise(*(words.take(pa.array(rng.integers(0, len(WORDS), n)))
                                                 for _ in range(k)), " ")
        table = pa.table({"input": text(6), "output": text(24),
                          "lang": pa.array(np.array(["en", "de", "zh", "ar"])[rng.integers(0, 4, n)]),
                          "source": pa.array(np.array(["web", "qa"])[rng.integers(0, 2, n)])})
        pq.write_table(table, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return out


class PeakRSS:
    """Samples the RSS of a process and of the Ray Train workers on this machine; keeps the peaks."""

    def __init__(self, pid: int):
        self.pid, self.driver, self.workers, self._stop = pid, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
                try:
                    rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
                    title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
                except (psutil.Error, TypeError):
                    continue
                if p.info["pid"] == self.pid:
                    self.driver = max(self.driver, rss)
                elif "RayTrainWorker" in title:
                    self.workers = max(self.workers, rss)
            time.sleep(0.2)

    def stop(self) -> tuple[int, int]:
        """(driver peak, largest worker peak) in bytes."""
        self._stop.set()
        self._thread.join()
        return self.driver, self.workers


def run(script: str, overrides: list[str], cwd: Path, label: str) -> dict:
    """Run a driver script in its own process; its output, wall time and peak memories."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "RAY_DEDUP_LOGS": "0"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(overrides)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = PeakRSS(proc.pid)
    output = proc.communicate()[0]
    driver, worker = peaks.stop()
    if proc.returncode:
        raise SystemExit(f"{label} failed:\n{output[-4000:]}")
    wall = time.perf_counter() - t
    print(f"{label}: {wall:.0f}s, driver peak {driver / 2**20:.0f} MiB, worker peak {worker / 2**20:.0f} MiB",
          flush=True)
    return {"output": output, "wall_s": wall, "driver_rss": driver, "worker_rss": worker}


def throughput(output_dir: Path) -> float:
    """Mean reported samples/s after the first report window (start-up excluded)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["samples_per_s"] for r in rows[1:])


def baseline_checkout(out: Path) -> Path:
    """A worktree of the in-memory commit (created once)."""
    path = out / f"in-memory-{IN_MEMORY_COMMIT}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), IN_MEMORY_COMMIT],
                       check=True, capture_output=True)
    return path


def main() -> None:
    """Generate, shard, train three times, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1_000_000)
    parser.add_argument("--large", type=int, default=20_000_000)
    parser.add_argument("--baseline", type=int, default=1_000_000, help="rows the in-memory path trains on")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("/tmp/conan-ingest"))
    parser.add_argument("--reuse-shards", action="store_true",
                        help="keep the streaming runs' shards from an earlier run of the same sizes (their sharding "
                             "time is then a manifest check, not a measurement)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "bench"))
    from _tiny import tiny_embedding_model

    model = out / "model"
    if not (model / "config.json").is_file():
        # sdpa by name: the in-memory commit predates "auto" (which is sdpa on CPU), and both paths load this model.
        tiny_embedding_model(WORDS * 5, model, vocab_size=2300, attention_backend="sdpa")
    t = time.perf_counter()
    small = synthetic_pairs(out / f"pairs-{args.small}", args.small)
    large = synthetic_pairs(out / f"pairs-{args.large}", args.large)
    baseline = synthetic_pairs(out / f"pairs-{args.baseline}", args.baseline)
    print(f"synthetic pairs written ({time.perf_counter() - t:.0f}s)", flush=True)

    def overrides(data: Path, name: str) -> list[str]:
        return [f"output_dir={out / 'runs' / name}", f"model.init_from={model}", f"data.paths=[{data}]",
                f"train.steps={args.steps}", "train.micro_batch_size=32", "train.log_every=20",
                f"train.checkpoint_every={args.steps}", "data.seq_len=48", "soft_mask.enabled=false",
                # One precision for both paths: the in-memory commit's "auto" is fp32 on every CPU, today's is bf16
                # where the CPU multiplies bf16 natively (which would make the ratio measure precision, not ingest).
                "train.precision=fp32"] + ([] if name == "in_memory" else [
                # The in-memory commit's step: texts padded, not packed (weak_tiny.yaml packs them now; on these
                # equal-length synthetic texts packing only adds work).
                "data.pack_texts=false"])

    # Every training figure from this run: no resumed stage; no reused shards either, unless asked.
    for run_dir in (out / "runs").glob("*"):
        for part in run_dir.iterdir():
            if args.reuse_shards and part.name == "shards":
                continue
            if part.is_dir():
                shutil.rmtree(part)
            else:
                part.unlink()
    results = {}
    for name, data in (("streaming_small", small), ("streaming_large", large)):
        results[name + "_shard"] = run(SHARD, overrides(data, name), REPO, f"shard {name}")
    results["in_memory"] = run(STAGE, overrides(baseline, "in_memory"), baseline_checkout(out),
                               f"train in-memory ({IN_MEMORY_COMMIT}) {args.baseline:,} rows")
    for name, rows in (("streaming_small", args.small), ("streaming_large", args.large)):
        results[name] = run(STAGE, overrides(small if name.endswith("small") else large, name), REPO,
                            f"train streaming {rows:,} rows")
    # The in-memory run must have been the old code (no shards), the streaming ones the new.
    assert not (out / "runs" / "in_memory" / "shards").exists(), "the baseline ran the streaming code"
    assert (out / "runs" / "streaming_large" / "shards").is_dir()
    speed = {name: throughput(out / "runs" / name) for name in ("in_memory", "streaming_small", "streaming_large")}
    for name, value in speed.items():
        print(f"{name}: {value:.0f} samples/s, wall {results[name]['wall_s']:.0f}s", flush=True)
    s, l = results["streaming_small"], results["streaming_large"]
    print(f"in-memory at {args.baseline:,} rows: driver {results['in_memory']['driver_rss'] / 2**20:.0f} MiB, "
          f"worker {results['in_memory']['worker_rss'] / 2**20:.0f} MiB; sharding {args.large:,} rows took "
          f"{results['streaming_large_shard']['wall_s']:.0f}s (driver peak "
          f"{results['streaming_large_shard']['driver_rss'] / 2**20:.0f} MiB)", flush=True)
    print(f"ingest rows={args.large} driver_rss_ratio={l['driver_rss'] / s['driver_rss']:.3f} "
          f"worker_rss_ratio={l['worker_rss'] / s['worker_rss']:.3f} "
          f"throughput_ratio={speed['streaming_large'] / speed['in_memory']:.3f}", flush=True)


if __name__ == "__main__":
    main()
