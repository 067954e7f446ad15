"""The ablation's rows without Ray: Table 4's six switch settings, then one soft-mask-only row per other schedule of
Table 12 (the Ray test runs one schedule; this is what each further schedule adds)."""

from conan.experiments.ablation import row_name, supervised_rows, weak_name
from conan.experiments.paper_tables import PAPER_TABLE_4


def test_table_4_rows_then_one_sm_only_row_per_other_schedule():
    rows = supervised_rows(["linear", "accelerating", "decelerating"])
    assert list(rows)[:6] == [row_name(*switches) for switches in PAPER_TABLE_4]
    assert rows[row_name(True, False, False)] == ("linear", False, False)  # Table 4's SM is the linear schedule
    assert rows[row_name(False, False, True)] == (None, False, True)  # no soft mask: the weak run without it
    assert list(rows)[6:] == ["sm-accelerating-noclr-nodhnm", "sm-decelerating-noclr-nodhnm"]
    assert rows["sm-accelerating-noclr-nodhnm"] == ("accelerating", False, False)
    assert supervised_rows(["linear"]) == {k: v for k, v in rows.items() if k in list(rows)[:6]}


def test_weak_run_names():
    assert [weak_name(s) for s in ("linear", "accelerating", None)] == ["weak-linear", "weak-accelerating", "weak-nosm"]


def test_a_trials_stage_reads_the_experiments_data_root_and_keeps_odd_paths(tmp_path):
    """An experiment's data_root reaches its trials' stages (only its dev evaluation read it), and the paths the
    platform passes on stay whole (a "#" or ": " in them was read as a YAML comment or mapping)."""
    from conan.config import SweepConfig
    from conan.experiments.trials import trial_stage

    root, out = tmp_path / "my data: v2", tmp_path / "run #2"
    exp = SweepConfig(data_root=str(root), overrides=["train.steps=7"])
    stage = trial_stage("jobs/configs/weak_tiny.yaml", out, exp, "train.seed=3")
    assert stage["data"]["root"] == str(root) and stage["output_dir"] == str(out)
    assert stage["train"]["steps"] == 7 and stage["train"]["seed"] == 3
    assert trial_stage("jobs/configs/weak_tiny.yaml", out, exp, f"data.root={tmp_path}")["data"]["root"] == \
        str(tmp_path)  # an override still wins
