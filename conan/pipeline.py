"""The end-to-end pipeline on bundled/real data; each step is skipped when its output exists, and refused when that
output was made with other settings (StepRecords).

corpus → tokenizer → model init → stages (pretrain, sft, [curate →] weak, [build CLR →] [mine negatives →]
supervised) → evaluate.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from conan.config import (PIPELINE_STEPS, CLRConfig, ConfigError, CurationConfig, EvalConfig, JobConfig, PipelineConfig,
                          load_config, recorded_settings, setting, settings_changes, to_dict)
from conan.console import say
from conan.data.corpus import write_corpus
from conan.encoder import model_name
from conan.model import ConanConfig, ConanForCausalLM, count_parameters
from conan.model.build import model_config_for, preset_config
from conan.runtime import init_ray
from conan.tokenizer import check_vocab_size, load_tokenizer, train_tokenizer
from conan.train.launcher import check_tasks, is_finished, run_stage


def reset_from(output_dir: str | Path, step: str) -> list[Path]:
    """Delete the outputs of `step` and every later step, so the next run redoes them; returns what was removed."""
    import shutil

    if step not in PIPELINE_STEPS:
        raise ValueError(f"--from: unknown step {step!r}; expected one of {list(PIPELINE_STEPS)}")
    names = list(PIPELINE_STEPS)
    removed = []
    for name in names[names.index(step):]:
        path = Path(output_dir) / PIPELINE_STEPS[name]
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed


STEP_RECORD = "pipeline_step.json"  # in a step's folder: the settings it was made with, the previous step's digest


class StepRecords:
    """What each step of a run was made from, kept in its folder (STEP_RECORD): its settings and the digest of the
    step before, itself chained to the ones before it. A step whose output exists but whose settings, or an earlier
    step's, have changed since is refused in one line, instead of being skipped and passing on what the old settings
    made. A step made before records were kept is taken as it is."""

    def __init__(self, out: Path):
        self.out, self.after, self.pending = out, "", {}

    def step(self, name: str, done: bool, settings: dict) -> float:
        """Announce step `name` (skipped when `done`, its output there) and return the time; raise ConfigError when
        it was made with other settings or after other earlier steps (its record there, even if `done` is False: a
        stage's export is not done for another train.steps, and would otherwise be trained on from its checkpoint)."""
        record = {"step": name, "settings": recorded_settings(settings, self.out), "after": self.after}
        path = self.out / PIPELINE_STEPS[name] / STEP_RECORD
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                raise _redo(name, f"its record {path} is not JSON") from None
            if saved != record:
                raise _redo(name, f"{path.parent} was made {changes(saved, record)}")
        self.after = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        self.pending[name] = path, record
        say(f"[pipeline] {name}: {'exists, skipped' if done else 'running'}")
        return time.perf_counter()

    def made(self, name: str) -> None:
        """Record step `name`, announced by `step`: run to the end, or a stage about to train (its checkpoints
        outlive a crash, and a rerun must not continue them under other settings)."""
        path, record = self.pending[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # renamed into place: a kill while writing leaves no half record
        partial.write_text(json.dumps(record, indent=1, sort_keys=True))
        partial.replace(path)


def _redo(name: str, why: str) -> ConfigError:
    """The refusal of a step whose output cannot be kept, with the way to make it again."""
    return ConfigError(f"pipeline step {name}: {why}; redo it and the steps after it with `conan pipeline --from "
                       f"{name}` (their outputs are removed), or use another output_dir")


def changes(saved: dict, record: dict) -> str:
    """How a step's record differs from the one its output was made with, in words."""
    if shown := settings_changes(saved["settings"], record["settings"]):
        return f"with other settings ({shown})"
    return "after earlier steps that have changed since"


def _data_step(name: str, config_cls, yaml_path: str, records: StepRecords, cfg: PipelineConfig, run) -> Path:
    """Run a data step (curate or clr) into its folder unless its stats.json exists; return its data folder."""
    step_dir = records.out / PIPELINE_STEPS[name]
    step_cfg = load_config(config_cls, yaml_path, [setting("output_dir", str(step_dir)),
                                                   setting("data_root", cfg.data_root),
                                                   setting("ray_address", cfg.ray_address)])
    t = records.step(name, (step_dir / "stats.json").is_file(), to_dict(step_cfg))
    if not (step_dir / "stats.json").is_file():
        import shutil

        shutil.rmtree(step_dir, ignore_errors=True)  # a half-written step starts again
        stats = run(step_cfg)
        records.made(name)
        say(f"[pipeline] {name}: {stats['rows_in']} rows in, {stats['rows_out']} kept, rejected "
            f"{stats['rejected']} ({time.perf_counter() - t:.0f}s)")
    return step_dir / "data"


def _with_data_steps(cfg: PipelineConfig, stage_cfg: JobConfig, records: StepRecords, paths: dict) -> JobConfig:
    """Curate before the weak stage and build the CLR set before the supervised stage, when configured."""
    from dataclasses import replace

    if stage_cfg.stage == "weak" and cfg.curation:
        from conan.data.weak import curate
        paths["curated"] = str(_data_step("curate", CurationConfig, cfg.curation, records, cfg, curate))
        return replace(stage_cfg, data=replace(stage_cfg.data, paths=[paths["curated"]]))
    if stage_cfg.stage == "supervised" and cfg.clr:
        from conan.data.clr import build_clr
        paths["clr"] = str(_data_step("clr", CLRConfig, cfg.clr, records, cfg, build_clr))
        stage_cfg = replace(stage_cfg, supervised=replace(stage_cfg.supervised, clr_paths=[paths["clr"]]))
    if stage_cfg.stage == "supervised" and stage_cfg.dhnm.enabled and not stage_cfg.dhnm.candidates:
        stage_cfg = _mine_step(stage_cfg, records)
        paths["mined"] = stage_cfg.dhnm.candidates
    return stage_cfg


def _mine_step(stage_cfg: JobConfig, records: StepRecords) -> JobConfig:
    """Mine the supervised stage's hard-negative candidates (its queries, CLR set included) with the weak model
    into the mine step's folder unless they are there; return the stage config reading them."""
    from dataclasses import replace

    from conan.train.launcher import absolute_paths, mine_negatives, with_demo_data
    from conan.train.stages import stage_class

    path = records.out / PIPELINE_STEPS["mine"] / "mined_negatives.parquet"
    # What the candidates depend on: the queries (data, task settings), the model and its tokenizer, DHNM's settings;
    # as configured (the demo data's folders are named after a digest of the data root, a location).
    job = to_dict(stage_cfg)
    t = records.step("mine", path.is_file(), {k: job[k] for k in ("model", "tokenizer", "data", "supervised", "dhnm")})
    stage_cfg = with_demo_data(absolute_paths(replace(stage_cfg, dhnm=replace(stage_cfg.dhnm, candidates=str(path)))),
                               stage_class("supervised"))
    if not path.is_file():
        init_ray(stage_cfg.ray_address)
        mine_negatives(stage_cfg)
        records.made("mine")
        say(f"[pipeline] mine: {time.perf_counter() - t:.0f}s")
    return stage_cfg


def stage_overrides(cfg: PipelineConfig) -> list[str]:
    """What every stage's config gets from the pipeline before the run's paths: model.activation_checkpointing when the
    pipeline's is on, then stage_overrides."""
    on = [setting("model.activation_checkpointing", True)] if cfg.model.activation_checkpointing else []
    return [*on, *cfg.stage_overrides]


def check_step_configs(cfg: PipelineConfig) -> None:
    """Load every step's config before the first step runs: a missing file, an unknown key or a bad value in the
    evaluation's or a later stage's YAML (a misspelt supervised task included) is one line now, not after hours of
    training; so is an unknown model preset or a vocabulary too small for the tokenizer."""
    if cfg.model.init_from:
        raise ConfigError("model.init_from: the pipeline builds its own initial model (model.preset, model.overrides);"
                          " to start a stage from an export, run it alone: conan train <stage> --set "
                          "model.init_from=DIR")
    preset_config(cfg.model.preset, **cfg.model.overrides)
    if not cfg.tokenizer.path:
        check_vocab_size(cfg.tokenizer.vocab_size)
    for stage_yaml in cfg.stages:
        check_tasks(load_config(JobConfig, stage_yaml, stage_overrides(cfg)))
    for config_cls, yaml_path in ((CurationConfig, cfg.curation), (CLRConfig, cfg.clr), (EvalConfig, cfg.evaluation)):
        if yaml_path:
            load_config(config_cls, yaml_path)


def run_pipeline(cfg: PipelineConfig) -> dict[str, str]:
    """Corpus → tokenizer → initial model → the configured stages, under cfg.output_dir; return the paths."""
    check_step_configs(cfg)
    out = Path(cfg.output_dir)
    records = StepRecords(out)
    corpus = out / "corpus" / "corpus.parquet"
    t = records.step("corpus", corpus.is_file(), {"corpus_sources": cfg.corpus_sources,
                                                  "corpus_max_per_source": cfg.corpus_max_per_source})
    if not corpus.is_file():
        rows = write_corpus(cfg.data_root, corpus, cfg.corpus_sources, cfg.corpus_max_per_source)
        records.made("corpus")
        say(f"[pipeline] corpus: {rows} texts → {corpus} ({time.perf_counter() - t:.1f}s)")

    tok_dir = Path(cfg.tokenizer.path) if cfg.tokenizer.path else out / "tokenizer"
    t = records.step("tokenizer", (tok_dir / "tokenizer.json").is_file(), {"tokenizer": to_dict(cfg.tokenizer)})
    if not (tok_dir / "tokenizer.json").is_file():
        init_ray(cfg.ray_address)
        train_tokenizer([str(corpus)], tok_dir, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency,
                        cfg.tokenizer.max_texts)
        records.made("tokenizer")
        say(f"[pipeline] tokenizer: trained in {time.perf_counter() - t:.1f}s → {tok_dir}")
    tokenizer = load_tokenizer(tok_dir)

    model_dir = out / "model_init"
    records.step("model", (model_dir / "config.json").is_file(), {"model": to_dict(cfg.model), "seed": cfg.seed})
    if not (model_dir / "config.json").is_file():
        import shutil

        import torch

        torch.manual_seed(cfg.seed)
        model = ConanForCausalLM(model_config_for(cfg.model, tokenizer))
        # Written aside, then renamed: transformers writes config.json before the weights, so a run killed while
        # saving would have left a model_init this check takes for done.
        partial = out / "model_init.partial"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        partial.rename(model_dir)
        records.made("model")
    config = ConanConfig.from_pretrained(str(model_dir))
    say(f"[pipeline] model: preset {cfg.model.preset}, {count_parameters(config):,} parameters, "
        f"vocab {config.vocab_size}, hidden {config.hidden_size}, layers {config.num_hidden_layers} "
        f"→ {model_dir}")
    paths = {"corpus": str(corpus), "tokenizer": str(tok_dir), "model_init": str(model_dir)}
    previous = model_dir
    for stage_yaml in cfg.stages:
        stage_cfg = load_config(JobConfig, stage_yaml, [
            *stage_overrides(cfg), setting("model.init_from", str(previous)), setting("tokenizer.path", str(tok_dir)),
            setting("data.root", cfg.data_root), setting("ray_address", cfg.ray_address)])
        if stage_cfg.stage == "pretrain" and not stage_cfg.data.paths:  # what the tokenizer learned from
            stage_cfg.data.paths = [str(corpus)]
        stage_cfg.output_dir = str(out / stage_cfg.stage)  # before mining: it writes the stage's input there
        # Recorded as configured: the data steps' outputs it reads are in the chain, and the demo data's folders
        # are named after a digest of the data root (a location).
        settings = to_dict(stage_cfg)
        stage_cfg = _with_data_steps(cfg, stage_cfg, records, paths)
        finished = is_finished(stage_cfg)
        t = records.step(stage_cfg.stage, finished, settings)
        if not finished:
            records.made(stage_cfg.stage)
        result = run_stage(stage_cfg)
        loss = result.metrics.get("loss")
        say(f"[pipeline] {stage_cfg.stage}: → {result.model_dir}"
            + (f" (final loss {loss:.3f}, {time.perf_counter() - t:.0f}s)" if loss is not None else ""))
        previous = result.model_dir
        paths[stage_cfg.stage] = str(result.model_dir)
    paths["model"] = str(previous)
    if cfg.evaluation:
        from conan.eval.runner import evaluate

        # Baselines: the untrained init (the reference), then the weak-stage model when there is one.
        baselines = [str(model_dir), *([paths["weak"]] if "weak" in paths and paths["weak"] != str(previous) else [])]
        eval_cfg = load_config(EvalConfig, cfg.evaluation, [
            setting("model_dir", str(previous)), setting("baselines", baselines), setting("output_dir", str(out / "eval")),
            setting("data_root", cfg.data_root)])
        report = Path(eval_cfg.output_dir) / "report.md"
        t = records.step("evaluate", report.is_file(), to_dict(eval_cfg))
        if not report.is_file():
            result = evaluate(eval_cfg)
            if (Path(previous) / "README.md").is_file():  # an embedding export's card gains its dev results
                from conan.model_card import write_model_card
                write_model_card(previous, to_dict(stage_cfg), result, model_name(previous))
            records.made("evaluate")
            say(f"[pipeline] evaluate: {time.perf_counter() - t:.0f}s")
        paths["report"] = str(report)
        paths["plots"] = [str(p) for p in sorted(report.parent.glob("*.png"))]
    return paths
