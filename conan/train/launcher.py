"""Builds a Ray Train TorchTrainer for a stage config and runs it (local Ray or a cluster address).

The run is named after the job and stage and stored under `<output_dir>/ray`, so launching the same
config again resumes from its latest checkpoint (Ray Train V2 restores by name + storage path), and a
stage whose export already exists is not launched at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.json as pajson
import pyarrow.parquet as pq

from conan.config import ConfigError, JobConfig, to_dict
from conan.runtime import init_ray
from conan.train.backend import resolve_backend
from conan.train.loop import STAGE_MARKER, train_worker
from conan.train.stages import Stage, export_path, stage_class


@dataclass
class StageResult:
    """What a finished stage produced."""

    model_dir: Path
    metrics: dict
    skipped: bool = False


def check_inputs(cfg: JobConfig) -> Path:
    """Fail before any worker starts when the previous stage's model or the tokenizer is missing; return the tokenizer dir."""
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.init_from: no exported model at {path} (run the previous stage first)")
    tokenizer_dir = Path(cfg.tokenizer.path or cfg.model.init_from or "")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer.path: no tokenizer at {tokenizer_dir or '(unset)'}; set tokenizer.path "
                          "or model.init_from")
    for p in cfg.data.paths:
        if not Path(p).exists():
            raise ConfigError(f"data.paths: {p} does not exist")
    return tokenizer_dir


def read_rows(paths: list[str], stage: type[Stage], key: str = "data.paths") -> list[dict]:
    """Rows of parquet files / directories (e.g. a curation or CLR output) or JSONL files, as the stage's columns:
    a missing column is taken from its alias (weak pairs' query/positive for input/output) or its default."""
    rows: list[dict] = []
    for p in paths:
        table = pq.read_table(p) if Path(p).is_dir() or p.endswith(".parquet") else pajson.read_json(p)
        names = set(table.column_names)
        missing = [c for c in stage.columns if c not in names and stage.aliases.get(c) not in names
                   and c not in stage.defaults]
        if missing:
            raise ConfigError(f"{key}: {p} lacks columns {missing} (has {table.column_names})")
        columns = {c: table[c] if c in names else table[stage.aliases[c]] if stage.aliases.get(c) in names
                   else None for c in stage.columns}
        n = table.num_rows
        values = {c: col.to_pylist() if col is not None else [stage.defaults[c]] * n for c, col in columns.items()}
        rows += [dict(zip(values, row)) for row in zip(*values.values())]
    return rows


