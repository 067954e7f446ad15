"""The pipeline's step records: a step whose output exists is skipped only when it was made with the same settings,
after the same earlier steps; otherwise the run is refused in one line that names what changed and how to redo it."""

from __future__ import annotations

import shutil

import pytest

from conan.config import ConfigError
from conan.config import recorded_settings
from conan.pipeline import STEP_RECORD, StepRecords


def run(out, settings: dict[str, dict], made: set[str]) -> StepRecords:
    """Walk the steps as run_pipeline does: `made` are the steps whose output is there; the others run now."""
    records = StepRecords(out)
    for name, step_settings in settings.items():
        done = name in made
        records.step(name, done, step_settings)
        if not done:
            (out / name).mkdir(parents=True, exist_ok=True)
            records.made(name)
            made.add(name)
    return records


SETTINGS = {"corpus": {"corpus_sources": None},
            "tokenizer": {"tokenizer": {"vocab_size": 8192}},
            "weak": {"train": {"steps": 600, "num_workers": 2}, "output_dir": "x", "data": {"root": "/data", "paths": []}}}


def test_a_step_made_with_other_settings_is_refused_and_a_later_one_after_it(tmp_path):
    out = tmp_path / "run"
    made: set[str] = set()
    run(out, SETTINGS, made)
    assert {p.parent.name for p in out.glob(f"*/{STEP_RECORD}")} == {"corpus", "tokenizer", "weak"}
    run(out, SETTINGS, made)  # the same settings: every step skipped
    # Where things are, or how a stage runs, is not what it makes: another data root, Ray address or report
    # interval, the same run.
    run(out, {**SETTINGS, "weak": {**SETTINGS["weak"], "data": {"root": "/elsewhere", "paths": []},
                                   "ray_address": "auto", "train": {"steps": 600, "num_workers": 2, "log_every": 1}}},
        made)

    steps = {**SETTINGS, "weak": {**SETTINGS["weak"], "train": {"steps": 800, "num_workers": 2}}}
    with pytest.raises(ConfigError, match=r"pipeline step weak: .*weak was made with other settings \(train.steps: "
                                          r"600 → 800\); redo it and the steps after it with `conan pipeline --from "
                                          r"weak`"):
        run(out, steps, made)
    # Even when the step does not count as done under its new settings (a stage's export marker holds its steps).
    with pytest.raises(ConfigError, match=r"step weak: .*\(train.steps: 600 → 800\)"):
        run(out, steps, made - {"weak"})
    # An earlier step changed: its own refusal comes first, naming it; and were its output redone, the later steps
    # made after the old one would be refused in turn.
    vocab = {**SETTINGS, "tokenizer": {"tokenizer": {"vocab_size": 4096}}}
    with pytest.raises(ConfigError, match=r"step tokenizer: .*\(tokenizer.vocab_size: 8192 → 4096\)"):
        run(out, vocab, made)
    shutil.rmtree(out / "tokenizer")
    made.discard("tokenizer")
    with pytest.raises(ConfigError, match="step weak: .* made after earlier steps that have changed since; .*--from weak"):
        run(out, vocab, made)
    # A key added to a step's settings counts as a change too.
    with pytest.raises(ConfigError, match=r"corpus_max_per_source: \(unset\) → 5"):
        run(out, {**SETTINGS, "corpus": {"corpus_sources": None, "corpus_max_per_source": 5}}, made)


def test_a_record_that_is_not_json_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    run(out, SETTINGS, made := set())
    (out / "weak" / STEP_RECORD).write_text('{"step": "weak", "sett')
    with pytest.raises(ConfigError, match=r"pipeline step weak: its record .* is not JSON; .*--from weak"):
        run(out, SETTINGS, made)
    assert not list(out.glob("*/*.partial"))  # records are renamed into place


def test_a_step_made_before_records_were_kept_is_taken_as_it_is(tmp_path):
    out = tmp_path / "run"
    made: set[str] = set()
    run(out, SETTINGS, made)
    for record in out.glob(f"*/{STEP_RECORD}"):
        record.unlink()
    run(out, {**SETTINGS, "weak": {**SETTINGS["weak"], "train": {"steps": 800, "num_workers": 2}}}, made)


def test_paths_inside_the_run_are_recorded_relative_to_it(tmp_path):
    out = tmp_path / "run"
    settings = {"model": {"init_from": str(out.resolve() / "sft" / "model")}, "data": {"paths": [str(out / "curated"),
                                                                                                "/data/own.parquet"]},
                "supervised": {"task_weights": {"retrieval": 3.0}}, "output_dir": str(out / "weak")}
    assert recorded_settings(settings, out) == {"model.init_from": "<run>/sft/model",
                                                "data.paths": ["<run>/curated", "/data/own.parquet"],
                                                "supervised.task_weights.retrieval": 3.0}
    moved = tmp_path / "moved"
    assert recorded_settings({"model": {"init_from": str(moved / "sft" / "model")}}, moved) == {
        "model.init_from": "<run>/sft/model"}
    assert recorded_settings({"model": {"init_from": str(tmp_path / "run2" / "x")}}, out) == {
        "model.init_from": str(tmp_path / "run2" / "x")}  # a sibling whose name starts like the run's is not in it


def test_how_a_step_runs_is_not_what_it_makes(tmp_path):
    """Any actor pool's size, CPUs and GPUs (cleaners, translators, mining's embedders), mining's placement and
    search buffers and the evaluation's batch: changed, a run keeps its steps (a user moving to a bigger machine was
    refused); the candidates DHNM keeps, or the mining batch's length, are what a step makes."""
    base = {"dhnm": {"pool_size": 30, "mining": {"actors": {"size": 1, "cpus": 0.5, "gpus": 0.0, "batch_size": 64},
                                                 "search_cpus": 1.0, "max_length": 256}},
            "batch_size": 64, "cleaners": {"size": 1, "cpus": 0.5, "batch_size": 8192}}
    moved = {"dhnm": {"pool_size": 30, "mining": {"actors": {"size": 4, "cpus": 1.0, "gpus": 1.0, "batch_size": 64},
                                                  "search_cpus": 4.0, "max_length": 256}},
             "batch_size": 16, "cleaners": {"size": 2, "cpus": 1.0, "batch_size": 8192}}
    assert recorded_settings(base, tmp_path) == recorded_settings(moved, tmp_path)
    for key, value in (("pool_size", 20), ("mining", {**base["dhnm"]["mining"], "max_length": 128})):
        assert recorded_settings(base, tmp_path) != recorded_settings({**base, "dhnm": {**base["dhnm"], key: value}},
                                                                      tmp_path)
