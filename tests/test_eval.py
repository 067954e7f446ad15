"""Evaluation: metrics and BM25 against direct computations, and a run on real data writing scores, report, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conan.config import EvalConfig
from conan.eval import metrics
from conan.eval.bm25 import BM25, tokenize


def test_bm25_matches_the_formula():
    """bm25s's scores are Okapi BM25's (written out here) divided by the constant k1 + 1, as in Lucene."""
    docs = ["the cat sat on the mat", "the dog sat", "cats and dogs", "猫坐在垫子上", "the the the cat"]
    index = BM25(docs, k1=1.2, b=0.75)
    tokens = [tokenize(d) for d in docs]
    avgdl = sum(map(len, tokens)) / len(tokens)

    def direct(query, d):
        total = 0.0
        for t in tokenize(query):
            tf = tokens[d].count(t)
            if tf:
                df = sum(t in x for x in tokens)
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                total += idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * len(tokens[d]) / avgdl))
        return total

    for query in ("the cat", "sat dog", "垫子", "nothing", "cat cat mat"):
        assert list(index.scores(query) * 2.2) == pytest.approx([direct(query, d) for d in range(len(docs))],
                                                                rel=1e-6, abs=1e-6)
    ranked = sorted(range(len(docs)), key=lambda d: (-direct("the cat", d), d))
    assert index.search("the cat", 2) == ranked[:2] and index.search("垫子", 1) == [3]


def test_bm25_words_keep_their_combining_marks_and_a_query_without_words_scores_zero():
    """Hindi's vowel signs and virama, Arabic's diacritics are part of the word (`re`'s \\w split Hindi words into
    consonants); a query of punctuation or emoji has no term and scores every document 0 instead of failing."""
    assert tokenize("हिन्दी भाषा बहुत सुंदर है") == ["हिन्दी", "भाषा", "बहुत", "सुंदर", "है"]
    assert tokenize("مُحَمَّد رسول") == ["مُحَمَّد", "رسول"] and tokenize("Café, naïve_1") == ["café", "naïve_1"]
    index = BM25(["हिन्दी भाषा", "हाथी", "भाषा"])
    assert index.search("हिन्दी", 1) == [0] and index.scores("हिन्दी")[1] == 0  # no shared consonant matches
    assert index.scores("?!").tolist() == index.scores("").tolist() == [0.0, 0.0, 0.0]


def test_graded_ndcg_is_trec_evals():
    """Graded judgements take linear gain, as trec_eval (pytrec_eval, which mteb and BEIR use) scores them."""
    import pytrec_eval

    ranked = [[f"d{i}" for i in range(10)], ["d3", "d1", "d0"]]
    qrels = [{"d1": 2, "d2": 1, "d5": 3}, {"d0": 1, "d1": 1, "d9": 2}]
    ours = metrics.per_query_retrieval(ranked, qrels)["ndcg@10"]
    evaluator = pytrec_eval.RelevanceEvaluator({f"q{i}": rel for i, rel in enumerate(qrels)}, {"ndcg_cut.10"})
    runs = {f"q{i}": {d: float(len(docs) - r) for r, d in enumerate(docs)} for i, docs in enumerate(ranked)}
    theirs = evaluator.evaluate(runs)
    assert ours.tolist() == pytest.approx([theirs[f"q{i}"]["ndcg_cut_10"] for i in range(2)], abs=1e-9)
    assert ours[0] == pytest.approx(0.5944, abs=1e-4)


def test_retrieval_metrics_by_hand():
    ranked = [["a", "b", "c"], ["x", "y", "z"]]
    qrels = [{"b": 1.0}, {"q": 1.0}]
    out = metrics.retrieval_metrics(ranked, qrels, ks=(1, 2))
    assert out["ndcg@10"] == pytest.approx((1 / math.log2(3)) / 2)
    assert out["mrr@10"] == pytest.approx(0.25)
    assert out["recall@1"] == 0 and out["recall@2"] == pytest.approx(0.5)


def test_bitext_and_rank():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 8))
    src /= np.linalg.norm(src, axis=1, keepdims=True)
    assert metrics.bitext_hits(src, src).all() and not metrics.bitext_hits(src, src[::-1])[0]
    assert metrics.rank(src, src, 3)[:, 0].tolist() == list(range(20))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, embedding_model_dir, data_root):
    from conan.eval.runner import evaluate

    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(model_dir=str(embedding_model_dir), baselines=[str(embedding_model_dir)], model_name="tiny",
                     output_dir=str(out), data_root=str(data_root), max_items=40, langs=["en", "de", "zh", "cmn"])
    return cfg, evaluate(cfg)


def test_every_task_type_scores_in_range(evaluated):
    cfg, result = evaluated
    scores = result["scores"]["tiny"]
    assert set(scores) == set(cfg.tasks)
    assert set(scores["xquad-clr"]) == {"de-en", "zh-en"} and set(scores["tatoeba"]) == {"cmn-eng"}
    assert set(scores["stsb-cross"]) == {"en-de", "en-zh"}
    for task, by_subset in scores.items():
        for subset, by_dim in by_subset.items():
            assert list(by_dim) == ["32", "64", "128"]
            for values in by_dim.values():
                for name, v in values.items():
                    low = -1.0 if name in ("spearman", "pearson") else 0.0
                    assert low <= v <= 1.0, (task, subset, name, v)
    # A random model still finds some XQuAD paragraphs among 48 (English subset) — and BM25 many more.
    bm25 = result["scores"]["BM25"]["xquad-retrieval"]["en"]["lexical"]
    assert bm25["recall@20"] > 0.8 and set(result["scores"]["BM25"]) == {"xquad-retrieval", "xquad-clr"}


def test_baseline_is_scored_at_full_size(evaluated):
    _, result = evaluated
    baseline = [k for k in result["scores"] if k not in ("tiny", "BM25")][0]
    assert list(result["scores"][baseline]["stsb"]["en"]) == ["128"]
    # The same directory as baseline: identical scores, and no difference on any task, not even within its noise.
    assert result["scores"][baseline]["stsb"]["en"]["128"] == result["scores"]["tiny"]["stsb"]["en"]["128"]
    assert set(result["differences"]) == {baseline} and set(result["differences"][baseline]) == set(result["tasks"])
    assert all(d == {"delta": 0.0, "low": 0.0, "high": 0.0} for d in result["differences"][baseline].values())


def test_report_and_plots_are_written(evaluated):
    cfg, result = evaluated
    from pathlib import Path
    out = Path(cfg.output_dir)
    report = (out / "report.md").read_text()
    assert "| xquad-clr | ndcg@10 |" in report and "BM25" in report
    assert "## Differences from the baseline models" in report
    assert "| stsb-cross | +0.0000 [+0.0000, +0.0000] within noise |" in report
    for name in ("mrl_dims.png", "comparison.png", "embedding_map.png"):
        assert (out / name).stat().st_size > 5000
    assert json.loads((out / "scores.json").read_text())["dims"] == [32, 64, 128]


def test_beir_folder_is_a_task(tmp_path, embedding_model_dir, data_root):
    from conan.eval.runner import evaluate

    beir = tmp_path / "mini"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) for i, t in
                                                 enumerate(["Paris is in France", "Berlin is in Germany", "Tokyo"])))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "capital of Germany Berlin"}))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    cfg = EvalConfig(model_dir=str(embedding_model_dir), model_name="m", output_dir=str(tmp_path / "out"),
                     data_root=str(data_root),
                     tasks=[], beir=[str(beir)], plots=False, dims=[64, 32])
    result = evaluate(cfg)
    assert result["scores"]["BM25"]["beir:mini"]["default"]["lexical"]["mrr@10"] == 1.0
    assert 0 < result["scores"]["m"]["beir:mini"]["default"]["64"]["mrr@10"] <= 1.0
    # dims in any order: the report's full size is the largest
    assert result["dims"] == [32, 64] and "## Per language at 64 dims" in (tmp_path / "out" / "report.md").read_text()


def test_a_baseline_named_like_another_model_is_labelled_by_its_run(tmp_path):
    """Two runs' `supervised` models side by side: the baseline is labelled with its run's folder (it replaced the
    evaluated model's scores under one key before)."""
    from conan.eval.runner import unique_label

    taken = {"supervised": None}
    assert unique_label("supervised", tmp_path / "run-b" / "supervised" / "model", taken) == "run-b/supervised"
    taken["run-b/supervised"] = None
    assert unique_label("supervised", tmp_path / "run-b" / "supervised" / "model", taken) == "run-b/supervised-2"
    assert unique_label("my-model", tmp_path / "other" / "my-model", {"my-model": None}) == "other/my-model"
    assert unique_label("weak", tmp_path / "run-b" / "weak" / "model", taken) == "weak"


def test_a_beir_folder_whose_judgements_match_no_query_is_one_error_line(tmp_path, capsys):
    """qrels naming queries queries.jsonl lacks: `conan evaluate` says so and exits 2 before loading any model."""
    from conan.cli import main

    beir = tmp_path / "mismatched"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "Berlin is in Germany"}))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "capital of Germany"}))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq7\td1\t1\n")
    code = main(["evaluate", "--set", f"model_dir={tmp_path / 'no-model'}", "--set", "tasks=[]",
                 "--set", f"beir=[{beir}]", "--set", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{beir}: no query of queries.jsonl has a positive judgement" in err, err
    assert not (tmp_path / "out").exists()
    # A byte-order mark is layout; a line that is not a row, or a missing file, is one line naming it.
    (beir / "corpus.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"_id": "d1", "text": "Berlin"}).encode()
                                        + b'\n{"_id": "d2", "text": "cut')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    for broken, says in ((None, f"{beir / 'corpus.jsonl'}:2: not JSON"),
                         ("qrels/test.tsv", f"{beir}: no qrels/test.tsv (a BEIR folder holds")):
        if broken:
            (beir / broken).unlink()
        assert main(["evaluate", "--set", f"model_dir={tmp_path / 'no-model'}", "--set", "tasks=[]", "--set",
                     f"beir=[{beir}]", "--set", f"output_dir={tmp_path / 'out'}"]) == 2
        assert says in capsys.readouterr().err.splitlines()[-1]


def test_mteb_custom_tasks_agree_with_our_metrics(embedding_model_dir, data_root):
    """The same XQuAD, STS-B and Tatoeba rows through mteb's evaluators give our nDCG@10, Spearman and bitext
    accuracy."""
    from pathlib import Path

    from conan.encoder import Encoder
    from conan.eval import tasks
    from conan.eval.mteb_tasks import run_mteb
    from conan.eval.runner import EmbeddingCache, score_subset

    root = Path(data_root)
    sts = tasks.stsb(root, 60, ["de"])["de"]
    bitext = tasks.tatoeba(root, 60, ["deu"])["deu-eng"]
    clf = tasks.banking77(root, 40, None)["en"]
    retrieval = tasks.xquad_retrieval(root, 60, ["de"])["de"]
    for dim in (64, 128):
        ours = EmbeddingCache(Encoder(embedding_model_dir))
        theirs = run_mteb(str(embedding_model_dir), {"LocalSTS": sts, "LocalBitext": bitext, "LocalBanking": clf,
                                                     "LocalRetrieval": retrieval}, dim)
        assert theirs["LocalRetrieval"]["ndcg_at_10"] == pytest.approx(
            score_subset(retrieval, ours, dim)[0]["ndcg@10"], abs=1e-3)
        # Embeddings agree to ~1e-6; the untrained model's cosines are so close together that such differences
        # swap a few ranks, hence a Spearman tolerance of 2e-3 rather than float precision.
        assert theirs["LocalSTS"]["cosine_spearman"] == pytest.approx(score_subset(sts, ours, dim)[0]["spearman"],
                                                                      abs=2e-3)
        assert theirs["LocalBitext"]["accuracy"] == pytest.approx(score_subset(bitext, ours, dim)[0]["accuracy"],
                                                                  abs=1e-9)
        assert 0 <= theirs["LocalBanking"]["accuracy"] <= 1