def stage_rows(cfg: JobConfig, stage: type[Stage]) -> list[dict]:
    """The stage's rows: the user's files, else the real datasets; data.max_rows keeps a seeded random sample (in
    input order: a file's head would be one source or language only)."""
    rows = read_rows(cfg.data.paths, stage) if cfg.data.paths else stage.records(cfg)
    if cfg.data.max_rows is not None and cfg.data.max_rows < len(rows):
        keep = np.random.default_rng([cfg.train.seed, 11]).choice(len(rows), cfg.data.max_rows, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    if not rows:
        raise ConfigError(f"stage {cfg.stage}: no training rows")
    return rows


def stage_dataset(rows: list[dict]):
    """Rows as a Ray dataset with a stable row_id."""
    import ray.data
    return ray.data.from_items([{**r, "row_id": i} for i, r in enumerate(rows)])


def is_finished(cfg: JobConfig) -> bool:
    """True when this stage's export exists for the configured number of steps."""
    marker = export_path(cfg) / STAGE_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == {"stage": cfg.stage, "steps": cfg.train.steps}


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """A copy with every path absolute: Ray workers run in their own working directory."""
    def absolute(p):
        return str(Path(p).resolve()) if p else p
    return replace(cfg, output_dir=absolute(cfg.output_dir),
                   model=replace(cfg.model, init_from=absolute(cfg.model.init_from)),
                   tokenizer=replace(cfg.tokenizer, path=absolute(cfg.tokenizer.path)),
                   data=replace(cfg.data, root=absolute(cfg.data.root), paths=[absolute(p) for p in cfg.data.paths]),
                   dhnm=replace(cfg.dhnm, candidates=absolute(cfg.dhnm.candidates)))


def run_stage(cfg: JobConfig, callbacks: list | None = None) -> StageResult:
    """Train one stage on Ray Train with DeepSpeed workers and return the exported model's directory.

    `callbacks`: Ray Train user callbacks (a Tune trial passes TuneReportCallback to stream the reports to Tune)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    tokenizer_dir = check_inputs(cfg)
    if is_finished(cfg):
        print(f"[{cfg.stage}] already finished: {export_path(cfg)} (nothing to do)", flush=True)
        return StageResult(export_path(cfg), {}, skipped=True)
    init_ray(cfg.ray_address)
    backend = resolve_backend(cfg.train.device, cfg.train.precision, ray.cluster_resources())
    stage = stage_class(cfg.stage)
    rows = stage_rows(cfg, stage)
    pools = start_negative_pools(cfg, rows) if cfg.stage == "supervised" and cfg.dhnm.enabled else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": to_dict(cfg), "backend": asdict(backend),
                           "tokenizer_dir": str(tokenizer_dir),
                           "stage_kwargs": {"pool_names": pools.names} if pools else {}},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=backend.use_gpu,
                                     resources_per_worker=backend.resources_per_worker(cfg.train.cpus_per_worker)),
        run_config=RunConfig(name=f"{cfg.name}-{cfg.stage}", storage_path=str(Path(cfg.output_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             callbacks=callbacks),
        torch_config=TorchConfig(backend=backend.dist_backend),
        datasets={"train": stage_dataset(rows)},
        # Every worker sees the whole (small) table and takes rows rank::world after sorting by row_id,
        # so shards are identical across restarts and resumes replay exactly.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()  # `pools` stays referenced until here: the actors live as long as the run
    return StageResult(export_path(cfg), dict(result.metrics or {}))


def mined_negatives_path(cfg: JobConfig) -> Path:
    """Where the stage's mined candidates are: dhnm.candidates, else <output_dir>/mined_negatives.parquet."""
    return Path(cfg.dhnm.candidates) if cfg.dhnm.candidates else Path(cfg.output_dir) / "mined_negatives.parquet"


def mine_negatives(cfg: JobConfig, rows: list[dict], force: bool = False) -> Path:
    """Mine dhnm.pool_size candidates per query of `rows` with the stage's starting model (model.init_from) in the
    XQuAD passage corpus, unless the parquet exists already; returns its path."""
    from conan.data import stage_data
    from conan.data.mining import MiningConfig, mine_supervised_candidates

    path = mined_negatives_path(cfg)
    if path.is_file() and not force:
        return path
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: mining needs a trained embedding model")
    rows = [r for r in rows if cfg.supervised.task_weights.get(r["task"], 0) > 0]  # what the stage will train on
    n = mine_supervised_candidates(cfg.model.init_from, rows, stage_data.xquad_corpus(cfg.data.root), path,
                                   MiningConfig(top_k=cfg.dhnm.pool_size,
                                                false_negative_ratio=cfg.dhnm.false_negative_ratio,
                                                index=cfg.dhnm.index))
    print(f"[{cfg.stage}] mined {cfg.dhnm.pool_size} candidates for {n} queries → {path}", flush=True)
    return path


def start_negative_pools(cfg: JobConfig, rows: list[dict]):
    """Create the pool actors from the mined candidates (mining first when none are given)."""
    from conan.data.mining import read_mined
    from conan.dhnm import ReplacementRule, create_negative_pools

    if cfg.dhnm.candidates and not Path(cfg.dhnm.candidates).is_file():
        raise ConfigError(f"dhnm.candidates: {cfg.dhnm.candidates} does not exist")
    path = mine_negatives(cfg, rows)
    rule = ReplacementRule(cfg.dhnm.first_sight_min, cfg.dhnm.decay_factor, cfg.dhnm.stale_max)
    return create_negative_pools(read_mined(path), f"{cfg.name}-dhnm", cfg.dhnm.num_shards, rule,
                                 cfg.supervised.num_negatives)
