"""Kill the pipeline's driver (SIGKILL) at two random moments, run it again after each, and compare the result with an
undisturbed run of the same seed: the final model's weights and the evaluation's scores (issue 17 item 4).

The pipeline is the demo's (`jobs/configs/pipeline_tiny.yaml`, bundled data) with every stage's steps cut to
`--steps-fraction` of the demo's and a checkpoint every 10 steps, so a kill lands in any step (data steps restart,
stages resume from their last checkpoint, finished steps are skipped), and a small evaluation. The undisturbed run
goes first and its wall time T sets the kill points: the first after a uniform draw in (0.1 T, 0.9 T) of the first
attempt, the second likewise within what the second attempt has left to do. After a kill the driver's Ray
processes are counted (they should follow it) and any left are killed before the next attempt.

    python bench/pipeline_kill.py [--seed 0] [--steps-fraction 0.15]

Last line: `pipeline_kill kills=<n> same_model=<bool> same_scores=<bool> max_weight_diff=<…> max_score_diff=<…>
leftover_ray_processes=<…> clean_seconds=<…>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "sft", "weak", "supervised"]


def shortened_pipeline(out: Path, fraction: float) -> Path:
    """The demo's pipeline config with every stage's steps scaled by `fraction` and a checkpoint every 10 steps."""
    stage_paths = []
    for stage in STAGES:
        cfg = yaml.safe_load((ROOT / "jobs" / "configs" / f"{stage}_tiny.yaml").read_text())
        steps = max(20, int(cfg["train"]["steps"] * fraction))
        cfg["train"].update(steps=steps, checkpoint_every=10, log_every=10, keep_checkpoints=2)
        path = out / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        stage_paths.append(str(path))
    pipeline = yaml.safe_load((ROOT / "jobs" / "configs" / "pipeline_tiny.yaml").read_text())
    evaluation = out / "eval.yaml"
    evaluation.write_text("tasks: [xquad-retrieval, stsb, banking77]\nlangs: [en, de, zh]\nmax_items: 60\n"
                          "bm25: false\nplots: false\n")
    pipeline.update(stages=stage_paths, evaluation=str(evaluation))
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def start(config: Path, run: Path, log: Path) -> subprocess.Popen:
    """`conan pipeline` as its own process (session), its output appended to `log`."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONAN_DATA_ROOT", "RAY_ADDRESS")}
    return subprocess.Popen([sys.executable, "-m", "conan.cli", "pipeline", "--config", str(config), "--set",
                             f"output_dir={run}"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of one session (the killed driver's Ray head and workers, if they outlived it)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over matching arrays of two weight dicts."""
    return max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)


def score_leaves(scores, prefix=""):
    """Flatten the scores.json tree into {path: value}."""
    if isinstance(scores, dict):
        out = {}
        for k, v in scores.items():
            out.update(score_leaves(v, f"{prefix}/{k}"))
        return out
    return {prefix: scores}


def main() -> None:
    """Undisturbed run, then a run killed twice and completed; print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-fraction", type=float, default=0.15)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pipeline-kill-"))
    config = shortened_pipeline(work, args.steps_fraction)

    began = time.perf_counter()
    clean = start(config, work / "clean", work / "clean.log")
    if clean.wait() != 0:
        raise SystemExit(f"the undisturbed run failed: see {work / 'clean.log'}")
    clean_seconds = time.perf_counter() - began
    print(f"undisturbed run: {clean_seconds:.0f} s", flush=True)

    kills, leftovers, remaining = 0, 0, clean_seconds
    while True:
        attempt = start(config, work / "killed", work / "killed.log")
        if kills < 2:
            delay = rng.uniform(0.1, 0.9) * remaining
            began = time.perf_counter()
            try:
                attempt.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                attempt.send_signal(signal.SIGKILL)
                attempt.wait()
                kills += 1
                remaining -= delay
                time.sleep(10)  # what the driver's Ray does once its driver is gone
                left = session_processes(attempt.pid)
                leftovers += len(left)
                for p in left:
                    p.kill()
                tail = (work / "killed.log").read_text().splitlines()[-1:]
                print(f"kill {kills} after {time.perf_counter() - began - 10:.0f} s; {len(left)} of its processes "
                      f"left; last line: {tail}", flush=True)
                continue
        if attempt.wait() != 0:
            raise SystemExit(f"the run after {kills} kills failed: see {work / 'killed.log'}")
        break

    weights = [load_file(work / run / "supervised" / "model" / "model.safetensors") for run in ("clean", "killed")]
    weight_diff = max_abs_diff(*weights)
    scores = [score_leaves(json.loads((work / run / "eval" / "scores.json").read_text()))
              for run in ("clean", "killed")]
    numeric = [k for k, v in scores[0].items() if isinstance(v, (int, float)) and "seconds" not in k]
    score_diff = max(abs(scores[0][k] - scores[1][k]) for k in numeric)
    print(f"work dir: {work}")
    print(f"pipeline_kill kills={kills} same_model={weight_diff < 1e-4} same_scores={score_diff < 1e-3} "
          f"max_weight_diff={weight_diff:.3g} max_score_diff={score_diff:.3g} leftover_ray_processes={leftovers} "
          f"clean_seconds={clean_seconds:.0f}")


if __name__ == "__main__":
    main()
