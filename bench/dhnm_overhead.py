"""DHNM overhead: supervised step time with the shared NegativePool ÷ static negatives, and the v1 approach, one run.

Three supervised runs on the same tiny model, data (XQuAD retrieval + cross-lingual retrieval) and seed,
2 Ray Train workers with DeepSpeed on gloo:
  static  the rows' own negatives, no pool
  dhnm    the pool (scores read off the loss's similarity matrix, reported fire-and-forget)
  v1      the pool, re-scored with an extra no-grad forward pass over every managed query and its
          active negatives every K steps (dhnm.rescore_every), as Conan-embedding-v1 did
Prints mean step time and model forward calls per step of each, dhnm ÷ static (goal ≤ 1.03, forwards
equal) and v1 ÷ static. Mining (once, before training) is timed separately.

    python bench/dhnm_overhead.py [--steps 40] [--rescore-every 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from conan.config import JobConfig, default_data_root, load_config
from conan.data.stage_data import pair_records
from conan.runtime import init_ray
from conan.train.launcher import mine_negatives, run_stage, with_demo_data
from conan.train.stages import stage_class

from _tiny import tiny_embedding_model

WARMUP_WINDOWS = 1  # the first log window holds DeepSpeed's first steps


def run(name: str, tmp: Path, steps: int, batch: int, *overrides: str) -> dict:
    """One supervised run; returns its mean step time and forwards per step (warm-up window excluded)."""
    cfg = load_config(JobConfig, None, [
        "stage=supervised", f"output_dir={tmp / name}", f"model.init_from={tmp / 'model'}", f"train.steps={steps}",
        "train.num_workers=2", "train.cpus_per_worker=0.9", "train.log_every=5", f"train.checkpoint_every={steps}",
        "supervised.task_weights={retrieval: 1.0, clr: 1.0}", f"supervised.batch_sizes={{retrieval: {batch}, clr: {batch}}}",
        "supervised.max_per_task=400", "data.seq_len=192", "dhnm.pool_size=60",
        f"dhnm.candidates={tmp / 'mined.parquet'}", *overrides])
    run_stage(cfg)
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()][WARMUP_WINDOWS:]
    return {"step_time_s": statistics.mean(r["step_time_s"] for r in rows),  # mean: v1 spikes every K steps
            "forwards_per_step": sum(r["forwards_per_step"] for r in rows) / len(rows)}


def main() -> None:
    """Mine once, run static / dhnm / v1, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rescore-every", type=int, default=10, help="K of the v1 baseline")
    parser.add_argument("--batch", type=int, default=8, help="queries per worker per step (7 negatives each)")
    args = parser.parse_args()

    pairs = pair_records(default_data_root(), max_rows=4000)
    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_embedding_model((t for p in pairs for t in (p["input"], p["output"])), tmp / "model")

        mining_cfg = with_demo_data(load_config(JobConfig, None, [
            "stage=supervised", f"output_dir={tmp}", f"model.init_from={tmp / 'model'}", "dhnm.pool_size=60",
            f"dhnm.candidates={tmp / 'mined.parquet'}", "supervised.max_per_task=400"]), stage_class("supervised"))
        start = time.perf_counter()
        mine_negatives(mining_cfg)
        mining_s = time.perf_counter() - start

        static = run("static", tmp, args.steps, args.batch)
        dhnm = run("dhnm", tmp, args.steps, args.batch, "dhnm.enabled=true")
        v1 = run("v1", tmp, args.steps, args.batch, "dhnm.enabled=true", f"dhnm.rescore_every={args.rescore_every}")

    print(f"2 workers × 0.9 CPU, batch {args.batch} queries × (1 positive + 7 negatives) per worker, "
          f"{args.steps} steps, mean over 5-step windows (first window excluded)")
    print(f"mining (once, before training): {mining_s:.1f} s")
    for name, r in (("static negatives", static), ("DHNM (pool)", dhnm), (f"v1 re-score every {args.rescore_every}", v1)):
        print(f"{name:24s} step {r['step_time_s'] * 1000:8.1f} ms   forwards/step {r['forwards_per_step']:.2f}")
    print(f"DHNM / static step time = {dhnm['step_time_s'] / static['step_time_s']:.3f}   (goal ≤ 1.03); "
          f"forwards/step equal: {dhnm['forwards_per_step'] == static['forwards_per_step']}")
    print(f"v1 / static step time   = {v1['step_time_s'] / static['step_time_s']:.3f}")


if __name__ == "__main__":
    main()
