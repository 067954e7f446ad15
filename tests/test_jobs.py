"""Jobs against a real Ray head: `ray job submit` (Ray 2.60's token auth) to the session's head from cluster/local.sh,
with the exports that script writes, exactly as the README shows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def _submit(head_env: dict, script: str, config: str, *overrides: str) -> subprocess.Popen:
    """Start `ray job submit --working-dir . --runtime-env-json "$CONAN_RUNTIME_ENV" -- python jobs/<script> …`."""
    command = ["ray", "job", "submit", "--working-dir", ".", "--runtime-env-json", head_env["CONAN_RUNTIME_ENV"], "--",
               "python", f"jobs/{script}", "--config", config,
               *[arg for override in overrides for arg in ("--set", override)]]
    env = {**os.environ, **head_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _succeeded(job: subprocess.Popen) -> None:
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]


def test_mining_job_submitted_with_ray_job_submit(head_env, embedding_model_dir, tmp_path):
    """The mining job joins the head through RAY_ADDRESS, finds the data through the runtime env, writes its pools."""
    out = tmp_path / "mined"
    _succeeded(_submit(head_env, "mine_negatives.py", "jobs/configs/supervised_tiny.yaml",
                       f"model.init_from={embedding_model_dir}", "supervised.max_per_task=20", f"output_dir={out}",
                       "dhnm.pool_size=10"))
    table = pq.read_table(out / "mined_negatives.parquet").to_pylist()
    # Of the 20 retrieval rows (12 languages) only the English ones carry XQuAD ids; CLR has weight 0 in the tiny
    # config, so its rows are not mined.
    assert 0 < len(table) < 20 and all(r["query_id"].startswith("en:") for r in table)
    assert all(len(r["candidate_ids"]) <= 10 and r["candidate_scores"] == sorted(r["candidate_scores"], reverse=True)
               for r in table)


def test_training_job_submitted_to_local_head_reports_metrics(head_env, embedding_model_dir, tokenizer_dir, tmp_path,
                                                              scrape_metrics):
    """A weak-stage job submitted to the head trains and exports; its gauges reach the head's Prometheus while it runs
    (they leave with the worker that set them, so the test scrapes during the run)."""
    out = tmp_path / "weak"
    job = _submit(head_env, "weak.py", "jobs/configs/weak_tiny.yaml", "name=submitted", f"output_dir={out}",
                  f"model.init_from={embedding_model_dir}", f"tokenizer.path={tokenizer_dir}", "data.max_rows=400",
                  "train.steps=20", "train.num_workers=1", "train.micro_batch_size=8", "train.log_every=2",
                  "train.checkpoint_every=20")
    seen: dict[str, list[str]] = {}
    while job.poll() is None:
        for name in ("loss", "alpha", "tokens_per_s"):
            seen.setdefault(name, []).extend(
                x for x in scrape_metrics(f"ray_conan_train_{name}") if 'job="submitted"' in x)
        time.sleep(0.5)
    _succeeded(job)
    assert (out / "model" / "config.json").is_file()
    assert all(seen.values()), {k: len(v) for k, v in seen.items()}
    assert all('stage="weak"' in x for x in seen["loss"]) and all(float(x.split()[-1]) > 0 for x in seen["loss"])
    alphas = [float(x.split()[-1]) for x in seen["alpha"]]
    assert all(0.0 <= a <= 1.0 for a in alphas) and len(set(alphas)) > 1  # α(t) moves along the schedule


def test_the_head_refuses_a_job_without_its_token(head_env):
    """The head cluster/local.sh starts runs Ray 2.60's token auth: `ray job submit` with a wrong token, or without
    token auth on the client, is refused before anything runs."""
    command = ["ray", "job", "submit", "--", "python", "-c", "print('ran')"]
    for change in ({"RAY_AUTH_TOKEN": "not-the-token"}, {"RAY_AUTH_MODE": None}):
        env = {**os.environ, **head_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for key, value in change.items():
            env.pop(key, None) if value is None else env.update({key: value})
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode != 0 and "succeeded" not in output and "ran" not in done.stdout.split(), (change, output)
