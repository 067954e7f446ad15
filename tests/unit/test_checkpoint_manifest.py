"""A checkpoint's manifest tells a whole checkpoint from a torn one, and a resume walks back to the newest whole one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray.train

from conan.config import ConfigError
from conan.data.stream import DataPosition
from conan.train.checkpoint import (MANIFEST, check_resumable, checkpoint_candidates, checkpoint_problem,
                                    write_manifest)

POSITION = DataPosition(0, 2, ("abc",), {"train.grad_accum": 1, "supervised.batch_sizes": {"retrieval": 16}})


def two_rank_checkpoint(root: Path, step: int = 10, position: DataPosition = POSITION) -> Path:
    """What two ranks upload into one checkpoint directory: each its own files and manifest."""
    for rank in range(2):
        part = root / f"rank{rank}"
        (part / "state").mkdir(parents=True)
        (part / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes(range(256)) * (rank + 3))
        (part / f"worker_rank{rank}.pt").write_bytes(b"rng and data position %d" % rank)
        write_manifest(part, rank, step, position)
        shutil.copytree(part, root / "checkpoint", dirs_exist_ok=True)
    return root / "checkpoint"


def test_a_whole_checkpoint_passes(tmp_path):
    assert checkpoint_problem(two_rank_checkpoint(tmp_path)) is None


def test_a_truncated_file_is_found(tmp_path):
    directory = two_rank_checkpoint(tmp_path)
    shard = directory / "state" / "zero_pp_rank_1_optim_states.pt"
    with shard.open("r+b") as f:
        f.truncate(100)
    assert checkpoint_problem(directory) == ("state/zero_pp_rank_1_optim_states.pt has 100 bytes, its manifest "
                                             "says 1024")


def test_a_changed_byte_of_the_same_size_is_found(tmp_path):
    directory = two_rank_checkpoint(tmp_path)
    path = directory / "worker_rank0.pt"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert checkpoint_problem(directory) == "worker_rank0.pt does not match its manifest's sha256"


@pytest.mark.parametrize("removed, reason", [
    (MANIFEST.format(rank=1), "manifest_rank1.json is missing (the save did not finish)"),
    (MANIFEST.format(rank=0), "manifest_rank0.json is missing (the save did not finish)"),
    ("worker_rank1.pt", "worker_rank1.pt is missing"),
])
def test_a_missing_part_is_found(tmp_path, removed, reason):
    directory = two_rank_checkpoint(tmp_path)
    (directory / removed).unlink()
    assert checkpoint_problem(directory) == reason


def test_a_resume_under_other_settings_is_refused_on_the_driver(tmp_path):
    """The newest checkpoint's manifest holds the run's data position: the launcher checks it before any worker
    starts, and the error is one the CLI prints as one line."""
    run = tmp_path / "run"
    check_resumable(run, POSITION, 10)  # no run yet
    older = two_rank_checkpoint(tmp_path / "a", position=DataPosition(0, 2, ("abc",)))
    older.rename(run.mkdir() or run / "checkpoint_2026-11-25_10-00-01.000001")
    check_resumable(run, DataPosition(0, 2, ("abc",), {"train.grad_accum": 4}), 10)  # that one recorded no setting
    two_rank_checkpoint(tmp_path / "b").rename(run / "checkpoint_2026-11-25_10-00-02.000002")
    check_resumable(run, POSITION, 10)
    with pytest.raises(ConfigError, match=r"written with train.grad_accum=1; this run has train.grad_accum=4"):
        check_resumable(run, DataPosition(0, 2, ("abc",), {**POSITION.ordering, "train.grad_accum": 4}), 10)
    with pytest.raises(ConfigError, match="train.num_workers=2"):
        check_resumable(run, DataPosition(0, 4, ("abc",), POSITION.ordering), 10)
    with pytest.raises(ConfigError, match="other data"):
        check_resumable(run, DataPosition(0, 2, ("abd",), POSITION.ordering), 10)
    # Fewer train.steps than the newest whole checkpoint: its loop would run no step and export the longer run's model.
    with pytest.raises(ConfigError, match=r"at step 10, past train.steps = 8: continue it with train.steps >= 10"):
        check_resumable(run, POSITION, 8)
    # Unless that checkpoint is torn: the resume takes the one before, at step 5.
    shutil.rmtree(run / "checkpoint_2026-11-25_10-00-01.000001")
    two_rank_checkpoint(tmp_path / "c", step=5).rename(run / "checkpoint_2026-11-25_10-00-01.000001")
    with (run / "checkpoint_2026-11-25_10-00-02.000002" / "worker_rank1.pt").open("r+b") as f:
        f.truncate(3)
    check_resumable(run, POSITION, 8)


def test_candidates_are_the_latest_then_older_ones_newest_first(tmp_path):
    run = tmp_path / "run"
    names = ["checkpoint_2026-11-25_10-00-01.000001", "checkpoint_2026-11-25_10-00-02.000002",
             "checkpoint_2026-11-25_10-00-03.000003", "checkpoint_2026-11-25_10-00-04.000004"]
    for name in names:
        (run / name).mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    latest = ray.train.Checkpoint(str(run / names[2]))  # the newest one was never registered (its save died)
    assert [Path(c.path).name for c in checkpoint_candidates(latest)] == [names[2], names[1], names[0]]


def test_stage_state_round_trips_without_unpickling_code(tmp_path):
    """save_state / load_state: the RNG states and a DHNM pool's arrays (read-only, as an actor returns them) come back
    equal, read with weights_only=True; a file that would run pickled code on load is refused."""
    import pickle
    import random

    import numpy as np
    import torch

    from conan.train.checkpoint import _rng_state, load_state, save_state

    candidates = np.arange(12, dtype=np.int32).reshape(3, 4)
    candidates.flags.writeable = False
    state = {"rng": _rng_state(), "stage": {"dhnm": [{"candidates": candidates, "s0": np.full((3, 2), np.nan, np.float32),
                                                      "counters": {"reports": 3}, "tally": (2, 1_500_000)}]},
             "data": {"seed": 0, "world_size": 2, "fingerprints": ["ab"]}}
    save_state(state, tmp_path / "state.pt")
    back = load_state(tmp_path / "state.pt")
    pool = back["stage"]["dhnm"][0]
    assert isinstance(pool["candidates"], np.ndarray) and np.array_equal(pool["candidates"], candidates)
    assert np.isnan(pool["s0"]).all() and pool["counters"] == {"reports": 3} and pool["tally"] == (2, 1_500_000)
    assert back["data"] == state["data"] and back["rng"]["python"] == random.getstate()
    assert np.array_equal(back["rng"]["numpy"][1], np.random.get_state()[1])
    assert torch.equal(back["rng"]["torch"], torch.get_rng_state())

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    torch.save({"stage": Payload()}, tmp_path / "hostile.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path / "hostile.pt")
