"""Model FLOPs utilisation of a preset's pretraining step, on whatever device this machine has.

First the device's matmul peak is measured: square matmuls of --peak-size in the precision the step trains in (bf16 on
CUDA / NPU; on CPU the backend's pick, bf16 where the CPU multiplies it natively, else fp32) and, on CPU, in fp32 too.
Then the preset trains through the platform's own path on random tokens: the model built from the preset (causal LM,
tied head), a single-rank DeepSpeed engine with `deepspeed_config` (torch's AdamW, fused on CUDA; bf16 with fp32 master
weights where the backend picks it; clipping) and the pretraining loss. Warm-up steps (and compilation) are excluded.

Model FLOPs per token follow PaLM (App. B) as torchtitan counts them: 6·N for the parameters' matmuls (N with the tied
embedding counted once, as the LM head) + 12·L·d·T for attention's scores and values at sequence length T (causal
attention counted in full, as PaLM does). MFU = FLOPs per token × tokens/s ÷ peak, against the measured peak and,
where this device's datasheet is known, its dense bf16 peak.

    python bench/mfu.py [--preset medium-40m] [--seq 512] [--batch 4] [--steps 5] [--precision auto|fp32|bf16]
                        [--activation-checkpointing] [--profile]
    python bench/mfu.py --preset conan-1.4b              # on an H100 / H200: seq 4096, bf16

Last line: `mfu device=… preset=… precision=… seq=… tokens_per_s=… flops_per_token=… peak_tflops=…
mfu_measured=… mfu_datasheet=… memory_gb=…`. Goals: ≥ 0.30 of the measured fp32 peak for a mid-size preset on CPU,
≥ 0.45 on one H100 for conan-1.4b.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time

import torch

from conan.config import JobConfig
from conan.model import PRESETS, ConanConfig, ConanForCausalLM
from conan.model.modeling import count_parameters
from conan.train.backend import deepspeed_config, resolve_backend, skip_unused_deepspeed_ops

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (SXM parts; no sparsity).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Best observed TFLOP/s of a size × size matmul: the device's practical peak in this dtype."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def flops_per_token(config: ConanConfig, seq: int) -> float:
    """Training FLOPs of one token: 6·N for the parameters' matmuls + 12·L·d·T for attention (PaLM App. B)."""
    return 6 * count_parameters(config) + 12 * config.num_hidden_layers * config.hidden_size * seq


def datasheet_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 datasheet peak, where this bench knows its name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_TFLOPS.items() if key in name), None)


def start_single_rank(dist_backend: str) -> None:
    """A one-process group for DeepSpeed, on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    deepspeed.init_distributed(dist_backend=dist_backend, auto_mpi_discovery=False)


def estimated_training_bytes(parameters: int, precision: str) -> int:
    """Weights, gradients and AdamW state of a single-rank step: 16 B a parameter in fp32 (weights, grads, two
    moments); bf16 adds its bf16 copies of weights and grads (20 B)."""
    return parameters * (16 + (4 if precision == "bf16" else 0))


def train_step(engine, ids: torch.Tensor, device: torch.device) -> None:
    """One pretraining step (forward, backward, optimizer) on ids as their own labels, waited for."""
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    synchronize(device)


def print_profile(engine, ids: torch.Tensor, device: torch.device) -> None:
    """One more training step under torch.profiler: where its time goes, by operator and input shapes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        train_step(engine, ids, device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25, max_name_column_width=40,
                                                             max_shapes_column_width=60))


def main() -> None:
    """Measure the peak, run the preset's pretraining steps, print MFU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium-40m", choices=sorted(PRESETS))
    parser.add_argument("--seq", type=int, default=None, help="default: 4096 on CUDA, 512 on CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, profile one more and print its top 25 operators by device time")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (8192 CUDA, 4096 CPU)")
    args = parser.parse_args()

    backend = resolve_backend("cuda" if torch.cuda.is_available() else "cpu", args.precision)
    device = torch.device("cuda", 0) if backend.device == "cuda" else torch.device("cpu")
    seq = args.seq or (4096 if device.type == "cuda" else 512)
    dtype = torch.bfloat16 if backend.precision == "bf16" else torch.float32
    config = ConanConfig.from_preset(args.preset, max_position_embeddings=max(seq, PRESETS[args.preset].get(
        "max_position_embeddings", seq)))
    parameters = count_parameters(config)
    need = estimated_training_bytes(parameters, backend.precision)
    if device.type == "cpu":
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > 0.8 * available:
            raise SystemExit(f"{args.preset}: {parameters / 1e9:.2f}B parameters need ~{need / 2**30:.0f} GiB for "
                             f"weights, gradients and AdamW state alone; this machine has {available / 2**30:.0f} GiB "
                             f"free. Run it on an accelerator.")

    peak_size = args.peak_size or (8192 if device.type == "cuda" else 4096)
    peak = matmul_peak_tflops(device, dtype, peak_size)
    fp32_peak = None
    if device.type == "cpu":
        fp32_peak = peak if dtype == torch.float32 else matmul_peak_tflops(device, torch.float32, peak_size)
    print(f"device {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads; matmul peak {peak:.3f} TFLOP/s {backend.precision}"
          + (f", {fp32_peak:.3f} fp32" if fp32_peak is not None else ""), flush=True)

    import deepspeed
    skip_unused_deepspeed_ops(backend)
    start_single_rank(backend.dist_backend)
    cfg = JobConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.steps = args.batch, 1, args.steps + 2
    torch.manual_seed(0)
    model = ConanForCausalLM(config)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model.to(device), model_parameters=list(model.parameters()),
                                      config=deepspeed_config(cfg, backend, 1), dist_init_required=False)
    ids = torch.randint(3, config.vocab_size, (args.batch, seq), device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.steps + 2):
        synchronize(device)
        start = time.perf_counter()
        train_step(engine, ids, device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    if args.profile:
        print_profile(engine, ids, device)
    memory_gb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    per_token = flops_per_token(config, seq)
    tokens_per_s = args.batch * seq / step
    achieved = per_token * tokens_per_s / 1e12
    datasheet = datasheet_peak_tflops(device)
    print(f"{args.preset}: {parameters / 1e6:.1f}M parameters, batch {args.batch} × seq {seq}, {backend.precision}, "
          f"step {step * 1000:.0f} ms (median of {len(times)}), {achieved:.3f} TFLOP/s achieved, "
          f"{'device' if device.type == 'cuda' else 'process peak'} memory {memory_gb:.2f} GB")
    if fp32_peak is not None:
        print(f"MFU against the measured fp32 peak: {achieved / fp32_peak:.3f}")
    mfu_datasheet = f"{achieved / datasheet:.3f}" if datasheet else "nan"
    print(f"mfu device={device.type} preset={args.preset} precision={backend.precision} seq={seq} "
          f"tokens_per_s={tokens_per_s:.0f} flops_per_token={per_token:.4g} peak_tflops={peak:.3f} "
          f"mfu_measured={achieved / peak:.3f} mfu_datasheet={mfu_datasheet} memory_gb={memory_gb:.2f}")


if __name__ == "__main__":
    main()
