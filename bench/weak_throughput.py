"""Weak-stage throughput: the platform vs sentence-transformers (MNRL) vs a bare PyTorch loop, one run.

Data: real mixed-length pairs, the curated weak pairs (`conan curate` with jobs/configs/curate_tiny.yaml over the
bundled SFT records: XQuAD question → paragraph in 12 languages, CSL, bge zh pairs; ~30k pairs, a few tokens to 192),
run here first. Same tiny model weights, same pairs, same batch size and thread count, fp32 everywhere unless said. Rates
are total samples ÷ total time over the steps after the warm-up.

- bare: a plain PyTorch loop (tokenize, a forward for queries and one for positives, InfoNCE, torch's AdamW with its
  default loop, as the platform steps on CPU), the pairs in file order (mixed batches);
- st: SentenceTransformerTrainer + MultipleNegativesRankingLoss, the same pairs (its default batch sampler and its
  default optimizer, torch's fused AdamW);
- conan plain: `conan train weak` (1 Ray Train worker, DeepSpeed) with mixed batches and no length buckets, the bare
  loop's work: bare ÷ this - 1 is the platform's overhead;
- conan: the weak stage as shipped (batches by source and language, no length buckets);
- conan buckets: the same with `data.bucket_batches=16` (runs of 16 micro-batches cut from length-sorted rows);
- conan packed: the same with `data.pack_texts=true` (each side's texts one unpadded row; the demo's weak config);
- conan bf16: as shipped in bf16, where this CPU multiplies it natively (the precision the backend picks here).

The loss of the shipped, the bucketed and the packed runs is printed per step (each step draws the same group in
all three), so length bucketing's effect on training shows beside its speed (packing's: float rounding only).

    python bench/weak_throughput.py [--steps 64] [--batch 32] [--threads 2]

Last line: `weak_throughput conan_over_st=<conan as shipped ÷ st> overhead_vs_bare=<bare ÷ conan plain - 1>
buckets_over_st=<conan buckets ÷ st> packed_over_st=<conan packed ÷ st>` (goals ≥ 1.10, ≤ +5%).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from conan.config import JobConfig, load_config
from conan.losses import infonce_loss
from conan.model import ConanForEmbedding
from conan.runtime import init_ray
from conan.tokenizer import load_tokenizer
from conan.train.backend import cpu_multiplies_bf16
from conan.train.launcher import run_stage

from _tiny import tiny_embedding_model

WARMUP = 5


def bare_loop(model_dir: Path, tokenizer, pairs: list[dict], batch: int, steps: int, seq_len: int) -> float:
    """samples/s of a plain PyTorch loop: tokenize, one forward for the bare queries (the stage's own query form) and one for positives, InfoNCE, AdamW."""
    model = ConanForEmbedding.from_pretrained(str(model_dir)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the default loop, as the platform's step on CPU
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
    return batch * len(times[WARMUP:]) / sum(times[WARMUP:])


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
    return batch * (len(ends) - WARMUP) / (ends[-1] - ends[WARMUP - 1])


def platform(model_dir: Path, pairs_dir: Path, batch: int, steps: int, seq_len: int, threads: int, out: Path,
             *overrides: str) -> tuple[float, list[tuple[int, float]]]:
    """(samples/s, [(step, loss)]) of `conan train weak` on the curated pairs: one Ray Train worker with `threads`
    CPUs, DeepSpeed."""
    cfg = load_config(JobConfig, None, [
        "stage=weak", f"output_dir={out}", f"model.init_from={model_dir}", f"tokenizer.path={model_dir}",
        f"data.paths=[{pairs_dir}]", f"train.steps={steps + WARMUP}", f"train.micro_batch_size={batch}",
        "train.num_workers=1", f"train.cpus_per_worker={threads}", "train.log_every=1",
        f"train.checkpoint_every={steps + WARMUP}", f"data.seq_len={seq_len}", "soft_mask.enabled=false",
        "optim.lr=1e-4", *overrides])
    run_stage(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > WARMUP]
    return (sum(r["samples_per_s"] * r["step_time_s"] for r in timed) / sum(r["step_time_s"] for r in timed),
            [(r["step"], r["loss"]) for r in rows])


def curated_pairs(out: Path) -> tuple[Path, list[dict]]:
    """Curate the bundled SFT records (curate_tiny.yaml) into out; returns its data folder and its pairs in file
    order, as {input, output}."""
    import pyarrow.parquet as pq

    from conan.config import CurationConfig
    from conan.data.weak import curate

    curate(load_config(CurationConfig, "jobs/configs/curate_tiny.yaml", [f"output_dir={out}"]))
    rows = pq.read_table(sorted((out / "data").glob("*.parquet")), columns=["query", "positive"]).to_pylist()
    return out / "data", [{"input": r["query"], "output": r["positive"]} for r in rows]


def main() -> None:
    """Run the trainers and print their rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=192, help="the weak stage's training length in the demo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init_ray(num_cpus=args.threads)
        pairs_dir, pairs = curated_pairs(tmp / "curated")
        tiny_embedding_model((t for p in pairs[:8000] for t in (p["input"], p["output"])), tmp / "model")
        tokenizer = load_tokenizer(tmp / "model")
        bare = bare_loop(tmp / "model", tokenizer, pairs, args.batch, args.steps, args.seq_len)
        st = sentence_transformers_trainer(tmp / "model", pairs, args.batch, args.steps, args.seq_len)
        run = functools.partial(platform, tmp / "model", pairs_dir, args.batch, args.steps, args.seq_len, args.threads)
        plain, _ = run(tmp / "plain", "data.batch_by=[]", "train.precision=fp32")
        ours, losses = run(tmp / "conan", "train.precision=fp32")
        bucketed, bucketed_losses = run(tmp / "buckets", "data.bucket_batches=16", "train.precision=fp32")
        packed, packed_losses = run(tmp / "packed", "data.pack_texts=true", "train.precision=fp32")
        bf16 = run(tmp / "bf16", "train.precision=bf16")[0] if cpu_multiplies_bf16() else None

    print(f"{len(pairs)} curated pairs, batch={args.batch} seq_len≤{args.seq_len} threads={args.threads} "
          f"steps={args.steps} ({WARMUP} warm-up steps excluded)")
    print(f"bare PyTorch loop (mixed batches)                    {bare:8.1f} samples/s")
    print(f"sentence-transformers MNRL                           {st:8.1f} samples/s")
    print(f"conan weak, mixed batches, no buckets                {plain:8.1f} samples/s")
    print(f"conan weak as shipped (groups by source, language)   {ours:8.1f} samples/s")
    print(f"conan weak, groups + length buckets of 16 batches    {bucketed:8.1f} samples/s")
    print(f"conan weak, groups + packed texts (demo config)      {packed:8.1f} samples/s")
    if bf16 is not None:
        print(f"conan weak as shipped, bf16                          {bf16:8.1f} samples/s")
    print(f"same batches as st (mixed, no buckets): conan ÷ st = {plain / st:.3f}")
    print("loss per step (the same group each step): shipped | with buckets | packed")
    for (step, a), (_, b), (_, c) in zip(losses, bucketed_losses, packed_losses):
        print(f"  step {step:3d}  {a:.3f} | {b:.3f} | {c:.3f}")
    curves = (losses, bucketed_losses, packed_losses)
    means = [statistics.mean(x for s, x in c if s > WARMUP) for c in curves]
    print("mean loss after warm-up: " + " | ".join(f"{m:.3f}" for m in means))
    print(f"weak_throughput conan_over_st={ours / st:.3f} overhead_vs_bare={bare / plain - 1:+.3f} "
          f"buckets_over_st={bucketed / st:.3f} packed_over_st={packed / st:.3f}")


if __name__ == "__main__":
    main()
