"""Jobs against a real Ray head: `ray job submit` (Ray 2.60's token auth) to the session cluster's dashboard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def test_mining_job_submitted_with_ray_job_submit(ray_cluster, embedding_model_dir, data_root, tmp_path):
    """The README's command shape: --working-dir . and the job script; the job joins the cluster through RAY_ADDRESS."""
    out = tmp_path / "mined"
    command = ["ray", "job", "submit", "--address", f"http://{ray_cluster.dashboard_url}", "--working-dir", ".", "--",
               # The head runs this venv's interpreter; on a cluster image plain `python` is that interpreter.
               sys.executable, "jobs/mine_negatives.py", "--config", "jobs/configs/supervised_tiny.yaml",
               "--set", f"model.init_from={embedding_model_dir}", "--set", f"data.root={data_root}",
               "--set", "supervised.max_per_task=20", "--set", f"output_dir={out}", "--set", "dhnm.pool_size=10"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "succeeded" in result.stderr + result.stdout, result.stderr[-3000:]
    table = pq.read_table(out / "mined_negatives.parquet").to_pylist()
    assert len(table) == 20 + 20  # 20 English retrieval + 20 cross-lingual queries with XQuAD ids
    assert all(len(r["candidate_ids"]) <= 10 and r["candidate_scores"] == sorted(r["candidate_scores"], reverse=True)
               for r in table)
