"""Builds a Ray Train TorchTrainer for a stage config and runs it (local Ray or a cluster address).

The run is named after the job and stage and stored under `<output_dir>/ray`, so launching the same
config again resumes from its latest checkpoint (Ray Train V2 restores by name + storage path), and a
stage whose export already exists is not launched at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from conan.config import ConfigError, JobConfig, recorded_settings, require_paths, settings_changes, to_dict
from conan.console import ReportFollower, say
from conan.data.shards import (ShardError, convert, input_files, is_shard_dir, load_manifest, merge_manifests,
                               rejects_line)
from conan.encoder import check_model_dir
from conan.runtime import init_ray
from conan.train.backend import resolve_backend
from conan.train.checkpoint import check_resumable
from conan.train.loop import STAGE_MARKER, progress_line, train_worker
from conan.train.stages import Stage, export_path, stage_class
from conan.train.tasks import TASKS


@dataclass
class StageResult:
    """What a finished stage produced."""

    model_dir: Path
    metrics: dict
    skipped: bool = False


def check_inputs(cfg: JobConfig) -> Path:
    """Fail before any worker starts when the previous stage's model or the tokenizer is missing; return the tokenizer dir."""
    if cfg.model.init_from:
        try:
            check_model_dir(cfg.model.init_from)
        except FileNotFoundError as err:
            raise ConfigError(f"model.init_from: {err}") from None
    tokenizer_dir = Path(cfg.tokenizer.path or cfg.model.init_from or "")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer.path: no tokenizer at {tokenizer_dir or '(unset)'}; set tokenizer.path "
                          "or model.init_from (`make demo` writes runs/pipeline_tiny/tokenizer, `conan tokenizer "
                          "FILES --out DIR` trains one)")
    require_paths(cfg.data.paths, "data.paths")
    check_tasks(cfg)
    return tokenizer_dir


def check_tasks(cfg: JobConfig) -> None:
    """Fail on a supervised task the registry does not have, or a weighted one without a batch size: a misspelt task
    would train at weight 0 without a word."""
    if cfg.stage != "supervised":
        return
    sup = cfg.supervised
    for key, given in (("task_weights", sup.task_weights), ("batch_sizes", sup.batch_sizes)):
        if unknown := sorted(set(given) - set(TASKS)):
            raise ConfigError(f"supervised.{key}: unknown task {unknown[0]!r} (tasks: {sorted(TASKS)})")
    if missing := sorted(t for t, w in sup.task_weights.items() if w > 0 and t not in sup.batch_sizes):
        raise ConfigError(f"supervised.batch_sizes: no batch size for task {missing[0]!r}, which has weight "
                          f"{sup.task_weights[missing[0]]}")


def with_demo_data(cfg: JobConfig, stage: type[Stage]) -> JobConfig:
    """The config itself when data.paths names the input; else one reading the demo data source's rows of the
    stage's kind (and, for DHNM, its passages), written once under `demo_dir` as `conan demo` writes them.

    A built CLR set (supervised.clr_paths) joins the supervised stage's input either way: it replaces the demo's CLR
    rows, or is added to the user's data.paths."""
    if cfg.data.paths:
        extra = [p for p in cfg.supervised.clr_paths if p not in cfg.data.paths] if stage.input_kind == "tasks" else []
        return replace(cfg, data=replace(cfg.data, paths=[*cfg.data.paths, *extra])) if extra else cfg
    import shutil

    from conan.data.stage_data import DEMO_PASSAGES, DEMO_RECORDS, write_demo

    out = demo_dir(cfg, stage)
    if not out.is_dir():
        clr = None
        if stage.input_kind == "tasks" and cfg.supervised.clr_paths:  # a built CLR set replaces the demo's CLR rows
            spec = stage.row_spec(cfg)
            try:
                clr = [r for f in input_files(cfg.supervised.clr_paths) for r in spec.rows(f).to_pylist()]
            except ShardError as e:
                raise ConfigError(f"supervised.clr_paths: {e}") from None
        partial = out.with_name(out.name + ".partial")  # whole or absent: records and passages are read together
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write_demo(stage.input_kind, cfg, partial, clr)
        except ValueError as e:
            raise ConfigError(f"stage {cfg.stage}: {e}") from e
        partial.rename(out)
    cfg = replace(cfg, data=replace(cfg.data, paths=[str(out / DEMO_RECORDS)]))
    if (out / DEMO_PASSAGES).is_file() and not cfg.dhnm.passages:
        cfg = replace(cfg, dhnm=replace(cfg.dhnm, passages=str(out / DEMO_PASSAGES)))
    return cfg


