"""The README's main job end to end, on the session's head: every step in order, a model that sentence-transformers
loads, and stages that measurably learn on held-out data (XQuAD articles no stage saw, STS-B test, Banking77 test).

What it asserts on 2 cores with the tiny preset (README, Training quality): the weak
and the supervised model beat the random init on held-out XQuAD retrieval, the supervised stage beats the weak model
on Banking77, and its retrieval InfoNCE ends near 0.5-0.65 · log N. The XQuAD margins are thin and depend on the
weak stage's row order: from the same SFT model and the same 15,095 curated rows, the two orders curation wrote
before its output was put in input order (its part names hashed each batch's rows, and batches were cut differently
on the tests' head than in a standalone run) scored weak / supervised .4174 / .4061 and .3820 / .3813 against init
.3832. Tokenizer, init, pretraining, SFT, curation (now) and the weak stage reproduce bit for bit; earlier runs:
weak .388-.445, supervised .3748-.436; in input order .4362 / .4246. Not met (issue 13's goal, reported, not
asserted): the final model beating its random init on every task (Tatoeba, cross-lingual STS-B) and the classification
InfoNCE below 0.6 · log N (it ends near 0.78-0.85)."""

from __future__ import annotations

import json
import numpy as np
import pytest
import yaml

from conan.cli import main

STEPS = ["corpus", "tokenizer", "model", "pretrain", "sft", "curate", "weak", "clr", "mine", "supervised", "evaluate"]
HELD_OUT = ["xquad-retrieval", "stsb", "banking77"]
FULL_DIM = "128"
MAIN_METRIC = {"xquad-retrieval": "ndcg@10", "stsb": "spearman", "banking77": "accuracy"}


def task_score(scores: dict, model: str, task: str, dim: str) -> float:
    """The task's main metric for one model, averaged over its languages."""
    return float(np.mean([s[dim][MAIN_METRIC[task]] for s in scores[model][task].values()]))


def test_pipeline_end_to_end_learns_on_held_out_tasks(ray_cluster, data_root, tmp_path, capsys,
                                                                  monkeypatch):
    """The demo's own stage configs; only the evaluation is smaller. No data_root: like the main job, it reads the
    datasets bundled in the package."""
    from sentence_transformers import SentenceTransformer

    from conan.eval.runner import score_subset
    from conan.eval.tasks import xquad_retrieval

    monkeypatch.delenv("CONAN_DATA_ROOT", raising=False)
    (tmp_path / "eval.yaml").write_text(f"tasks: [{', '.join(HELD_OUT)}]\nlangs: [en, de, zh, ar, ru]\n"
                                        "max_items: 500\nbm25: false\n")
    run = tmp_path / "run"
    args = ["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", f"output_dir={run}",
            "--set", f"evaluation={tmp_path / 'eval.yaml'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    ran = [line.removeprefix("[pipeline] ").split(":")[0] for line in out.splitlines() if line.endswith(": running")]
    assert ran == STEPS
    model_dir = run / "supervised" / "model"
    assert f"model:  {model_dir}" in out and f"report: {run / 'eval' / 'report.md'}" in out
    assert all(f.is_file() for f in (run / "eval").glob("*.png")) and "mrl_dims.png" in out
    # The demo data source wrote the SFT and supervised inputs (and DHNM's passages) inside the run, as any input.
    assert (run / "sft" / "demo" / "records.parquet").is_file()
    assert (run / "supervised" / "demo" / "passages.parquet").is_file()

    # Better than where each stage started, on data no stage trained on.
    scores = json.loads((run / "eval" / "scores.json").read_text())["scores"]
    # The export's model card carries the dev results the pipeline just measured.
    front = yaml.safe_load((model_dir / "README.md").read_text().split("---\n", 2)[1])
    card = {(r["dataset"]["name"], r["dataset"]["config"]): r["metrics"][0]["value"]
            for r in front["model-index"][0]["results"]}
    assert card["xquad-retrieval", "en"] == round(scores["supervised"]["xquad-retrieval"]["en"]["128"]["ndcg@10"], 4)
    score = {(model, task): task_score(scores, model, task, FULL_DIM) for model in ("model_init", "weak", "supervised")
             for task in HELD_OUT}
    assert score["weak", "xquad-retrieval"] > score["model_init", "xquad-retrieval"], score  # bf16 demo, test eval: .417 vs .365
    assert score["supervised", "xquad-retrieval"] > score["model_init", "xquad-retrieval"], score  # .406 vs .365
    assert score["supervised", "stsb"] > score["model_init", "stsb"], score  # bf16 demo: .598 vs .560
    assert score["supervised", "banking77"] > score["model_init", "banking77"], score  # .410 vs .286
    assert score["supervised", "banking77"] > score["weak", "banking77"], score  # .410 vs .258

    # Far from chance (1.0): retrieval InfoNCE below 0.7 · log N at every Matryoshka dim, and no InfoNCE task left at
    # chance (classification, the hardest, ends at 0.75-0.85). One report is 25 steps of small batches: within one run
    # its 32-dim retrieval ratio moves between 0.57 and 0.73, and a fresh clone's last report ended at 0.653, so the
    # mean of each key's last three reports is asserted (0.63 there; 128 dims 0.47-0.58). Issue 13's 0.6 is not met
    # at 32 dims in every run.
    reports = [json.loads(line) for line in (run / "supervised" / "metrics.jsonl").read_text().splitlines()]
    ratios = {}
    for key in {key for report in reports for key in report if "_infonce_loss_d" in key}:
        last = [report for report in reports if key in report][-3:]
        ratios[key] = sum(r[key] / r[key.split("infonce_loss")[0] + "log_candidates"] for r in last) / len(last)
    assert {key.rsplit("_d", 1)[1] for key in ratios} == {"32", "64", "128"}
    assert all(ratio < 0.7 for key, ratio in ratios.items() if key.startswith("retrieval")), ratios
    assert all(ratio < 0.95 for ratio in ratios.values()), ratios

    # The export loads in sentence-transformers; scored through it, it matches the report.
    model = SentenceTransformer(str(model_dir), device="cpu")
    subset = xquad_retrieval(data_root, 500, ["en"])["en"]
    ndcg = score_subset(subset, lambda texts, dim: model.encode(texts, normalize_embeddings=True),
                        model.get_embedding_dimension())["ndcg@10"]
    assert ndcg == pytest.approx(scores["supervised"]["xquad-retrieval"]["en"]["128"]["ndcg@10"], abs=0.005)

    # Resumable: a second run finds every step's output and skips it.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert ": running" not in again and again.count("exists, skipped") == len(STEPS)
