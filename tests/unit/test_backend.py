"""Device, collective backend and precision per cluster; what DeepSpeed builds on CPU."""

import pytest

import torch

from conan.train.backend import cpu_multiplies_bf16, resolve_backend, skip_unused_deepspeed_ops


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
