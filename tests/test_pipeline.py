"""The README's main job end to end on a reduced config, on the session's head: every step in order, a model that
sentence-transformers loads and that beats the randomly initialised tiny model on XQuAD cross-lingual retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conan.cli import main

STEPS = ["corpus", "tokenizer", "model", "pretrain", "sft", "curate", "weak", "clr", "mine", "supervised", "evaluate"]


def test_pipeline_end_to_end_beats_random_init_on_xquad_clr(ray_cluster, data_root, tmp_path, capsys, monkeypatch):
    """No data_root: like the main job, it reads the datasets bundled in the package."""
    from sentence_transformers import SentenceTransformer

    from conan.eval.runner import score_subset
    from conan.eval.tasks import xquad_clr

    monkeypatch.delenv("CONAN_DATA_ROOT", raising=False)
    (tmp_path / "eval.yaml").write_text("tasks: [xquad-clr, xquad-retrieval]\nmax_items: 100\nbm25: false\n")
    run = tmp_path / "run"
    args = ["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", f"output_dir={run}",
            "--set", "corpus_max_per_source=3000", "--set", "tokenizer.vocab_size=2048",
            "--set", "stage_overrides=[data.max_rows=2000, supervised.max_per_task=300]",
            "--set", f"evaluation={tmp_path / 'eval.yaml'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    ran = [line.removeprefix("[pipeline] ").split(":")[0] for line in out.splitlines() if line.endswith(": running")]
    assert ran == STEPS
    model_dir = run / "supervised" / "model"
    assert f"model:  {model_dir}" in out and f"report: {run / 'eval' / 'report.md'}" in out
    assert all(f.is_file() for f in (run / "eval").glob("*.png")) and "mrl_dims.png" in out

    # The export loads in sentence-transformers; scored through it, it matches the report and beats the random init.
    model = SentenceTransformer(str(model_dir), device="cpu")
    subsets = xquad_clr(data_root, 100, None)
    ndcg = np.mean([score_subset(data, lambda texts, dim: model.encode(texts, normalize_embeddings=True),
                                 model.get_sentence_embedding_dimension())["ndcg@10"] for data in subsets.values()])
    scores = json.loads((run / "eval" / "scores.json").read_text())["scores"]
    init = np.mean([s["128"]["ndcg@10"] for s in scores["model_init"]["xquad-clr"].values()])
    assert ndcg == pytest.approx(np.mean([s["128"]["ndcg@10"] for s in scores["supervised"]["xquad-clr"].values()]),
                                 abs=0.005)
    assert ndcg > 1.5 * init and ndcg - init > 0.03, (ndcg, init)  # measured 0.111 vs 0.032

    # Resumable: a second run finds every step's output and skips it.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert ": running" not in again and again.count("exists, skipped") == len(STEPS)
