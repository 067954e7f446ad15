"""Weak-stage throughput: the platform vs sentence-transformers (MNRL) vs a bare PyTorch loop, one run.

Same tiny model weights, same (query, positive) pairs from ../shared/data, same batch size, same
thread count. Prints samples/s of each, platform ÷ sentence-transformers (goal ≥ 1.0) and the
platform's overhead over the bare loop (goal ≤ 10%).

    python bench/weak_throughput.py [--steps 40] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from conan.config import JobConfig, load_config
from conan.data.stage_data import pair_records
from conan.losses import infonce_loss
from conan.model import ConanForEmbedding
from conan.runtime import init_ray
from conan.tokenizer import load_tokenizer
from conan.train.launcher import run_stage

from _tiny import tiny_embedding_model

WARMUP = 5


def bare_loop(model_dir: Path, tokenizer, pairs: list[dict], batch: int, steps: int, seq_len: int) -> float:
    """samples/s of a plain PyTorch loop: tokenize, one forward for the bare queries (the stage's own query form) and one for positives, InfoNCE, AdamW."""
    model = ConanForEmbedding.from_pretrained(str(model_dir)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(steps + WARMUP):
        chunk = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        start = time.perf_counter()
        q, p = (tokenizer(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt") for texts in (
            [p["input"] for p in chunk], [p["output"] for p in chunk]))
        loss, _ = infonce_loss(model(q["input_ids"], q["attention_mask"]), model(p["input_ids"], p["attention_mask"]),
                               torch.arange(batch), 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[WARMUP:])


def sentence_transformers_trainer(model_dir: Path, pairs: list[dict], batch: int, steps: int, seq_len: int) -> float:
    """samples/s of SentenceTransformerTrainer with MultipleNegativesRankingLoss on the same weights and pairs."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Pooling, Transformer
    from transformers import TrainerCallback

    encoder = Transformer(str(model_dir), max_seq_length=seq_len)
    model = SentenceTransformer(modules=[encoder, Pooling(encoder.get_word_embedding_dimension(), "mean")], device="cpu")
    n = batch * (steps + WARMUP)
    data = Dataset.from_dict({
        "anchor": [pairs[i % len(pairs)]["input"] for i in range(n)],
        "positive": [pairs[i % len(pairs)]["output"] for i in range(n)]})

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        # Intervals between step ends: the Trainer fetches and tokenizes a batch *before* on_step_begin,
        # so begin→end would leave data loading out.
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps + WARMUP, learning_rate=1e-4,
            report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0, use_cpu=True,
            disable_tqdm=True)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                   loss=MultipleNegativesRankingLoss(model, scale=20.0),
                                   callbacks=[StepTimer()]).train()
    return batch / statistics.median(b - a for a, b in zip(ends[WARMUP - 1:], ends[WARMUP:]))


def platform(model_dir: Path, tokenizer_dir: Path, batch: int, steps: int, seq_len: int, threads: int,
             out: Path) -> float:
    """samples/s of `conan train weak`: one Ray Train worker with `threads` CPUs, DeepSpeed ZeRO-1."""
    cfg = load_config(JobConfig, None, [
        "stage=weak", f"output_dir={out}", f"model.init_from={model_dir}", f"tokenizer.path={tokenizer_dir}",
        f"train.steps={steps + WARMUP}", f"train.micro_batch_size={batch}", "train.num_workers=1",
        f"train.cpus_per_worker={threads}", "train.log_every=5", f"train.checkpoint_every={steps + WARMUP}",
        f"data.seq_len={seq_len}", "data.max_rows=4000", "soft_mask.enabled=false", "optim.lr=1e-4"])
    run_stage(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows if r["step"] > WARMUP)


def main() -> None:
    """Run the three trainers and print their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from conan.config import default_data_root
    pairs = pair_records(default_data_root(), max_rows=4000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_embedding_model((t for p in pairs for t in (p["input"], p["output"])), tmp / "model")
        tokenizer = load_tokenizer(tmp / "model")

        bare = bare_loop(tmp / "model", tokenizer, pairs, args.batch, args.steps, args.seq_len)
        st = sentence_transformers_trainer(tmp / "model", pairs, args.batch, args.steps, args.seq_len)
        init_ray(num_cpus=args.threads)
        ours = platform(tmp / "model", tmp / "model", args.batch, args.steps, args.seq_len, args.threads, tmp / "run")

    print(f"batch={args.batch} seq_len≤{args.seq_len} threads={args.threads} steps={args.steps} (median step, "
          f"{WARMUP} warm-up steps excluded)")
    print(f"bare PyTorch loop           {bare:8.1f} samples/s")
    print(f"sentence-transformers MNRL  {st:8.1f} samples/s")
    print(f"conan weak stage (Ray+DS)   {ours:8.1f} samples/s")
    print(f"conan / sentence-transformers = {ours / st:.3f}   (goal ≥ 1.0)")
    print(f"conan overhead vs bare loop   = {bare / ours - 1:+.1%}   (goal ≤ 10%)")


if __name__ == "__main__":
    main()
