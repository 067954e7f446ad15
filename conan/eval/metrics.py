"""Scores of each task type, computed from embeddings (unit-norm rows, so dot product = cosine)."""

from __future__ import annotations

import math

import numpy as np


def rank(query_emb: np.ndarray, doc_emb: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best documents per query, best first (exact inner-product search)."""
    scores = query_emb @ doc_emb.T
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def retrieval_metrics(ranked: list[list[str]], qrels: list[dict[str, float]], ks=(1, 10, 20, 100)) -> dict:
    """nDCG@10, Recall@k and MRR@10 averaged over queries; ranked[i] are query i's document ids, best first."""
    return query_means(per_query_retrieval(ranked, qrels, ks))


def query_means(per_query: dict[str, np.ndarray]) -> dict:
    """Each per-query metric averaged over the queries (0 when there are none)."""
    return {name: float(values.mean()) if len(values) else 0.0 for name, values in per_query.items()}


def per_query_retrieval(ranked: list[list[str]], qrels: list[dict[str, float]], ks=(1, 10, 20, 100)) -> dict:
    """Recall@k, nDCG@10 and MRR@10 of each query (arrays in query order)."""
    out: dict[str, list[float]] = {**{f"recall@{k}": [] for k in ks}, "ndcg@10": [], "mrr@10": []}
    for docs, rel in zip(ranked, qrels):
        gains = [rel.get(d, 0.0) for d in docs[:10]]
        ideal = sorted(rel.values(), reverse=True)[:10]
        # Linear gain, as trec_eval / pytrec_eval (mteb, BEIR) score graded judgements; binary ones score alike.
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out["ndcg@10"].append(sum(g / math.log2(i + 2) for i, g in enumerate(gains)) / idcg if idcg else 0.0)
        out["mrr@10"].append(next((1 / (i + 1) for i, g in enumerate(gains) if g > 0), 0.0))
        relevant = {d for d, g in rel.items() if g > 0}
        for k in ks:
            out[f"recall@{k}"].append(len(relevant & set(docs[:k])) / max(len(relevant), 1))
    return {name: np.array(values) for name, values in out.items()}


def sts_metrics(cosine: np.ndarray, gold: list[float]) -> dict:
    """Spearman and Pearson correlation of the pairs' cosine similarities with the gold scores."""
    from scipy.stats import pearsonr, spearmanr

    return {"spearman": float(spearmanr(cosine, gold).statistic), "pearson": float(pearsonr(cosine, gold).statistic)}


def classification_predictions(train_emb: np.ndarray, train_labels: list, test_emb: np.ndarray,
                               seed: int = 0) -> np.ndarray:
    """The test items' labels as a logistic regression on the embeddings predicts them (MTEB's protocol)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=200, random_state=seed).fit(train_emb, train_labels).predict(test_emb)


def classification_metrics(test_labels: list, predicted: np.ndarray) -> dict:
    """Accuracy and macro-F1 of the predicted labels."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(test_labels, predicted)),
            "f1_macro": float(f1_score(test_labels, predicted, average="macro"))}


def bitext_hits(source_emb: np.ndarray, target_emb: np.ndarray) -> np.ndarray:
    """Whether row i's nearest target is row i, its translation."""
    return rank(source_emb, target_emb, 1)[:, 0] == np.arange(len(source_emb))


def resampled_main_metric(kind: str, items: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The main metric of a subset over each row of `picks` (indices into its items): the mean of the per-item
    values, or for STS (items: cosine, gold) the Spearman correlation, Pearson's of the tie-averaged ranks."""
    if kind != "sts":
        return items[picks].mean(axis=1)
    from scipy.stats import rankdata

    cosine, gold = rankdata(items[:, 0][picks], axis=1), rankdata(items[:, 1][picks], axis=1)
    cosine -= cosine.mean(axis=1, keepdims=True)
    gold -= gold.mean(axis=1, keepdims=True)
    return (cosine * gold).sum(axis=1) / np.sqrt((cosine ** 2).sum(axis=1) * (gold ** 2).sum(axis=1))


def paired_bootstrap(kind: str, ours: list[np.ndarray], theirs: list[np.ndarray], resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Our main metric minus theirs, averaged over subsets as the report averages them, with the 95 % percentile
    interval of that difference over `resamples` draws of each subset's items with replacement, the same items for
    both models (a paired bootstrap; Koehn 2004)."""
    rng = np.random.default_rng(seed)
    delta, draws = 0.0, np.zeros(resamples)
    for a, b in zip(ours, theirs, strict=True):
        whole, picks = np.arange(len(a))[None], rng.integers(0, len(a), (resamples, len(a)))
        delta += float(resampled_main_metric(kind, a, whole)[0] - resampled_main_metric(kind, b, whole)[0])
        draws += resampled_main_metric(kind, a, picks) - resampled_main_metric(kind, b, picks)
    low, high = np.percentile(draws / len(ours), [2.5, 97.5])
    return {"delta": delta / len(ours), "low": float(low), "high": float(high)}