def demo_dir(cfg: JobConfig, stage: type[Stage]) -> Path:
    """<output_dir>/demo/<kind>-<digest of what decides the demo rows>: another stage, seed, data root, row cap or
    task setting reads rows written for it, never those written for another (one demo/ was reused for all)."""
    decides = {"kind": stage.input_kind, "root": cfg.data.root, "max_rows": cfg.data.max_rows, "seed": cfg.train.seed}
    if stage.input_kind == "tasks":
        sup = cfg.supervised
        decides.update(num_negatives=sup.num_negatives, max_per_task=sup.max_per_task,
                       retrieval_langs=sup.retrieval_langs, clr_paths=sup.clr_paths)
    digest = hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.output_dir) / "demo" / f"{stage.input_kind}-{digest}"


def stage_shards(cfg: JobConfig, stage: type[Stage], tokenizer_dir: str | Path | None = None) -> list[str]:
    """The stage's input (data.paths) as shard directories: used as they are when they are shards of the stage's kind
    and grouping, else re-sharded (streamed, one Ray task per input file) under <output_dir>/shards. Given the
    tokenizer, what the workers read is then made from them (`Stage.worker_shards`: pretraining packs token blocks,
    the weak stage tokenizes its pairs)."""
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty: name the stage's input files (conan train fills it with the demo "
                          "data's first, see `conan demo`)")
    spec = stage.row_spec(cfg)
    out = Path(cfg.output_dir) / "shards"
    inputs = list(cfg.data.paths)
    ready = [load_manifest(p) for p in inputs if is_shard_dir(p)]
    if cfg.data.max_rows is None and len(ready) == len(inputs) and all(
            m.kind == stage.input_kind and m.stats.get("group_by") == list(spec.group_by) for m in ready):
        dirs = inputs
    else:
        key = hashlib.sha256(json.dumps([inputs, asdict(spec), cfg.data.max_rows, cfg.train.seed],
                                        default=str).encode()).hexdigest()[:12]
        fresh = not is_shard_dir(out / f"input-{key}")  # its rejects are told once, when they are written
        try:
            manifest = convert(inputs, out / f"input-{key}", stage.input_kind, spec, cfg.data.max_rows, cfg.train.seed)
        except ShardError as e:
            raise ConfigError(f"data.paths: {e}") from e
        if fresh and manifest.stats.get("rejected"):
            say(f"[{cfg.stage}] data.paths: {rejects_line(manifest.stats, manifest.directory)}")
        dirs = [str(manifest.directory)]
    return stage.worker_shards(dirs, out, cfg, str(tokenizer_dir)) if tokenizer_dir is not None else dirs


def stage_rows(cfg: JobConfig, stage: type[Stage]) -> list[dict]:
    """Every row of the stage's shards in one list: for small inputs (tests, the peer benchmark); training and mining
    stream the shards."""
    files = merge_manifests([load_manifest(d) for d in stage_shards(cfg, stage)])
    return [row for parts in files.values() for path, _ in parts for row in pq.read_table(path).to_pylist()]


def is_finished(cfg: JobConfig) -> bool:
    """True when this stage's export exists for the configured number of steps."""
    marker = export_path(cfg) / STAGE_MARKER
    if not marker.is_file():
        return False
    made = json.loads(marker.read_text())
    return (made["stage"], made["steps"]) == (cfg.stage, cfg.train.steps)


def stage_settings(cfg: JobConfig) -> dict:
    """What a stage's export is made from, as its marker keeps it: the launched config's recorded settings (not where
    things are, nor how the stage runs), paths under the output_dir's parent relative to it (a pipeline run's steps,
    a moved run)."""
    cfg = absolute_paths(cfg)
    return recorded_settings(to_dict(cfg), Path(cfg.output_dir).parent)


