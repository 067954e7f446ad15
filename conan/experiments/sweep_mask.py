"""The soft-mask sweep (App. C, Table 12): short weak-stage runs over schedule × rank reduction × temperature.

α(t) = t/τ (linear), (t/τ)² (accelerating) or 1 − (1 − t/τ)² (decelerating) (eq. 3-4), with or without the
rank-reduction term, at each temperature; every trial is scored by the quick dev evaluation.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from conan.config import SweepConfig
from conan.eval.report import markdown_table
from conan.experiments.paper_tables import PAPER_TABLE_12
from conan.experiments.trials import GROUPS, run_trials, trial_stage

def trial_name(schedule: str, rank_reduction: bool, temperature: float) -> str:
    """e.g. linear+rank-t0.05."""
    return f"{schedule}{'+rank' if rank_reduction else ''}-t{temperature:g}"


def run_sweep(cfg: SweepConfig) -> Path:
    """Run every trial of the sweep on Ray Tune and write <output_dir>/results.md; returns its path."""
    out = Path(cfg.output_dir)
    grid = list(itertools.product(cfg.schedules, cfg.rank_reduction, cfg.temperatures))
    trials = {}
    for schedule, rank, temperature in grid:
        name = trial_name(schedule, rank, temperature)
        trials[name] = trial_stage(cfg.weak, out / name, cfg, f"name=sweep-{name}", "soft_mask.enabled=true",
                                   f"soft_mask.schedule={schedule}", f"soft_mask.rank_reduction={str(rank).lower()}",
                                   f"loss.temperature={temperature}")
    results = run_trials("sweep_mask", trials, cfg)
    rows = [[schedule.capitalize(), "yes" if rank else "no", f"{temperature:g}",
             *(100 * results[name][g] for g in GROUPS), results[name]["loss"]]
            for (schedule, rank, temperature), name in zip(grid, trials)]
    best = max(results, key=lambda name: sum(results[name][g] for g in GROUPS))
    text = (f"# Soft-mask sweep ({len(grid)} trials on Ray Tune)\n\n"
            f"Weak stage `{cfg.weak}` with overrides {cfg.overrides or 'none'}; scores ×100 from `{cfg.evaluation}` "
            "(mean main metric: Multi = other languages and language pairs, Eng = English, Zh = Chinese subsets).\n\n"
            + markdown_table(["Function", "rank reduction", "temperature", *GROUPS, "final loss"], rows)
            + f"\nBest (sum of the three): **{best}** → `{results[best]['model']}`\n\n"
            "## The paper's Table 12 (1.4B, MTEB, soft mask only)\n\n"
            + markdown_table(["Function", *GROUPS], [[f.capitalize(), *v] for f, v in PAPER_TABLE_12.items()]))
    path = out / "results.md"
    path.write_text(text)
    return path
