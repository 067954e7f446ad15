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
    out = {f"recall@{k}": 0.0 for k in ks}
    out.update({"ndcg@10": 0.0, "mrr@10": 0.0})
    for docs, rel in zip(ranked, qrels):
        gains = [rel.get(d, 0.0) for d in docs[:10]]
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
        out["ndcg@10"] += sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(gains)) / idcg if idcg else 0.0
        out["mrr@10"] += next((1 / (i + 1) for i, g in enumerate(gains) if g > 0), 0.0)
        relevant = {d for d, g in rel.items() if g > 0}
        for k in ks:
            out[f"recall@{k}"] += len(relevant & set(docs[:k])) / max(len(relevant), 1)
    return {name: value / max(len(ranked), 1) for name, value in out.items()}


def sts_metrics(left: np.ndarray, right: np.ndarray, gold: list[float]) -> dict:
    """Spearman and Pearson correlation of cosine similarity with the gold scores."""
    from scipy.stats import pearsonr, spearmanr

    cosine = (left * right).sum(1)
    return {"spearman": float(spearmanr(cosine, gold).statistic), "pearson": float(pearsonr(cosine, gold).statistic)}


def classification_metrics(train_emb: np.ndarray, train_labels: list, test_emb: np.ndarray, test_labels: list,
                           seed: int = 0) -> dict:
    """Accuracy and macro-F1 of a logistic regression on the embeddings (MTEB's protocol)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    clf = LogisticRegression(max_iter=200, random_state=seed).fit(train_emb, train_labels)
    predicted = clf.predict(test_emb)
    return {"accuracy": float(accuracy_score(test_labels, predicted)),
            "f1_macro": float(f1_score(test_labels, predicted, average="macro"))}


def bitext_metrics(source_emb: np.ndarray, target_emb: np.ndarray) -> dict:
    """Accuracy of finding row i's translation (row i of target) as its nearest neighbour."""
    nearest = rank(source_emb, target_emb, 1)[:, 0]
    return {"accuracy": float((nearest == np.arange(len(source_emb))).mean())}
