"""The generic worker loop every stage runs inside a Ray Train worker.

Steps with accumulation on a DeepSpeed engine, metrics every `log_every` steps through
`ray.train.report` (and `metrics.jsonl` on rank 0), a checkpoint every `checkpoint_every` steps
(conan.train.checkpoint: engine + optimizer shards + step + RNG + the stage's extra state, with a manifest),
resume from the newest complete checkpoint after a worker failure or a restarted job, and export of the final model as a Hugging
Face directory (safetensors + tokenizer).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from conan.config import JobConfig, from_dict
from conan.data.shards import load_manifest, merge_manifests
from conan.metrics import TrainMetrics
from conan.model.build import load_or_init
from conan.tokenizer import load_tokenizer
from conan.train.backend import (Backend, deepspeed_config, lr_scheduler, master_weights, skip_unused_deepspeed_ops,
                                 worker_device)
from conan.train.batching import to_device
from conan.train.checkpoint import past_steps, restore, save_checkpoint, save_state
from conan.train.diagnostics import chance_warning
from conan.train.stages import export_path, stage_class

STAGE_MARKER = "conan_stage.json"


def _mean_over_ranks(values: list[float]) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1])


def train_worker(loop_config: dict) -> None:
    """Ray Train worker entry point: train one stage, checkpoint, resume, export."""
    cfg: JobConfig = from_dict(JobConfig, loop_config["job"])
    backend = Backend(**loop_config["backend"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(backend)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(loop_config["tokenizer_dir"])

    stage = stage_class(cfg.stage)(cfg, tokenizer, rank, world, **loop_config.get("stage_kwargs", {}))
    manifests = [load_manifest(d) for d in loop_config["shards"]]
    stage.prepare(merge_manifests(manifests), manifests[0].stats)
    position = stage.data_position(cfg, manifests, world)
    row_log = RowIdLog(Path(cfg.output_dir), rank) if cfg.train.log_row_ids else None
    model = load_or_init(stage.model_class, cfg.model, tokenizer)
    forward_calls = [0]  # model forward passes, reported per step (DHNM must add none)
    model.register_forward_pre_hook(lambda *_: forward_calls.__setitem__(0, forward_calls[0] + 1))

    import deepspeed
    skip_unused_deepspeed_ops(backend)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, backend, world), lr_scheduler=lr_scheduler(cfg), dist_init_required=False)

    start = restore(engine, stage, rank, position, ray.train.get_checkpoint(),
                    log=lambda message: print(f"[{cfg.stage}] {message}", flush=True))
    if start > cfg.train.steps:  # the launcher refuses it; here if the checkpoint it saw was not the one restored
        raise past_steps(cfg.output_dir, start, cfg.train.steps)
    if start:
        print(f"[{cfg.stage}] rank {rank} resumed at step {start}", flush=True)

    out = Path(cfg.output_dir)
    metrics_file = out / "metrics.jsonl"
    ray_metrics = TrainMetrics(cfg.name, cfg.stage) if rank == 0 else None
    losses: list[float] = []
    samples = tokens = 0
    window_start = time.perf_counter()
    accum = cfg.train.grad_accum
    for step in range(start, cfg.train.steps):
        _maybe_inject_failure(cfg, step, rank, world)
        step_metrics: dict = {}
        for micro in range(accum):
            index = step * accum + micro
            batch = stage.batch(index)
            if row_log:
                row_log.write(step, micro, batch["row_ids"])
            batch = to_device(batch, device)
            loss, counters = stage.loss(engine, batch, step)
            engine.backward(loss)
            if index + 1 < cfg.train.steps * accum:
                stage.prefetch(index + 1)  # after this micro-batch's reports; it overlaps the optimizer step
            engine.step()
            losses.append(float(loss.detach()))
            samples += counters.pop("samples")
            tokens += counters.pop("tokens")
            step_metrics.update(counters)
        done = step + 1
        is_checkpoint = done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
        if not (is_checkpoint or done % cfg.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - window_start
        steps_in_window = max(len(losses) // accum, 1)
        metrics = {"step": done, "loss": _mean_over_ranks(losses), "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": samples * world / elapsed, "tokens_per_s": tokens * world / elapsed,
                   "step_time_s": elapsed / steps_in_window, "threads": torch.get_num_threads(),
                   "forwards_per_step": forward_calls[0] / steps_in_window, **step_metrics, **stage.metrics()}
        if rank == 0:
            ray_metrics.record(metrics)
            out.mkdir(parents=True, exist_ok=True)
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            print(progress_line(cfg, metrics), flush=True)
        if is_checkpoint:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(engine, stage, done, rank, directory, position)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        losses, samples, tokens, forward_calls[0] = [], 0, 0, 0
        window_start = time.perf_counter()

    final_state = stage.state_dict()  # every rank takes part (the DHNM pool flushes and synchronises)
    weights = master_weights(engine)  # every rank takes part (a bf16 run's fp32 weights live in ZeRO partitions)
    if rank == 0:
        if final_state:
            save_state(final_state, out / "stage_state.pt")
        export_model(engine.module, tokenizer, cfg, weights, loop_config.get("settings"))


def progress_line(cfg: JobConfig, m: dict) -> str:
    """One log line per report: step, loss beside what tells whether it learns (the corpus's unigram entropy for a
    causal LM; log N and the cosines for a contrastive stage), lr, throughput and the time left at the report's step
    time; a warning when a contrastive loss is still near chance after a fifth of the steps."""
    parts = [f"[{cfg.stage}] step {m['step']}/{cfg.train.steps} loss {m['loss']:.3f}"]
    if "unigram_entropy" in m:
        parts.append(f"(unigram entropy {m['unigram_entropy']:.3f})")
    for prefix in sorted({k[:-len("positive_cos")] for k in m if k.endswith("positive_cos")}):
        parts.append(f"{prefix}cos pos/neg/random {m[prefix + 'positive_cos']:.2f}/{m[prefix + 'negative_cos']:.2f}/"
                     f"{m[prefix + 'random_pair_cos']:.2f} logN {m[prefix + 'log_candidates']:.2f}")
    parts.append(f"lr {m['lr']:.2e} {m['samples_per_s']:.0f} samples/s")
    if "step_time_s" in m:
        left = round((cfg.train.steps - m["step"]) * m["step_time_s"])
        parts.append(f"ETA {left // 60}m{left % 60:02d}s")
    warning = chance_warning(cfg.stage, m["step"], cfg.train.steps, m.get("chance_ratio", 0.0))
    return " ".join(parts) + (f"\n{warning}" if warning else "")


class RowIdLog:
    """Appends (step, micro-batch, rank, row ids) of every micro-batch to <output_dir>/row_ids/rank<r>.jsonl (after a
    resume a replayed step appears again; its last record is what the model trained on)."""

    def __init__(self, output_dir: Path, rank: int):
        self.path = output_dir / "row_ids" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    def write(self, step: int, micro: int, row_ids: list[int]) -> None:
        """One line per micro-batch."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "rank": self.rank, "row_ids": row_ids}) + "\n")


