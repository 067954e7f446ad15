"""Device, collective backend and precision per cluster; what DeepSpeed builds on CPU."""

import contextlib
import functools

import pytest

import torch

from conan.train.backend import cpu_multiplies_bf16, resolve_backend, skip_unused_deepspeed_ops


@contextlib.contextmanager
def single_rank_engine(model: torch.nn.Module, ds_config: dict, port: int):
    """A real single-rank DeepSpeed engine on gloo; on exit its process group is destroyed and DeepSpeed's cached
    world group forgotten (a worker process has one group for life, a test process one per engine)."""
    import os

    import deepspeed
    import deepspeed.utils.groups
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                                       config=ds_config, dist_init_required=True)
        yield engine, optimizer
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        deepspeed.utils.groups._WORLD_GROUP = None


def test_backend_follows_the_cluster_resources():
    assert resolve_backend("auto", cluster_resources={"CPU": 2}) == resolve_backend("cpu")
    assert resolve_backend("auto", cluster_resources={"GPU": 8}).dist_backend == "nccl"
    npu = resolve_backend("auto", cluster_resources={"NPU": 8})
    assert (npu.dist_backend, npu.precision, npu.resources_per_worker(4)) == ("hccl", "bf16", {"CPU": 4, "NPU": 1})
    assert resolve_backend("cpu", "fp32").precision == "fp32"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_backend("tpu")


def test_cpu_training_builds_no_shared_memory_op():
    """Its build holds a file lock that a killed worker leaves behind, hanging every later run."""
    from deepspeed.comm.torch import build_shm_op

    skip_unused_deepspeed_ops(resolve_backend("cpu"))
    assert build_shm_op() is None


def test_cpu_precision_follows_the_cpus_bf16_instructions(monkeypatch):
    """bf16 where the CPU multiplies it natively (AVX512-BF16 or AMX), fp32 where it would be emulated."""
    assert resolve_backend("cpu").precision == ("bf16" if cpu_multiplies_bf16() else "fp32")
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_backend("cpu").precision == expected
    assert resolve_backend("cpu", "fp32").precision == "fp32"


def test_deepspeed_steps_with_torchs_fused_adamw_on_cuda():
    """CUDA's config asks for torch's fused AdamW (none to compile), CPU and NPU keep the default loop; DeepSpeed hands
    the flag to torch (a real single-rank engine on gloo, stepping CUDA's config on CPU, where torch fuses too) and its
    steps equal torch's own fused AdamW."""
    from conan.config import JobConfig
    from conan.train.backend import deepspeed_config, fused_adamw

    assert [fused_adamw(resolve_backend(d)) for d in ("cuda", "cpu", "npu")] == [{"fused": True}, {}, {}]
    cfg = JobConfig()
    cfg.train.micro_batch_size, cfg.optim.grad_clip = 4, 0.0
    ds_config = deepspeed_config(cfg, resolve_backend("cuda", "fp32"), 1)
    assert ds_config["optimizer"]["params"]["fused"] is True
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    reference.load_state_dict(model.state_dict())
    skip_unused_deepspeed_ops(resolve_backend("cpu"))
    with single_rank_engine(model, ds_config, 29517) as (engine, optimizer):
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["fused"] is True
        torch_adamw = torch.optim.AdamW(reference.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
        x = torch.randn(4, 8)
        for _ in range(3):
            engine.backward(engine(x).pow(2).mean())
            engine.step()
            reference(x).pow(2).mean().backward()
            torch_adamw.step()
            torch_adamw.zero_grad()
        assert torch.equal(engine.module.weight, reference.weight)

def test_a_single_bf16_rank_exports_its_fp32_master_weights():
    """One worker in bf16 (one GPU, or a CPU with bf16 instructions): master_weights gives the optimizer's fp32
    masters, of which the module holds bf16 roundings, not the rounded module itself (a real single-rank engine on
    gloo, bf16 emulated on this CPU)."""
    from conan.config import JobConfig
    from conan.model import ConanConfig, ConanForEmbedding
    from conan.train.backend import Backend, deepspeed_config, master_weights

    backend = Backend("cpu", "gloo", "bf16")
    torch.manual_seed(0)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300))
    skip_unused_deepspeed_ops(backend)
    with single_rank_engine(model, deepspeed_config(JobConfig(), backend, 1), 29518) as (engine, _):
        ids = torch.randint(3, 300, (4, 9))
        for _ in range(3):
            engine.backward(engine(ids)[:, 0].sum())
            engine.step()
        weights = master_weights(engine)
        for name, param in engine.module.named_parameters():
            assert param.dtype == torch.bfloat16 and weights[name].dtype == torch.float32
            assert torch.equal(weights[name].bfloat16(), param.detach()), name  # the module rounds the master
        up = weights["model.layers.0.mlp.up_proj.weight"]
        assert not torch.equal(up, up.bfloat16().float())  # fp32 bits the rounded module does not have


def test_bf16_micro_batch_gradients_are_summed_in_fp32():
    """With gradient accumulation a bf16 rank sums its micro-batches' gradients in fp32 and rounds the sum to bf16
    once, for the reduce across ranks (DeepSpeed's communication type), instead of at every micro-batch: seven
    gradients of 0.00025 added to 0.125 one by one in bf16 (a step of 0.001 there) all vanish, summed in fp32 they
    move it by two steps. The fp32 master then moves as torch's AdamW on that gradient moves it (a real single-rank
    ZeRO-1 engine on gloo, bf16 emulated here). One micro-batch a step keeps ZeRO-1's own optimizer."""
    from conan.config import JobConfig
    from conan.train.backend import Backend, deepspeed_config, master_weights

    backend = Backend("cpu", "gloo", "bf16")
    cfg = JobConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = 1, 8
    cfg.optim.grad_clip, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.eps = 0.0, 0.0, 1.0, 1.0  # update g / (|g| + 1)
    assert "data_types" not in deepspeed_config(JobConfig(), backend, 1)  # grad_accum 1
    ds_config = deepspeed_config(cfg, backend, 1)
    assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 2.0)
    inputs = [1.0] + [0.002] * 7  # d(w·x)/dw = x, scaled by 1 / grad_accum
    micro = [torch.tensor(x / 8, dtype=torch.bfloat16) for x in inputs]
    fp32_sum = float(torch.stack(micro).float().sum().bfloat16())
    bf16_sum = float(functools.reduce(lambda a, b: a + b, micro))
    assert (bf16_sum, fp32_sum) == (0.125, 0.126953125)
    skip_unused_deepspeed_ops(backend)
    with single_rank_engine(model, ds_config, 29519) as (engine, _):
        for x in inputs:
            engine.backward(engine(torch.tensor([[x]], dtype=torch.bfloat16)).sum())
            engine.step()
        master = float(master_weights(engine)["weight"])
    # AdamW's first step: m̂ / (√v̂ + eps) = g / (|g| + eps)
    assert master == pytest.approx(2.0 - fp32_sum / (fp32_sum + 1.0), abs=1e-6), (master, bf16_sum, fp32_sum)
