"""Experiments as Ray Tune trials: each trial trains one stage config, then a quick dev evaluation scores it.

The Train V2 pattern: the Tune function (a fractional CPU of its own) runs each stage's TorchTrainer itself, with
`TuneReportCallback` streaming the workers' reports (loss, α(t), …) to Tune, and reports the dev scores last.
Trials run concurrently as far as the cluster's CPUs allow (trial_cpus + num_workers × cpus_per_worker each).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conan.config import EvalConfig, ExperimentConfig, JobConfig, from_dict, load_config, setting, to_dict
from conan.train.launcher import absolute_paths, check_inputs

GROUPS = ("Multi", "Eng", "Zh")


def trial_stage(yaml_path: str, output_dir: Path, exp: ExperimentConfig, *overrides: str) -> dict:
    """A stage config for a trial as plain data: the YAML, the experiment's data_root, its overrides, then the
    trial's, with absolute paths (the Tune function runs in its own working directory)."""
    cfg = load_config(JobConfig, yaml_path, [setting("data.root", exp.data_root), *exp.overrides, *overrides,
                                             setting("output_dir", str(output_dir)),
                                             setting("ray_address", exp.ray_address)])
    return to_dict(absolute_paths(cfg))


def run_trial(config: dict) -> None:
    """The Tune function: train the trial's stage (its reports stream to Tune), score the export with the dev
    evaluation and report the scores."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from conan.eval.report import language_groups
    from conan.eval.runner import evaluate
    from conan.train.launcher import run_stage

    start = time.time()
    cfg = from_dict(JobConfig, config["stages"][config["trial"]])
    result = run_stage(cfg, callbacks=[TuneReportCallback()])
    scores = evaluate(from_dict(EvalConfig, {**config["evaluation"], "model_dir": str(result.model_dir),
                                             "output_dir": str(Path(cfg.output_dir) / "dev_eval")}))
    tune.report({**language_groups(scores), "loss": result.metrics.get("loss", float("nan")),
                 "model": str(result.model_dir), "started": start, "finished": time.time(), "pid": os.getpid()})


def fitting_trials(trials: dict[str, dict], exp: ExperimentConfig) -> int:
    """How many trials the cluster's CPUs hold at once: each needs its Tune function's CPU plus its workers'. More
    would start Tune functions whose TorchTrainers then wait for workers, all sharing the same CPUs."""
    import ray

    need = max(exp.trial_cpus + t["train"]["num_workers"] * t["train"]["cpus_per_worker"] for t in trials.values())
    return max(1, int(ray.cluster_resources().get("CPU", 1) / need + 1e-9))


def run_trials(name: str, trials: dict[str, dict], exp: ExperimentConfig) -> dict[str, dict]:
    """Run one Tune trial per entry of `trials` ({trial name: stage config from trial_stage}); return
    {trial name: its final report}, also written to <output_dir>/<name>.json."""
    from ray import tune

    from conan.runtime import init_ray

    for stage in trials.values():  # a missing model or input is one line now, not a failed trial per grid point
        check_inputs(from_dict(JobConfig, stage))
    init_ray(exp.ray_address)
    evaluation = to_dict(load_config(EvalConfig, exp.evaluation, [
        "baselines=[]", "bm25=false", "plots=false", setting("data_root", str(Path(exp.data_root).resolve()))]))
    storage = Path(exp.output_dir).resolve() / "tune"
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": exp.trial_cpus}),
        param_space={"trial": tune.grid_search(list(trials)), "stages": trials, "evaluation": evaluation},
        # A finished trial's actor takes the next one: no new process and imports between trials (~5 s each).
        tune_config=tune.TuneConfig(max_concurrent_trials=exp.max_concurrent or fitting_trials(trials, exp),
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} trials failed; first: {failed[0].error}")
    final = {r.config["trial"]: {**{k: r.metrics[k] for k in (*GROUPS, "loss", "model", "started", "finished", "pid")},
                                 "history": _history(r.metrics_dataframe)} for r in results}
    (Path(exp.output_dir) / f"{name}.json").write_text(json.dumps(final, indent=1))
    return final


def _history(frame) -> list[dict]:
    """The training reports Tune received from the stage (step, loss and α(t) when the stage has a soft mask)."""
    columns = [c for c in ("step", "loss", "alpha") if c in frame.columns]
    return frame[frame["step"].notna()][columns].to_dict("records") if "step" in frame.columns else []

