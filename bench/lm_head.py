"""The LM head's fused, chunked cross-entropy (conan/model/lm_loss.py) against the plain head, same process, same batch.

One pretraining step of a preset (forward, backward, AdamW) on random tokens, the loss either the model's own (fused:
no logits tensor) or the plain one (every logit, log-softmax, the shifted cross-entropy), in alternating rounds so that
both see the same machine load; the ratio is of the median step times. Peak memory is each variant's largest
allocation above the model's, measured with torch's CPU allocator profile.

    python bench/lm_head.py [--preset tiny] [--seq 128] [--batch 16] [--rounds 5] [--steps 5] [--threads 1]

Last line: `lm_head preset=… fused_over_plain=<step time ratio> plain_s=… fused_s=… plain_peak_mb=…
fused_peak_mb=…`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from conan.model import PRESETS, ConanConfig, ConanForCausalLM


def plain_loss(model: ConanForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The head as it was: every logit, then the shifted cross-entropy."""
    hidden = model.model(ids, attention_mode="causal").last_hidden_state
    logits = F.linear(hidden, model.model.embed_tokens.weight)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def fused_loss(model: ConanForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The model's own training loss."""
    return model(ids, labels=ids).loss


def step_time(model, optimizer, loss_fn, ids, steps: int) -> float:
    """Mean seconds of `steps` training steps."""
    start = time.perf_counter()
    for _ in range(steps):
        loss_fn(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def peak_mb(model, ids, loss_fn) -> float:
    """The largest live CPU memory during one forward and backward, in MB (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_fn(model, ids).backward()
    model.zero_grad()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak / 2 ** 20


def main() -> None:
    """Alternate plain and fused rounds; print the ratio of median step times."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps a round, after one warm-up step per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a training worker has 1 here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ConanConfig.from_preset(args.preset, max_position_embeddings=max(args.seq, 512))
    model = ConanForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq))
    variants = {"plain": plain_loss, "fused": fused_loss}
    times = {name: [] for name in variants}
    for name, fn in variants.items():
        step_time(model, optimizer, fn, ids, 1)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(step_time(model, optimizer, fn, ids, args.steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    peaks = {name: peak_mb(model, ids, fn) for name, fn in variants.items()}
    print({name: [round(t, 3) for t in ts] for name, ts in times.items()})
    print(f"lm_head preset={args.preset} fused_over_plain={median['fused'] / median['plain']:.3f} "
          f"plain_s={median['plain']:.3f} fused_s={median['fused']:.3f} plain_peak_mb={peaks['plain']:.0f} "
          f"fused_peak_mb={peaks['fused']:.0f}")


if __name__ == "__main__":
    main()