def _maybe_inject_failure(cfg: JobConfig, step: int, rank: int, world: int) -> None:
    """Chaos option: the last worker raises once at the chosen step (a marker file remembers it)."""
    if cfg.train.inject_failure_at_step != step or rank != world - 1:
        return
    marker = Path(cfg.output_dir) / ".injected_failure"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected failure at step {step} on rank {rank} (train.inject_failure_at_step)")


def export_model(model, tokenizer, cfg: JobConfig, weights: dict[str, torch.Tensor] | None = None,
                 settings: dict | None = None) -> Path:
    """Save the trained model (in fp32: `weights`, a bf16 run's master weights, replace its rounded ones) and tokenizer
    as a Hugging Face directory, marked with the stage, its steps and the settings it was launched with."""
    path = export_path(cfg)
    model = model.float()
    if weights is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(weights[name])
    embedding = cfg.stage in ("weak", "supervised")
    if embedding:
        model.config.attention_mode = "bidirectional"  # what AutoModel users (sentence-transformers) get
        model.config.max_seq_length = cfg.data.seq_len  # what encoders truncate at
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    if embedding:
        from conan.config import to_dict
        from conan.export import add_sentence_transformers_files
        from conan.model_card import write_model_card
        add_sentence_transformers_files(path)
        write_model_card(path, to_dict(cfg))  # replaces sentence-transformers' generic card
    (path / STAGE_MARKER).write_text(json.dumps({"stage": cfg.stage, "steps": cfg.train.steps, "settings": settings}))
    return path
