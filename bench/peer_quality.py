"""Peer check: Conan's supervised stage against sentence-transformers' own trainer, same start, same data, same budget.

Both start from the same initial model (default: the demo's weak export), train on the same supervised rows (the
stage's own: retrieval, CLR, classification, STS, as `conan train supervised` reads them) for the same number of
steps at the same batch size, lr schedule and temperature, once per seed; then both exports are scored by the same
dev evaluation (mean of every task's main metric at full size).

- Conan: `run_stage` (Ray Train, 2 DeepSpeed workers) with the config as shipped: its masks, Matryoshka, DHNM when
  the config enables it; the task weights are set to the tasks' row counts and every task's global batch to the
  pair tasks' (sentence-transformers has one batch size and samples datasets in proportion to their size).
- sentence-transformers: `SentenceTransformerTrainer` with MultipleNegativesRankingLoss (scale 1/τ, the rows' hard
  negatives as extra columns) for retrieval / CLR / classification, CoSENTLoss for STS, each wrapped in
  MatryoshkaLoss over the same dims, and its PROPORTIONAL multi-dataset batch sampler; AdamW with the same betas,
  weight decay, clipping, warmup and cosine decay to the same floor.

    python bench/peer_quality.py [--init runs/pipeline_tiny/weak/model] [--seeds 3]

Last line: `peer_quality conan=<mean> st=<mean> ratio=<conan/st>` (goal ≥ 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from conan.config import EvalConfig, JobConfig, load_config
from conan.eval.runner import MAIN_METRIC, evaluate, largest_dim
from conan.train.launcher import absolute_paths, run_stage, stage_rows, with_demo_data
from conan.train.stages import SupervisedStage


def dev_score(model_dir: Path, eval_yaml: str, out: Path) -> tuple[float, dict]:
    """Mean main metric over the dev evaluation's tasks at the model's full size, and the per-task means."""
    import contextlib
    import io

    cfg = load_config(EvalConfig, eval_yaml, [f"model_dir={model_dir}", f"output_dir={out}", "baselines=[]",
                                              "bm25=false", "plots=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        result = evaluate(cfg)
    scores = result["scores"][result["model"]]
    per_task = {task: float(np.mean([by_dim[largest_dim(by_dim)][MAIN_METRIC[result["tasks"][task]]]
                                     for by_dim in subsets.values()])) for task, subsets in scores.items()}
    return float(np.mean(list(per_task.values()))), per_task


def conan_run(cfg: JobConfig, seed: int, out: Path) -> Path:
    """Conan's supervised stage for one seed; returns its export."""
    return run_stage(replace(cfg, output_dir=str(out), train=replace(cfg.train, seed=seed))).model_dir


def st_datasets(rows: list[dict], k: int) -> dict:
    """One datasets.Dataset per task in sentence-transformers' column conventions."""
    from datasets import Dataset

    out = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        if task == "sts":
            out[task] = Dataset.from_dict({"sentence1": [r["s1"] for r in mine], "sentence2": [r["s2"] for r in mine],
                                           "score": [r["score"] / 5.0 for r in mine]})
        else:
            columns = {"anchor": [r["query"] for r in mine], "positive": [r["positive"] for r in mine]}
            columns.update({f"negative_{j + 1}": [r["negatives"][j] for r in mine] for j in range(k)})
            out[task] = Dataset.from_dict(columns)
    return out


def st_run(cfg: JobConfig, rows: list[dict], seed: int, batch: int, out: Path) -> Path:
    """sentence-transformers' trainer on the same rows and budget; returns its saved model."""
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (CoSENTLoss, MatryoshkaLoss,
                                                                   MultipleNegativesRankingLoss)
    from sentence_transformers.sentence_transformer.training_args import MultiDatasetBatchSamplers

    torch.manual_seed(seed)
    model = SentenceTransformer(cfg.model.init_from, device="cpu", trust_remote_code=True, local_files_only=True)
    model.max_seq_length = cfg.data.seq_len
    dims = cfg.loss.matryoshka_dims or model[0].auto_model.config.matryoshka_dims
    data = st_datasets(rows, cfg.supervised.num_negatives)
    pair = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1 / cfg.loss.temperature), dims)
    sts = MatryoshkaLoss(model, CoSENTLoss(model, scale=cfg.loss.cosent_scale), dims)
    o = cfg.optim
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=batch, max_steps=cfg.train.steps, seed=seed,
        learning_rate=o.lr, warmup_ratio=o.warmup_ratio, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_epsilon=o.eps, max_grad_norm=o.grad_clip, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio}, multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                               loss={task: sts if task == "sts" else pair for task in data}).train()
    model.save(str(out / "model"))
    return out / "model"


def main() -> None:
    """Train both sides for every seed, score them, print the figures and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="runs/pipeline_tiny/weak/model", help="the shared initial model")
    parser.add_argument("--config", default="jobs/configs/supervised_tiny.yaml")
    parser.add_argument("--clr", default="runs/pipeline_tiny/clr/data", help="the CLR set the stage reads ('' = none)")
    parser.add_argument("--tokenizer", default="runs/pipeline_tiny/tokenizer")
    parser.add_argument("--eval", default="jobs/configs/eval_tiny.yaml", help="the dev evaluation")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="stage config override")
    args = parser.parse_args()

    shared = [f"model.init_from={args.init}", f"tokenizer.path={args.tokenizer}",
              *([f"supervised.clr_paths=[{args.clr}]"] if args.clr else []), *args.overrides]
    base = load_config(JobConfig, args.config, shared)
    rows = stage_rows(with_demo_data(absolute_paths(base), SupervisedStage), SupervisedStage)
    counts = {t: float(sum(r["task"] == t for r in rows)) for t in sorted({r["task"] for r in rows})}
    weights = {t: counts[t] if base.supervised.task_weights.get(t, 0) > 0 else 0.0 for t in counts}
    rows = [r for r in rows if weights[r["task"]] > 0]
    per_worker = base.supervised.batch_sizes["retrieval"]
    batch = per_worker * base.train.num_workers
    cfg = load_config(JobConfig, args.config, [
        *shared, f"supervised.task_weights={json.dumps(weights)}",
        f"supervised.batch_sizes={json.dumps({t: per_worker for t in counts})}"])
    print(f"[peer] rows per task {dict((t, int(c)) for t, c in counts.items() if weights[t])}, global batch {batch}, "
          f"{cfg.train.steps} steps, {args.seeds} seeds", flush=True)
    results: dict[str, list[float]] = {"conan": [], "st": []}
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        for seed in range(args.seeds):
            for side in ("conan", "st"):
                out = Path(tmp) / f"{side}-{seed}"
                model_dir = conan_run(cfg, seed, out) if side == "conan" else st_run(cfg, rows, seed, batch, out)
                score, per_task = dev_score(model_dir, args.eval, out / "eval")
                results[side].append(score)
                print(f"[peer] {side} seed {seed}: {score:.4f} " + json.dumps({t: round(v, 4) for t, v in per_task.items()}),
                      flush=True)
    conan, st = statistics.mean(results["conan"]), statistics.mean(results["st"])
    spread = {side: statistics.stdev(v) if len(v) > 1 else 0.0 for side, v in results.items()}
    print(f"[peer] conan {conan:.4f} ± {spread['conan']:.4f}, sentence-transformers {st:.4f} ± {spread['st']:.4f}")
    print(f"peer_quality conan={conan:.4f} st={st:.4f} ratio={conan / st:.3f}")


if __name__ == "__main__":
    main()
