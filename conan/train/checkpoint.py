"""Training checkpoints: what every rank saves and restores, and a manifest that tells a whole checkpoint from a torn one.

Each rank writes its part (the DeepSpeed engine and its ZeRO optimizer shard, RNG, data position, the stage's extra
state) and then `manifest_rank<r>.json`: the step, the world size and every file's size and sha256. A checkpoint is
complete when every rank's manifest is there and every file matches it. A resume takes the newest complete
checkpoint of the run: one torn by a kill during the save, or a file truncated on storage, is skipped with a message
naming the file, and the run continues from the one before (or from step 0 when none is complete).
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from conan.data.stream import DataPosition, DataPositionError

ENGINE_TAG = "state"
MANIFEST = "manifest_rank{rank}.json"


def save_state(state, path: str | Path) -> None:
    """torch.save of `state` with its numpy arrays (the DHNM pool's, GBs at 10M queries; numpy's RNG key) as tensors
    sharing their buffers, so that `load_state` reads it back with weights_only=True: no pickled code runs."""
    torch.save(_as_tensors(state), path)


def load_state(path: str | Path):
    """What save_state wrote (weights_only=True), its arrays numpy arrays again."""
    return _as_arrays(torch.load(path, weights_only=True))


NUMPY = "__numpy__"  # marks a tensor that was a numpy array


def _as_tensors(x):
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # arrays returned by a Ray actor are read-only views; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            return {NUMPY: torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, dict):
        return {k: _as_tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_as_tensors(v) for v in x)
    return x


def _as_arrays(x):
    if isinstance(x, dict):
        return x[NUMPY].numpy() if set(x) == {NUMPY} else {k: _as_arrays(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_as_arrays(v) for v in x)
    return x


def save_checkpoint(engine, stage, step: int, rank: int, directory: str, position: DataPosition) -> None:
    """This rank's part of a checkpoint in `directory`, its manifest written last."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG, client_state={"step": step})
    save_state({"rng": _rng_state(), "stage": stage.state_dict(), "data": asdict(position)},
               Path(directory) / f"worker_rank{rank}.pt")
    write_manifest(directory, rank, step, position)


def write_manifest(directory: str | Path, rank: int, step: int, position: DataPosition) -> None:
    """Record the size and sha256 of every file in `directory` (a fresh directory per save: all of them this rank's)
    as rank `rank`'s manifest, with the run's data position."""
    root = Path(directory)
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    manifest = {"step": step, "world_size": position.world_size, "data": asdict(position),
                "files": {name: _describe(root / name) for name in written}}
    (root / MANIFEST.format(rank=rank)).write_text(json.dumps(manifest, indent=1))


def check_resumable(run_dir: str | Path, position: DataPosition, steps: int) -> None:
    """Raise DataPositionError when the run in `run_dir` (Ray Train's storage for it) cannot be continued by this one:
    its newest checkpoint written under another data position (every checkpoint of a run has the same), or its newest
    whole checkpoint past `steps`. On the driver, so that such a resume fails in one line before any worker starts,
    rather than in every worker at each restart."""
    paths = sorted(Path(run_dir).glob(f"checkpoint_*/{MANIFEST.format(rank=0)}"), reverse=True)
    manifests = [(path.parent, json.loads(path.read_text())) for path in paths]
    # Written before manifests held the position, a checkpoint has no "data": the workers check it.
    saved = next((m["data"] for _, m in manifests if m.get("data") is not None), None)
    if saved is not None:
        position.check_resume(saved)
    for directory, manifest in manifests:  # a torn checkpoint is skipped by the resume: look at the one before
        if manifest["step"] <= steps:
            return
        if checkpoint_problem(directory) is None:
            raise past_steps(run_dir, manifest["step"], steps)


def past_steps(run_dir: str | Path, step: int, steps: int) -> DataPositionError:
    """The error of a run resumed at `step` with fewer train.steps: its loop would run no step and export that run's
    model as one of `steps`."""
    return DataPositionError(f"{run_dir} holds this stage's run at step {step}, past train.steps = {steps}: continue "
                             f"it with train.steps >= {step}, or start a new run (another output_dir)")


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why the checkpoint in `directory` is not whole (a rank's manifest or a file missing, a size or checksum
    differing), or None when it is."""
    directory = Path(directory)
    first = directory / MANIFEST.format(rank=0)
    if not first.is_file():
        return f"{first.name} is missing (the save did not finish)"
    world = json.loads(first.read_text())["world_size"]
    for rank in range(world):
        path = directory / MANIFEST.format(rank=rank)
        if not path.is_file():
            return f"{path.name} is missing (the save did not finish)"
        for name, expected in json.loads(path.read_text())["files"].items():
            file = directory / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, its manifest says {expected['bytes']}"
            if _sha256(file) != expected["sha256"]:
                return f"{name} does not match its manifest's sha256"
    return None


def restore(engine, stage, rank: int, position: DataPosition, latest, log) -> int:
    """Load the newest complete checkpoint at or before `latest` (a ray.train.Checkpoint, or None) into the engine,
    the stage and the RNG; returns the step to continue from (0 when none is complete, the stage then starting over).
    Rank 0 checks the candidates and every rank loads the one it chose."""
    chosen = [None]
    if rank == 0 and latest is not None:
        for checkpoint in checkpoint_candidates(latest):
            with checkpoint.as_directory() as directory:
                problem = checkpoint_problem(directory)
            if problem is None:
                chosen[0] = checkpoint.path
                break
            log(f"checkpoint {Path(checkpoint.path).name} is not whole: {problem}; trying the one before")
        if chosen[0] is None:
            log("no complete checkpoint: starting from step 0")
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        stage.start_over()  # e.g. the DHNM pool, which a failed attempt before any checkpoint may have changed
        return 0
    import ray.train
    with ray.train.Checkpoint(chosen[0], filesystem=latest.filesystem).as_directory() as directory:
        return _load(engine, stage, rank, directory, position)


def _load(engine, stage, rank: int, directory: str, position: DataPosition) -> int:
    """Restore what save_checkpoint wrote (after checking this run reads the same rows); returns the step."""
    saved_world = json.loads((Path(directory) / MANIFEST.format(rank=0)).read_text())["world_size"]
    # Another world size is refused by check_resume; read a file that exists so that it can say so.
    extra = load_state(Path(directory) / f"worker_rank{min(rank, saved_world - 1)}.pt")
    position.check_resume(extra["data"])
    _, client_state = engine.load_checkpoint(directory, tag=ENGINE_TAG)
    _set_rng_state(extra["rng"])
    stage.load_state_dict(extra["stage"])
    return int(client_state["step"])


def checkpoint_candidates(latest):
    """`latest`, then the run's older checkpoints beside it, newest first (their names are timestamps)."""
    import pyarrow.fs
    import ray.train

    path = latest.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    found = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((i.path for i in found if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [latest] + [ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in older]


def _describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