def check_finished_settings(cfg: JobConfig) -> None:
    """Fail when a finished stage is launched again with other settings (other data, rows, lr, …): it would hand
    back the model the old settings made."""
    made = json.loads((export_path(cfg) / STAGE_MARKER).read_text()).get("settings")
    if made is not None and (shown := settings_changes(made, stage_settings(cfg))):
        raise ConfigError(f"{cfg.stage}: {export_path(cfg)} was trained with other settings ({shown}); set another "
                          f"output_dir, or remove {Path(cfg.output_dir)} to train it anew")


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """A copy with every path absolute: Ray workers run in their own working directory."""
    def absolute(p):
        return str(Path(p).resolve()) if p else p
    return replace(cfg, output_dir=absolute(cfg.output_dir),
                   model=replace(cfg.model, init_from=absolute(cfg.model.init_from)),
                   tokenizer=replace(cfg.tokenizer, path=absolute(cfg.tokenizer.path)),
                   data=replace(cfg.data, root=absolute(cfg.data.root), paths=[absolute(p) for p in cfg.data.paths]),
                   supervised=replace(cfg.supervised, clr_paths=[absolute(p) for p in cfg.supervised.clr_paths]),
                   dhnm=replace(cfg.dhnm, candidates=absolute(cfg.dhnm.candidates),
                                passages=absolute(cfg.dhnm.passages)))


def run_stage(cfg: JobConfig, callbacks: list | None = None) -> StageResult:
    """Train one stage on Ray Train with DeepSpeed workers and return the exported model's directory.

    `callbacks`: Ray Train user callbacks (a Tune trial passes TuneReportCallback to stream the reports to Tune)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    tokenizer_dir = check_inputs(cfg)
    if is_finished(cfg):
        check_finished_settings(cfg)
        say(f"[{cfg.stage}] already finished: {export_path(cfg)} (nothing to do)")
        return StageResult(export_path(cfg), {}, skipped=True)
    settings = stage_settings(cfg)  # as launched: before the demo data's paths are filled in
    init_ray(cfg.ray_address)
    backend = resolve_backend(cfg.train.device, cfg.train.precision, ray.cluster_resources())
    stage = stage_class(cfg.stage)
    cfg = with_demo_data(cfg, stage)
    shards = stage_shards(cfg, stage, tokenizer_dir)
    run_dir = Path(cfg.output_dir) / "ray" / f"{cfg.name}-{cfg.stage}"
    check_resumable(run_dir, stage.data_position(cfg, [load_manifest(d) for d in shards], cfg.train.num_workers),
                    cfg.train.steps)
    pools = start_negative_pools(cfg) if cfg.stage == "supervised" and cfg.dhnm.enabled else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": to_dict(cfg), "backend": asdict(backend), "settings": settings,
                           "tokenizer_dir": str(tokenizer_dir), "shards": shards,
                           "stage_kwargs": {"pool_names": pools.names} if pools else {}},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=backend.use_gpu,
                                     resources_per_worker=backend.resources_per_worker(cfg.train.cpus_per_worker)),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             callbacks=callbacks),
        torch_config=TorchConfig(backend=backend.dist_backend),
        # No Ray dataset: every worker streams its own slice of the shard files (conan.data.stream), a pure function
        # of (seed, step, world size) that a resume continues exactly (Ray 2.60 keeps no ingest position).
    )
    with ReportFollower(Path(cfg.output_dir) / "metrics.jsonl", lambda m: progress_line(cfg, m)):
        result = trainer.fit()  # `pools` stays referenced until here: the actors live as long as the run
    return StageResult(export_path(cfg), dict(result.metrics or {}))


def mined_negatives_path(cfg: JobConfig) -> Path:
    """Where the stage's mined candidates are: dhnm.candidates, else <output_dir>/mined_negatives.parquet."""
    return Path(cfg.dhnm.candidates) if cfg.dhnm.candidates else Path(cfg.output_dir) / "mined_negatives.parquet"


