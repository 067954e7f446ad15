"""The ablation of Tables 4 and 12 with error bars: soft mask (SM, weak stage, per schedule), cross-lingual retrieval
(CLR) and dynamic hard-negative mining (DHNM) toggled, every row trained with several seeds.

Weak runs go first: the soft mask with each schedule of Table 12 (App. C) and without it (bidirectional from the start),
once per seed. The supervised rows then start from the weak run of the same seed: Table 4's six rows (SM = the linear
schedule; CLR off = the CLR task's weight 0, on = `clr_weight`; DHNM on / off), and Table 12's other schedules as
SM-only rows (the paper's Table 12 is "soft mask only": its linear row is Table 4's first). Each cell is the mean ±
standard deviation over seeds of the quick dev evaluation's Multi / Eng / Zh columns.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from conan.config import AblationConfig
from conan.eval.report import markdown_table
from conan.experiments.paper_tables import PAPER_TABLE_4, PAPER_TABLE_12
from conan.experiments.trials import GROUPS, run_trials, trial_stage

TABLE_4_SCHEDULE = "linear"  # Table 4's SM rows use the paper's best schedule


def row_name(sm: bool, clr: bool, dhnm: bool, schedule: str = TABLE_4_SCHEDULE) -> str:
    """e.g. sm+clr-nodhnm (sm-accelerating+… for another schedule)."""
    sm_part = ("sm" if schedule == TABLE_4_SCHEDULE else f"sm-{schedule}") if sm else "nosm"
    return "-".join([sm_part, *(("" if on else "no") + part for on, part in zip((clr, dhnm), ("clr", "dhnm")))])


def weak_name(schedule: str | None) -> str:
    """The weak run of a schedule (None = no soft mask)."""
    return f"weak-{schedule}" if schedule else "weak-nosm"


def supervised_rows(schedules: list[str]) -> dict[str, tuple[str | None, bool, bool]]:
    """{row name: (the weak run's schedule or None, CLR, DHNM)}: Table 4's rows, then Table 12's other schedules."""
    rows = {row_name(sm, clr, dhnm): (TABLE_4_SCHEDULE if sm else None, clr, dhnm) for sm, clr, dhnm in PAPER_TABLE_4}
    rows.update({row_name(True, False, False, s): (s, False, False) for s in schedules if s != TABLE_4_SCHEDULE})
    return rows


def mean_std(values: list[float]) -> str:
    """'mean ± std' ×100 over seeds (std 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def run_ablation(cfg: AblationConfig) -> Path:
    """Run the weak runs, then the supervised rows, each once per seed, on Ray Tune; write <output_dir>/results.md."""
    out = Path(cfg.output_dir)
    schedules = list(dict.fromkeys([TABLE_4_SCHEDULE, *cfg.schedules]))
    seeds = range(cfg.seeds)
    weak_trials = {}
    for schedule in [*schedules, None]:
        for seed in seeds:
            name = f"{weak_name(schedule)}-s{seed}"
            weak_trials[name] = trial_stage(
                cfg.weak, out / name, cfg, f"name=ablation-{name}", f"train.seed={seed}",
                f"soft_mask.enabled={str(schedule is not None).lower()}",
                *([f"soft_mask.schedule={schedule}"] if schedule else []))
    weak = run_trials("ablation_weak", weak_trials, cfg)
    rows = supervised_rows(schedules)
    trials = {}
    for name, (schedule, clr, dhnm) in rows.items():
        for seed in seeds:
            trials[f"{name}-s{seed}"] = trial_stage(
                cfg.supervised, out / f"{name}-s{seed}", cfg, f"name=ablation-{name}-s{seed}", f"train.seed={seed}",
                f"model.init_from={weak[f'{weak_name(schedule)}-s{seed}']['model']}",
                f"supervised.task_weights.clr={cfg.clr_weight if clr else 0.0}", f"dhnm.enabled={str(dhnm).lower()}",
                *(cfg.dhnm_overrides if dhnm else []))
    results = run_trials("ablation", trials, cfg)

    def cells(prefix: str, table: dict) -> list[str]:
        return [mean_std([table[f"{prefix}-s{s}"][g] for s in seeds]) for g in GROUPS]

    def mark(on: bool) -> str:
        return "✓" if on else "✗"
    table_4 = [[mark(sm), mark(clr), mark(dhnm), *cells(row_name(sm, clr, dhnm), results), *paper]
               for (sm, clr, dhnm), paper in PAPER_TABLE_4.items()]
    table_12 = [[s.capitalize(), *cells(row_name(True, False, False, s), results),
                 *(PAPER_TABLE_12.get(s) or ("–",) * 3)] for s in schedules]
    text = (f"# Ablation (Tables 4 and 12) at the scale of `{cfg.supervised}`, {cfg.seeds} seeds a row\n\n"
            f"Overrides {cfg.overrides or 'none'}; CLR on = task weight {cfg.clr_weight}; scores ×100 (mean ± std "
            f"over seeds) from `{cfg.evaluation}` (Multi = other languages and language pairs, Eng = English, Zh = "
            "Chinese subsets); the paper's columns are its MTEB averages at 1.4B.\n\n"
            + markdown_table(["SM", "CLR", "DHNM", *GROUPS, *(f"paper {g}" for g in GROUPS)], table_4)
            + "\n## Soft-mask schedules (Table 12: soft mask only, then the supervised stage without CLR and DHNM)\n\n"
            + markdown_table(["Function", *GROUPS, *(f"paper {g}" for g in GROUPS)], table_12)
            + "\n## The weak stage alone (dev scores of its exports)\n\n"
            + markdown_table(["weak run", *GROUPS], [[weak_name(s), *cells(weak_name(s), weak)]
                                                      for s in [*schedules, None]]))
    path = out / "results.md"
    path.write_text(text)
    return path
