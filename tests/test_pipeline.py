"""The README's main job end to end, on the session's head: every step in order, a model that sentence-transformers
loads, and stages that measurably learn on held-out data (XQuAD articles no stage saw, STS-B test, Banking77 test).

What it asserts on 2 cores with the tiny preset (issue 13; README, Training quality): pretraining ends more than a nat
below its corpus's unigram entropy; the weak model beats the random init on held-out XQuAD; the supervised model beats
the random init (beyond the paired-bootstrap noise of the held-out items) and the weak model on the three supervised
tasks (XQuAD retrieval, STS-B, Banking77), and the random init on cross-lingual STS-B (English × German, Chinese,
Russian), beyond the noise too; every contrastive loss of the supervised stage ends below 0.6 · log N at
every Matryoshka dimension and random pairs of passages end below cosine 0.6 in both embedding stages. This test
measured (5 languages here, 500 items; see README) margins of about +0.08 over the init on XQuAD, +0.10 on STS-B,
+0.31 on Banking77 and +0.28 on cross-lingual STS-B, and over the weak model about +0.02 on XQuAD, +0.03 on STS-B and
+0.35 on Banking77; loss ratios 0.44-0.50 (retrieval) and 0.56-0.57 (classification). Not asserted, because at this
scale it is noise (README): Tatoeba against the random init."""

from __future__ import annotations

import json
import numpy as np
import pytest
import yaml

from conan.cli import main

STEPS = ["corpus", "tokenizer", "model", "pretrain", "sft", "curate", "weak", "clr", "mine", "supervised", "evaluate"]
HELD_OUT = ["xquad-retrieval", "stsb", "banking77"]
CROSS_LINGUAL = "stsb-cross"  # learned in the weak stage (cross-lingual paraphrases), not in the supervised one
FULL_DIM = "128"
MAIN_METRIC = {"xquad-retrieval": "ndcg@10", "stsb": "spearman", "banking77": "accuracy", "stsb-cross": "spearman"}


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
    tasks = ", ".join([*HELD_OUT, CROSS_LINGUAL])
    (tmp_path / "eval.yaml").write_text(f"tasks: [{tasks}]\nlangs: [en, de, zh, ar, ru]\nmax_items: 500\nbm25: false\n")
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
    assert [p.parent.name.split("-")[0] for p in (run / "sft" / "demo").glob("*/records.parquet")] == ["instructions"]
    assert [p.parent.name.split("-")[0] for p in (run / "supervised" / "demo").glob("*/passages.parquet")] == ["tasks"]
    # A quiet console: the platform's lines and one progress line per training report, with its ETA; Ray's, Ray
    # Data's and the workers' own output in the run's log.
    assert any(line.startswith("[weak] step 1000/1000 loss") and "ETA 0m00s" in line for line in out.splitlines())
    assert not any(internal in out for internal in ("RayTrainWorker", "core_worker", "streaming_executor")), out
    assert "RayTrainWorker" in (run / "logs" / "pipeline.log").read_text()

    # Better than where each stage started, on data no stage trained on.
    evaluation = json.loads((run / "eval" / "scores.json").read_text())
    scores = evaluation["scores"]
    # The export's model card carries the dev results the pipeline just measured.
    front = yaml.safe_load((model_dir / "README.md").read_text().split("---\n", 2)[1])
    card = {(r["dataset"]["name"], r["dataset"]["config"]): r["metrics"][0]["value"]
            for r in front["model-index"][0]["results"]}
    assert card["xquad-retrieval", "en"] == round(scores["supervised"]["xquad-retrieval"]["en"]["128"]["ndcg@10"], 4)
    score = {(model, task): task_score(scores, model, task, FULL_DIM) for model in ("model_init", "weak", "supervised")
             for task in [*HELD_OUT, CROSS_LINGUAL]}
    assert score["weak", "xquad-retrieval"] > score["model_init", "xquad-retrieval"], score
    for task in HELD_OUT:
        assert score["supervised", task] > max(score["model_init", task], score["weak", task]), (task, score)
    # Beyond the noise of the held-out items against the init (paired bootstrap); against the weak model only the sign
    # is asserted above (the XQuAD and STS-B gains were within that noise in earlier recipes; README, Training quality).
    assert all(evaluation["differences"]["model_init"][task]["low"] > 0 for task in [*HELD_OUT, CROSS_LINGUAL]), \
        evaluation["differences"]

    # Learned rather than collapsed: pretraining well below the unigram entropy; every InfoNCE task well below chance
    # (1.0 · log N) at every Matryoshka dim; random pairs of passages spread. One report is 25 steps of small batches
    # (within one run a 32-dim retrieval ratio moved by ±0.08 from report to report), so each key's last three reports
    # are averaged.
    pretrain = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()][-1]
    assert pretrain["loss"] < pretrain["unigram_entropy"] - 1.0, pretrain
    ratios, cosines = {}, {}
    for stage in ("weak", "supervised"):
        reports = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        for key in {key for report in reports for key in report if "infonce_loss" in key or "random_pair" in key}:
            last = [report for report in reports if key in report][-3:]
            if "random_pair" in key:
                cosines[stage, key] = sum(r[key] for r in last) / len(last)
            else:
                log_n = key.split("infonce_loss")[0] + "log_candidates"
                ratios[stage, key] = sum(r[key] / r[log_n] for r in last) / len(last)
    assert {key.rsplit("_d", 1)[1] for stage, key in ratios if stage == "supervised"} == {"32", "64", "128"}
    assert {key.split("_infonce")[0] for stage, key in ratios if stage == "supervised"} == {"retrieval",
                                                                                            "classification"}
    assert all(ratio < 0.6 for ratio in ratios.values()), ratios
    assert all(cos < 0.6 for cos in cosines.values()) and len(cosines) == 3, cosines

    # The export loads in sentence-transformers; scored through it, it matches the report.
    model = SentenceTransformer(str(model_dir), device="cpu")
    subset = xquad_retrieval(data_root, 500, ["en"])["en"]
    ndcg = score_subset(subset, lambda texts, dim: model.encode(texts, normalize_embeddings=True),
                        model.get_embedding_dimension())[0]["ndcg@10"]
    assert ndcg == pytest.approx(scores["supervised"]["xquad-retrieval"]["en"]["128"]["ndcg@10"], abs=0.005)

    # Resumable: a second run finds every step's output, made with the same settings, and skips it.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert ": running" not in again and again.count("exists, skipped") == len(STEPS)
    # Not with other settings: a step whose output was made otherwise is refused, naming what changed.
    (tmp_path / "eval.yaml").write_text((tmp_path / "eval.yaml").read_text().replace("max_items: 500", "max_items: 400"))
    assert main(args) == 2
    refused = capsys.readouterr()
    error = refused.err.strip().splitlines()[-1]
    assert error.startswith("conan pipeline: error: pipeline step evaluate: ") and "max_items: 500 → 400" in error
    assert "--from evaluate" in error and refused.out.count("exists, skipped") == len(STEPS) - 1