def mine_negatives(cfg: JobConfig, force: bool = False) -> Path:
    """Mine dhnm.pool_size candidates per query of the stage's shards with the stage's starting model
    (model.init_from) in the passage corpus (dhnm.passages), unless the parquet exists already; returns its path.
    The queries stream from the shard files (the driver holds arrays of 24 bytes a row, not the rows)."""
    from conan.data.mining import mine_supervised_candidates

    path = mined_negatives_path(cfg)
    if path.is_file() and not force:
        return path
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: mining needs a trained embedding model")
    # What the stage will train on, in the tasks DHNM manages.
    tasks = [t for t, w in cfg.supervised.task_weights.items() if w > 0 and t in TASKS and TASKS[t].mined]
    files = [p for parts in merge_manifests([load_manifest(d) for d in stage_shards(cfg, stage_class("supervised"))])
             .values() for p, _ in parts]
    try:
        n = mine_supervised_candidates(cfg.model.init_from, files, tasks, passage_lookup(cfg), path,
                                       cfg.dhnm.pool_size, cfg.dhnm.false_negative_ratio, cfg.dhnm.mining)
    except ValueError as e:
        raise ConfigError(f"dhnm: {e}") from e
    counts = pq.read_table(path, columns=["candidate_ids"])["candidate_ids"].combine_chunks().value_lengths()
    counts = counts.fill_null(0).to_numpy()
    enough = int((counts >= cfg.supervised.num_negatives).sum())
    say(f"[{cfg.stage}] mined {n} queries, median {int(np.median(counts)) if len(counts) else 0} of "
        f"{cfg.dhnm.pool_size} candidates (the false-negative guard drops the rest); {enough} with the "
        f"{cfg.supervised.num_negatives} DHNM keeps active → {path}"
        + ("" if enough else "; DHNM manages none: every query trains on its static negatives"))
    return path


def check_passages(cfg: JobConfig) -> None:
    """Fail unless dhnm.passages names the passage corpus the rows' and candidates' passage ids index."""
    if not cfg.dhnm.passages:
        raise ConfigError("dhnm.passages: DHNM needs the passage corpus (parquet, column text) that the rows' "
                          "positive_id and the mined candidate ids index; only the demo data (data.paths empty) "
                          "brings its own")
    if not Path(cfg.dhnm.passages).is_file():
        raise ConfigError(f"dhnm.passages: {cfg.dhnm.passages} does not exist")
    try:
        columns = pq.read_schema(cfg.dhnm.passages).names
    except (OSError, ValueError) as e:  # pyarrow's errors are both
        raise ConfigError(f"dhnm.passages: {cfg.dhnm.passages} is not a parquet file ({e})") from None
    if "text" not in columns:
        raise ConfigError(f"dhnm.passages: {cfg.dhnm.passages} has no column `text` (has {columns})")


def passage_lookup(cfg: JobConfig) -> Path:
    """dhnm.passages as the memory-mapped lookup that mining and the workers read: texts, and the token ids and mask
    keys of the stage's tokenizer and seq_len (written once, reused while they are unchanged)."""
    from conan.data.passages import write_passage_lookup

    check_passages(cfg)
    return write_passage_lookup(cfg.dhnm.passages, stage_class("supervised").passage_lookup_path(cfg),
                                check_inputs(cfg), cfg.data.seq_len)


def start_negative_pools(cfg: JobConfig):
    """Create the pool actors from the mined candidates (mining first when none are given)."""
    from conan.data.mining import read_mined_arrays
    from conan.dhnm import ReplacementRule, create_negative_pools

    if cfg.dhnm.candidates and not Path(cfg.dhnm.candidates).is_file():
        raise ConfigError(f"dhnm.candidates: {cfg.dhnm.candidates} does not exist")
    passage_lookup(cfg)  # what the workers' negatives read
    path = mined_negatives_path(cfg)
    if not path.is_file():
        path = mine_negatives(cfg)
    rule = ReplacementRule(cfg.dhnm.first_sight_min, cfg.dhnm.decay_factor, cfg.dhnm.stale_max)
    return create_negative_pools(*read_mined_arrays(path), f"{cfg.name}-dhnm", cfg.dhnm.num_shards, rule,
                                 cfg.supervised.num_negatives, resources=cfg.dhnm.pool_resources)
