"""DHNM pools at the paper's scale: 10M synthetic queries × 30 candidates × 7 active over 4 NegativePool actors.

What the supervised stage does with them, timed: `assign` (64 queries a call, the client's round trip), `report`
(64 queries × 7 scores, then `flush` so the call is timed until the actors applied it; its submission alone is
printed too), `stats` (what each metrics report asks); then the calls as the training loop makes them (step t+1's
queries prefetched after step t's report, --step-ms of compute between): what a step waits for (`step_wait`), and a
no-op round trip to every shard (`ping`, Ray's floor for any call here); the same calls on one shard's arrays in
this process (the actors' own work, without Ray's round trips), and a checkpoint as the training loop makes one
(client.state_dict → save_state, then load_state → client.load_state_dict). Memory is the 4 actor processes' unique
set (USS) after loading, summed (RSS printed too).

    python bench/dhnm_pool_scale.py [--queries 10000000] [--candidates 30] [--active 7] [--shards 4] [--calls 500]
                                  [--step-ms 20]

Last line: dhnm_pool queries=<n> bytes=<actor USS> assign_p99_ms=<…> report_p99_ms=<…> stats_p99_ms=<…>
           checkpoint_s=<save + load> step_wait_p99_ms=<…> ping_p99_ms=<…>
           (goals: bytes ≤ 3e9, assign and report p99 ≤ 5 ms, checkpoint ≤ 30 s)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray

from conan.dhnm import NegativePoolState, create_negative_pools, query_keys
from conan.train.checkpoint import load_state, save_state

CHUNK = 1_000_000


def percentile_ms(seconds: list[float], q: float) -> float:
    """A percentile of call times, in milliseconds."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q))


def main() -> None:
    """Load the pools, time the calls and a checkpoint, print the line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000_000)
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--active", type=int, default=7)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--step-ms", type=float, default=20.0, help="compute a training step spends between its "
                        "report and the next step's assign (the prefetch's window)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)

    t = time.perf_counter()
    names = [f"q{i}" for i in range(args.queries)]
    keys = np.concatenate([query_keys(names[i:i + CHUNK]) for i in range(0, args.queries, CHUNK)])
    candidates = rng.integers(0, 5_000_000, (args.queries, args.candidates), dtype=np.int32)
    print(f"synthetic pools: {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    client = create_negative_pools(keys, candidates, "bench-dhnm", args.shards, num_active=args.active)
    del candidates
    print(f"loaded into {args.shards} actors: {time.perf_counter() - t:.1f}s", flush=True)
    pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in client.actors])
    # USS: the pages only the actor holds. RSS also counts the object store's shared pages an actor mapped while
    # its arrays arrived; the store frees them and they are not the actor's.
    memory = [psutil.Process(p).memory_full_info() for p in pids]
    uss, rss = sum(m.uss for m in memory), sum(m.rss for m in memory)
    arrays = sum(v.nbytes for s in ray.get([a.state_dict.remote() for a in client.actors])
                 for v in s.values() if isinstance(v, np.ndarray))
    print(f"actors: USS {uss / 1e9:.2f} GB, RSS {rss / 1e9:.2f} GB, pool arrays {arrays / 1e9:.2f} GB", flush=True)

    timings: dict[str, list[float]] = {"assign": [], "report": [], "report_submit": [], "stats": []}
    for _ in range(args.calls):
        batch = [names[i] for i in rng.integers(0, args.queries, 64)]
        t = time.perf_counter()
        assigned = client.assign(batch)
        timings["assign"].append(time.perf_counter() - t)
        scores = rng.uniform(0.0, 1.0, (64, args.active)).tolist()
        t = time.perf_counter()
        client.report(batch, assigned, scores)
        timings["report_submit"].append(time.perf_counter() - t)  # what a training step waits for
        client.flush()
        timings["report"].append(time.perf_counter() - t)  # until the actors applied it
        t = time.perf_counter()
        stats = client.stats()
        timings["stats"].append(time.perf_counter() - t)
    print(f"after {args.calls} steps: {stats}", flush=True)
    # As the training loop calls them: step t's report is submitted, step t+1's queries prefetched, and the step's
    # compute (here a sleep of --step-ms: an accelerator's step leaves the CPU to the actors) hides the round trips;
    # what a step then waits for is the prefetched assign and the report's submission. The no-op round trip to every
    # shard (ping) is Ray's floor for a call on this machine.
    batches = [[names[i] for i in rng.integers(0, args.queries, 64)] for _ in range(args.calls + 1)]
    client.prefetch(batches[0])
    for step in range(args.calls):
        t = time.perf_counter()
        assigned = client.assign(batches[step])
        client.report(batches[step], assigned, rng.uniform(0.0, 1.0, (64, args.active)).tolist())
        client.prefetch(batches[step + 1])
        timings.setdefault("step_wait", []).append(time.perf_counter() - t)
        time.sleep(args.step_ms / 1e3)
        t = time.perf_counter()
        client.flush()
        timings.setdefault("ping", []).append(time.perf_counter() - t)
    stats = client.stats()
    # The pool's own work for one shard's share, without Ray's round trips (what the actors spend per call).
    local = NegativePoolState(num_active=args.active)
    share = args.queries // args.shards
    local.load_arrays(keys[:share], rng.integers(0, 5_000_000, (share, args.candidates), dtype=np.int32))
    for _ in range(args.calls):
        batch = keys[rng.integers(0, share, 64 // args.shards)]
        t = time.perf_counter()
        assigned = local.assign(batch)
        timings.setdefault("in_actor_assign", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        local.report(batch, assigned, rng.uniform(0.0, 1.0, (len(batch), args.active)).tolist())
        timings.setdefault("in_actor_report", []).append(time.perf_counter() - t)
    del local
    for name, seconds in timings.items():
        print(f"{name}: p50 {percentile_ms(seconds, 50):.2f} ms, p99 {percentile_ms(seconds, 99):.2f} ms", flush=True)

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pool.pt"
        t = time.perf_counter()
        state = client.state_dict()
        fetched = time.perf_counter() - t
        save_state(state, path)  # as the training loop writes it into a checkpoint
        del state
        saved = time.perf_counter() - t
        t = time.perf_counter()
        client.load_state_dict(load_state(path))
        loaded = time.perf_counter() - t
        print(f"checkpoint: save {saved:.1f}s ({fetched:.1f}s of it fetching from the actors), load {loaded:.1f}s, "
              f"{path.stat().st_size / 1e9:.2f} GB", flush=True)
    assert client.stats() == stats, "the restored pools differ"
    print(f"dhnm_pool queries={args.queries} bytes={uss} assign_p99_ms={percentile_ms(timings['assign'], 99):.2f} "
          f"report_p99_ms={percentile_ms(timings['report'], 99):.2f} "
          f"stats_p99_ms={percentile_ms(timings['stats'], 99):.2f} checkpoint_s={saved + loaded:.1f} "
          f"step_wait_p99_ms={percentile_ms(timings['step_wait'], 99):.2f} "
          f"ping_p99_ms={percentile_ms(timings['ping'], 99):.2f}", flush=True)


if __name__ == "__main__":
    main()
