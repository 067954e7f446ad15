"""Device, collective backend and precision per cluster; what DeepSpeed builds on CPU."""

import pytest

from conan.train.backend import resolve_backend, skip_unused_deepspeed_ops


def test_backend_follows_the_cluster_resources():
    assert resolve_backend("auto", cluster_resources={"CPU": 2}) == resolve_backend("cpu")
    assert resolve_backend("auto", cluster_resources={"GPU": 8}).dist_backend == "nccl"
    npu = resolve_backend("auto", cluster_resources={"NPU": 8})
    assert (npu.dist_backend, npu.precision, npu.resources_per_worker(4)) == ("hccl", "bf16", {"CPU": 4, "NPU": 1})
    assert resolve_backend("cpu").precision == "fp32"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_backend("tpu")


def test_cpu_training_builds_no_shared_memory_op():
    """Its build holds a file lock that a killed worker leaves behind, hanging every later run."""
    from deepspeed.comm.torch import build_shm_op

    skip_unused_deepspeed_ops(resolve_backend("cpu"))
    assert build_shm_op() is None
