"""Soft-mask attention cost: forward+backward step time of the soft path ÷ plain bidirectional SDPA.

Same model, same batch, same process; paths interleaved so drift affects both. Goal: ≤ 1.25 on CPU
at seq 512; with a GPU, FlexAttention at seq 2048 ≤ 1.10.

With --vary-lengths K the batches are what training feeds: each step padded to one of K lengths in [seq/2, seq] and
alpha moving along the linear schedule; it then also prints each path's total time, compilation included, and how
many graphs torch.compile built (a kernel that recompiles per length or per alpha shows here).

    python bench/soft_mask.py [--seq 512] [--batch 4] [--steps 10] [--device cpu|cuda] [--backend auto|sdpa|flex]
    python bench/soft_mask.py --device cuda --seq 2048 --preset conan-1.4b --layers 2   # the 1.4b's layer shapes
    python bench/soft_mask.py --device cuda --seq 2048 --vary-lengths 6 --steps 24
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from conan.model import PRESETS, ConanConfig, ConanForEmbedding


def step_time(model, ids, mask, mode: str, alpha: float, sync) -> float:
    """Seconds for one forward+backward pass."""
    start = time.perf_counter()
    model(ids, mask, attention_mode=mode, soft_mask_alpha=alpha).sum().backward()
    sync()
    return time.perf_counter() - start


def batch_for_step(step: int, args, vocab_size: int, device: torch.device):
    """(ids, attention mask, alpha) of one step: one padded row, as in real batches; with --vary-lengths the
    step's padded length and alpha move as in training."""
    length, alpha = args.seq, args.alpha
    if args.vary_lengths:
        lengths = [args.seq - k * args.seq // (2 * args.vary_lengths) for k in range(args.vary_lengths)]
        length, alpha = lengths[step % len(lengths)], 0.05 + 0.9 * step / max(1, args.steps + 1)
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(10, vocab_size, (args.batch, length), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[0, length * 3 // 4:] = 0
    return ids, mask, alpha


def main() -> None:
    """Measure and print the soft ÷ bidirectional ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3, help="soft-mask alpha (mid-schedule)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["auto", "sdpa", "flex"], default="auto",
                        help="auto (the platform's default): compiled FlexAttention for the soft mask on CUDA, SDPA else")
    parser.add_argument("--hidden", type=int, default=256, help="width of the default shape (head dim 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="take the layer shapes (width, heads, FFN, vocabulary) from this preset instead")
    parser.add_argument("--vary-lengths", type=int, default=0, metavar="K",
                        help="pad each step to one of K lengths in [seq/2, seq], alpha on the linear schedule")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = {} if args.preset else dict(hidden_size=args.hidden, num_attention_heads=args.hidden // 32,
                                        num_key_value_heads=args.hidden // 64,
                                        intermediate_size=args.hidden * 8 // 3 // 64 * 64)
    config = ConanConfig.from_preset(args.preset or "tiny", num_hidden_layers=args.layers,
                                     max_position_embeddings=max(args.seq, 512), attention_backend=args.backend,
                                     matryoshka_dims=None, **shape)
    torch.manual_seed(0)
    model = ConanForEmbedding(config).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [batch_for_step(i, args, config.vocab_size, device) for i in range(args.steps + 2)]

    times = {"bidirectional": [], "soft": []}
    for ids, mask, alpha in batches:
        for mode in times:
            times[mode].append(step_time(model, ids, mask, mode, alpha, sync))
    totals = {mode: sum(t) for mode, t in times.items()}
    times = {mode: t[2:] for mode, t in times.items()}  # warm-up (and compilation) excluded
    soft, bidir = statistics.median(times["soft"]), statistics.median(times["bidirectional"])
    print(f"device={device.type} backend={args.backend} seq={args.seq} batch={args.batch} "
          f"hidden={config.hidden_size} heads={config.num_attention_heads} head_dim={config.head_dim} "
          f"layers={args.layers} threads={torch.get_num_threads()}")
    print(f"bidirectional step {bidir * 1000:.1f} ms   soft step {soft * 1000:.1f} ms")
    if args.vary_lengths:
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"{args.vary_lengths} lengths, alpha {batches[0][2]:.2f} → {batches[-1][2]:.2f}: total with compilation "
              f"bidirectional {totals['bidirectional']:.1f} s, soft {totals['soft']:.1f} s; graphs compiled {graphs}")
    print(f"soft / bidirectional = {soft / bidir:.3f}")


if __name__ == "__main__":
    main()
