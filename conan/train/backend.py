"""The one place that picks device, collective backend and precision, and builds the DeepSpeed config.

cuda → nccl, bf16 · npu → hccl, bf16 (`torch_npu` imported lazily; Ray's `prepare_model` fails on
NPU, so the worker places the model itself) · cpu → gloo, bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or
AMX: a tiny pretraining step runs 1.3× faster than in fp32 on an EPYC Zen 4), else fp32. In bf16 the optimizer keeps
fp32 master weights, and those are what a stage exports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conan.config import JobConfig


@dataclass(frozen=True)
class Backend:
    """Where and how the workers train."""

    device: str  # cuda | npu | cpu
    dist_backend: str  # nccl | hccl | gloo
    precision: str  # bf16 | fp32

    @property
    def use_gpu(self) -> bool:
        """Whether Ray should hand each worker a GPU."""
        return self.device == "cuda"

    def resources_per_worker(self, cpus: float) -> dict[str, float]:
        """Ray resources of one training worker."""
        return {"CPU": cpus, "NPU": 1} if self.device == "npu" else {"CPU": cpus}


DIST_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def resolve_backend(device: str = "auto", precision: str = "auto",
                    cluster_resources: dict | None = None) -> Backend:
    """Pick the device from the config, or with 'auto' from what the Ray cluster offers."""
    if device == "auto":
        resources = cluster_resources or {}
        device = "cuda" if resources.get("GPU", 0) > 0 else "npu" if resources.get("NPU", 0) > 0 else "cpu"
    if device not in DIST_BACKENDS:
        raise ValueError(f"unknown device {device!r}; expected auto, cuda, npu or cpu")
    if precision == "auto":
        precision = "bf16" if device != "cpu" or cpu_multiplies_bf16() else "fp32"
    return Backend(device, DIST_BACKENDS[device], precision)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX); without them bf16 is emulated and slower
    than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def master_weights(engine) -> dict[str, torch.Tensor] | None:
    """Every parameter's fp32 master copy when the engine trains in bf16 (its module holds rounded copies), gathered
    from the ZeRO partitions: a collective, every rank calls it. None when the module itself is fp32."""
    from deepspeed.utils import safe_get_full_fp32_param

    if next(engine.module.parameters()).dtype == torch.float32:
        return None
    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        weights[name] = (full if full is not None else param).detach().float().cpu()
    return weights


def skip_unused_deepspeed_ops(backend: Backend) -> None:
    """Keep DeepSpeed from building ops training does not use on this backend (call before deepspeed.initialize)."""
    if backend.device == "cpu":
        # Its CPU shared-memory op serves only inference all-reduce; building it takes ~70 s under a file lock that a
        # worker killed mid-build leaves behind, and every later run on the machine then waits on it forever.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def import_torch_npu() -> None:
    """Register the NPU device and HCCL with torch (a Ray `worker_process_setup_hook` on NPU clusters)."""
    import torch_npu  # noqa: F401


def worker_device(backend: Backend) -> torch.device:
    """The torch device of this training worker."""
    if backend.device == "cuda":
        from ray.train.torch import get_device
        return get_device()
    if backend.device == "npu":
        import_torch_npu()
        import ray.train
        device = torch.device("npu", ray.train.get_context().get_local_rank())
        torch.npu.set_device(device)
        return device
    return torch.device("cpu")


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """lr ÷ peak lr at optimizer step `step` (0-based): linear warmup over `warmup` steps, the first already at
    1/warmup (DeepSpeed's WarmupCosineLR runs its first two steps at lr 0), then cosine decay to min_ratio at the
    last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(cfg: JobConfig):
    """A callable DeepSpeed calls with its optimizer: LambdaLR over lr_multiplier, stepped once per optimizer step
    (and saved in DeepSpeed's checkpoints)."""
    total = max(cfg.train.steps, 1)
    warmup = max(1, int(cfg.optim.warmup_ratio * total))

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total, warmup, cfg.optim.min_lr_ratio))
    return build


def fused_adamw(backend: Backend) -> dict:
    """torch.optim.AdamW's `fused` flag on CUDA: one kernel for every parameter instead of a loop of small ones.
    CPU keeps the default loop although torch fuses there too (11x faster on 33M fp32 parameters on 2 cores): its
    other rounding moved the demo's supervised-over-weak margins, which are ~0.01, across zero (issue 13's bars). NPUs
    keep the loop (whether torch_npu has the kernel is not checked here)."""
    return {"fused": True} if backend.device == "cuda" else {}


def deepspeed_config(cfg: JobConfig, backend: Backend, world_size: int) -> dict:
    """DeepSpeed ZeRO config: AdamW (torch's, fused on CUDA: nothing for DeepSpeed to compile), clipping; the
    schedule is lr_scheduler's."""
    # ZeRO partitions optimizer state across ranks; a single fp32 rank has nothing to partition and ZeRO-1's extra
    # copies cost ~8% of a tiny model's step, so it runs stage 0. A bf16 rank keeps ZeRO: at stage 0 DeepSpeed wraps
    # the optimizer in FP16_UnfusedOptimizer, whose fp32 masters master_weights cannot read, and the export would be
    # the bf16-rounded module.
    stage = cfg.train.zero_stage if world_size > 1 or backend.precision == "bf16" else 0
    # Micro-batches' bf16 gradients summed in bf16 (8 bits of mantissa) lose the small ones: at ZeRO-1 DeepSpeed then
    # sums them in fp32 (its BF16_Optimizer). One micro-batch a step has nothing to sum and keeps ZeRO-1's optimizer.
    fp32_sums = backend.precision == "bf16" and cfg.train.grad_accum > 1 and stage == 1
    return {
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": backend.precision == "bf16"},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if fp32_sums else {}),
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": True, **fused_adamw(backend)}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
