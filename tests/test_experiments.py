"""Experiments on Ray Tune against the session's head: the soft-mask sweep (Table 12) and the ablation (Table 4)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conan.config import AblationConfig, SweepConfig, load_config
from conan.experiments.trials import GROUPS

# Short runs from the session's random tiny embedding model: the point is the machinery, not the scores.
SHORT = ["train.num_workers=1", "train.steps=8", "train.log_every=2", "train.checkpoint_every=8",
         "data.max_rows=400", "supervised.max_per_task=40", "supervised.retrieval_langs=[en]", "dhnm.pool_size=20"]
DEV = ["max_items=30", "langs=[en, zh, de]"]


@pytest.fixture(scope="module")
def dev_eval_yaml(tmp_path_factory):
    """The shipped quick dev evaluation, cut to 30 items in three languages."""
    import yaml

    from conan.config import EvalConfig, to_dict

    path = tmp_path_factory.mktemp("dev") / "eval_dev.yaml"
    path.write_text(yaml.safe_dump(to_dict(load_config(EvalConfig, "jobs/configs/eval_dev_tiny.yaml", DEV))))
    return str(path)


def _scores(row: str) -> list[float]:
    return [float(x) for x in row.strip("|").split("|")[3:6]]


def test_mask_sweep_runs_three_trials_on_two_cpus(ray_cluster, embedding_model_dir, tokenizer_dir, tmp_path,
                                                  dev_eval_yaml):
    """Three schedules as three Tune trials: two run at once on 2 CPUs (0.1 for each Tune function + 0.9 for its
    worker), each streams its α(t) to Tune, and the table has Table 12's shape with measured scores."""
    from conan.experiments.sweep_mask import run_sweep

    cfg = load_config(SweepConfig, "jobs/configs/sweep_mask_tiny.yaml", [
        f"output_dir={tmp_path}", f"overrides={[f'model.init_from={embedding_model_dir}', f'tokenizer.path={tokenizer_dir}', *SHORT]}",
        "rank_reduction=[true]", "temperatures=[0.05]", f"evaluation={dev_eval_yaml}"])
    path = run_sweep(cfg)
    results = json.loads((tmp_path / "sweep_mask.json").read_text())
    assert sorted(results) == ["accelerating+rank-t0.05", "decelerating+rank-t0.05", "linear+rank-t0.05"]
    events = sorted([(r["started"], 1) for r in results.values()] + [(r["finished"], -1) for r in results.values()])
    running = [sum(change for _, change in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 2, events  # two trials at once, never three
    # α(t) as Tune received it: at the same step accelerating < linear < decelerating (eq. 3-4, App. C).
    alpha = {name.split("+")[0]: {h["step"]: h["alpha"] for h in r["history"]} for name, r in results.items()}
    mid = 4
    assert alpha["accelerating"][mid] < alpha["linear"][mid] < alpha["decelerating"][mid]
    text = path.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| (Linear|Accelerating|Decelerating) \| yes", line)]
    assert len(rows) == 3
    for row in rows:
        assert all(0.0 <= s <= 100.0 and not math.isnan(s) for s in _scores(row))
    assert "| Linear | 61.73 | 70.41 | 70.99 |" in text  # the paper's Table 12 beside ours
    assert all(results[name][g] * 100 == pytest.approx(s, abs=0.006) for name, row in
               zip(sorted(results, key=lambda n: ["lin", "acc", "dec"].index(n[:3])), rows)
               for g, s in zip(GROUPS, _scores(row)))


def test_ablation_runs_every_row_with_seeds_and_reports_mean_and_std(ray_cluster, embedding_model_dir, tokenizer_dir,
                                                                    tmp_path, dev_eval_yaml):
    """Weak runs with the soft mask and without it per seed, then Table 4's six rows per seed; each row's switches
    reach the stage (schedule, CLR weight, DHNM pool), and the tables hold mean ± std over the seeds beside the
    paper's numbers. One schedule keeps it to 16 trials: Table 12's other schedules are one more SM-only row each
    (tests/unit/test_ablation_rows.py), and each schedule's α(t) reaching its trial is the sweep test's."""
    from conan.experiments.ablation import row_name, run_ablation, supervised_rows

    cfg = load_config(AblationConfig, "jobs/configs/ablation_tiny.yaml", [
        f"output_dir={tmp_path}", f"overrides={[f'model.init_from={embedding_model_dir}', f'tokenizer.path={tokenizer_dir}', 'supervised.clr_paths=[]', *SHORT]}",
        f"evaluation={dev_eval_yaml}", "seeds=2", "schedules=[linear]"])
    path = run_ablation(cfg)
    results = json.loads((tmp_path / "ablation.json").read_text())
    rows = supervised_rows(["linear"])
    assert sorted(results) == sorted(f"{name}-s{seed}" for name in rows for seed in (0, 1))
    assert len(rows) == 6
    for name, (schedule, clr, dhnm) in rows.items():
        for seed in (0, 1):
            out = tmp_path / f"{name}-s{seed}"
            assert (out / "model" / "config.json").is_file()
            assert (out / "mined_negatives.parquet").is_file() == dhnm  # DHNM rows mine their candidate pools
            reports = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert (max(r.get("dhnm_queries", 0) for r in reports) > 0) == dhnm  # and their pools manage queries
            assert any("clr_infonce_loss_d128" in r for r in reports) == clr  # CLR off = the task never drawn
            assert results[f"{name}-s{seed}"]["model"] == str(out / "model")
    # Finished trials hand their Tune actor to the next (reuse_actors): 12 trials, 2 at a time, in 2 processes
    # here (one more each time a reset times out on a loaded machine), not 12.
    assert len({r["pid"] for r in results.values()}) <= 6, results
    weak = json.loads((tmp_path / "ablation_weak.json").read_text())
    assert sorted(weak) == sorted(f"weak-{s}-s{seed}" for s in ("linear", "nosm") for seed in (0, 1))
    mid = {name: {h["step"]: h["alpha"] for h in r["history"]}[4] for name, r in weak.items()}
    assert mid["weak-linear-s0"] < mid["weak-nosm-s0"] == 1.0  # the soft mask's α(t); none = bidirectional
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith(("| ✓", "| ✗"))]
    assert len(table) == 6 and all(line.count("±") == 3 for line in table)
    assert "| ✓ | ✓ | ✓ |" in table[-1] and table[-1].rstrip().endswith("| 65.17 | 73.52 | 74.24 |")
    cell = table[0].split("|")[4].strip()  # SM only, Multi: the mean and std of its two seeds
    values = [100 * results[f"{row_name(True, False, False)}-s{s}"]["Multi"] for s in (0, 1)]
    assert cell == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    linear = [line for line in text.splitlines() if line.startswith("| Linear |")]
    assert len(linear) == 1 and linear[0].rstrip().endswith("| 61.73 | 70.41 | 70.99 |")  # Table 12 beside the paper's
    assert linear[0].split("|")[2:5] == table[0].split("|")[4:7]  # its linear row is Table 4's SM-only row
