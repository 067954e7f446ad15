"""The ablation of Table 4: soft mask (SM, weak stage), cross-lingual retrieval (CLR) and dynamic hard-negative
mining (DHNM) toggled, at the scale of the given configs.

Two weak runs (soft mask on / off) go first; the six supervised runs of Table 4 then start from the matching one,
with the CLR task's weight set to 0 when CLR is off and dhnm.enabled following DHNM.
"""

from __future__ import annotations

import json
from pathlib import Path

from conan.config import AblationConfig, JobConfig, load_config
from conan.eval.report import markdown_table
from conan.experiments.trials import GROUPS, run_trials, trial_stage

# Table 4 of the paper (MTEB): (SM, CLR, DHNM) → Multi, Eng, Zh.
PAPER_TABLE_4 = {(True, False, False): (61.73, 70.41, 70.99), (False, True, False): (62.69, 70.94, 71.41),
                 (False, False, True): (61.81, 71.50, 72.09), (True, True, False): (64.45, 72.14, 71.79),
                 (True, False, True): (63.03, 72.78, 72.44), (True, True, True): (65.17, 73.52, 74.24)}


def row_name(sm: bool, clr: bool, dhnm: bool) -> str:
    """e.g. sm+clr-nodhnm."""
    return "-".join(("" if on else "no") + part for on, part in zip((sm, clr, dhnm), ("sm", "clr", "dhnm")))


def run_ablation(cfg: AblationConfig) -> Path:
    """Run the weak pair, then the six supervised rows on Ray Tune; write <output_dir>/results.md; return its path."""
    out = Path(cfg.output_dir)
    weak = run_trials("ablation_weak", {
        name: trial_stage(cfg.weak, out / name, cfg, f"name=ablation-{name}", f"soft_mask.enabled={str(sm).lower()}")
        for name, sm in (("weak-sm", True), ("weak-nosm", False))}, cfg)
    # The whole mapping: a dotted override of one task's weight would replace it.
    weights = load_config(JobConfig, cfg.supervised, cfg.overrides).supervised.task_weights
    without_clr = f"supervised.task_weights={json.dumps({**weights, 'clr': 0.0})}"
    trials = {}
    for sm, clr, dhnm in PAPER_TABLE_4:
        name = row_name(sm, clr, dhnm)
        trials[name] = trial_stage(
            cfg.supervised, out / name, cfg, f"name=ablation-{name}",
            f"model.init_from={weak['weak-sm' if sm else 'weak-nosm']['model']}",
            *([] if clr else [without_clr]),
            f"dhnm.enabled={str(dhnm).lower()}", *(cfg.dhnm_overrides if dhnm else []))
    results = run_trials("ablation", trials, cfg)

    def mark(on: bool) -> str:
        return "✓" if on else "✗"
    rows = [[mark(sm), mark(clr), mark(dhnm), *(100 * results[row_name(sm, clr, dhnm)][g] for g in GROUPS),
             *paper] for (sm, clr, dhnm), paper in PAPER_TABLE_4.items()]
    text = (f"# Ablation (Table 4) at the scale of `{cfg.supervised}`\n\n"
            f"Overrides {cfg.overrides or 'none'}; scores ×100 from `{cfg.evaluation}` (Multi = other languages and "
            "language pairs, Eng = English, Zh = Chinese subsets); the paper's columns are its MTEB averages at 1.4B.\n\n"
            + markdown_table(["SM", "CLR", "DHNM", *GROUPS, *(f"paper {g}" for g in GROUPS)], rows)
            + "\nThe weak stage alone (dev scores of its export):\n\n"
            + markdown_table(["weak run", *GROUPS], [[name, *(100 * r[g] for g in GROUPS)] for name, r in weak.items()]))
    path = out / "results.md"
    path.write_text(text)
    return path
