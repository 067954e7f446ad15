"""Soft-mask attention cost: forward+backward step time of the soft path ÷ plain bidirectional SDPA.

Same model, same batch, same process; paths interleaved so drift affects both. Goal: ≤ 1.25 on CPU
at seq 512; with a GPU, FlexAttention at seq 2048 ≤ 1.10.

    python bench/soft_mask.py [--seq 512] [--batch 4] [--steps 10] [--device cpu|cuda] [--backend auto|sdpa|flex]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from conan.model import ConanConfig, ConanForEmbedding


def step_time(model, ids, mask, mode: str, alpha: float, sync) -> float:
    """Seconds for one forward+backward pass."""
    start = time.perf_counter()
    model(ids, mask, attention_mode=mode, soft_mask_alpha=alpha).sum().backward()
    sync()
    return time.perf_counter() - start


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
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ConanConfig.from_preset("tiny", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
                                     intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                                     max_position_embeddings=max(args.seq, 512),
                                     attention_backend=args.backend, matryoshka_dims=None)
    torch.manual_seed(0)
    model = ConanForEmbedding(config).to(device=device, dtype=dtype)
    ids = torch.randint(10, config.vocab_size, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    mask[0, args.seq * 3 // 4:] = 0  # one padded row, as in real batches
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times = {"bidirectional": [], "soft": []}
    for i in range(args.steps + 2):
        for mode in times:
            t = step_time(model, ids, mask, mode, args.alpha, sync)
            if i >= 2:  # warm-up (and compilation) excluded
                times[mode].append(t)
    soft, bidir = statistics.median(times["soft"]), statistics.median(times["bidirectional"])
    print(f"device={device.type} backend={args.backend} seq={args.seq} batch={args.batch} "
          f"hidden={args.hidden} layers={args.layers} threads={torch.get_num_threads()}")
    print(f"bidirectional step {bidir * 1000:.1f} ms   soft step {soft * 1000:.1f} ms")
    print(f"soft / bidirectional = {soft / bidir:.3f}")


if __name__ == "__main__":
    main()
