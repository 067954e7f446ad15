"""Scores every configured task for the model, an optional baseline model and BM25, at each Matryoshka dim.

Texts are embedded once per model at full size; a dim's vectors are the first `dim` coordinates
renormalised, which is exactly what the model (and the server's `dimensions`) returns for that dim.
Output: <output_dir>/scores.json {model: {task: {subset: {dim: {metric: value}}}}} and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conan.config import EvalConfig
from conan.console import say
from conan.encoder import Encoder, model_name
from conan.eval import metrics, tasks
from conan.eval.bm25 import BM25
from conan.model.pooling import matryoshka_truncate

MAIN_METRIC = {"retrieval": "ndcg@10", "sts": "spearman", "classification": "accuracy", "bitext": "accuracy"}
BM25_NAME = "BM25"


def kind_of(data) -> str:
    """Task type of a loaded subset."""
    return {tasks.Retrieval: "retrieval", tasks.STS: "sts", tasks.Classification: "classification",
            tasks.Bitext: "bitext"}[type(data)]


def largest_dim(by_dim: dict) -> str:
    """The largest Matryoshka dim key of {dim: metrics} ("lexical" for BM25 when it is the only key)."""
    return max(by_dim, key=lambda d: int(d) if d.isdigit() else -1)


class EmbeddingCache:
    """Full-size embeddings of each distinct text, computed once per model."""

    def __init__(self, encoder):
        self.encoder, self.vectors = encoder, {}

    def __call__(self, texts: list[str], dim: int) -> np.ndarray:
        """(len(texts), dim) unit-norm embeddings."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            self.vectors.update(zip(missing, self.encoder.encode(missing)))
        return matryoshka_truncate(torch.from_numpy(np.stack([self.vectors[t] for t in texts])), dim).numpy()


def score_subset(data, embed, dim: int) -> dict:
    """Metrics of one task subset with embeddings at `dim`."""
    if isinstance(data, tasks.Retrieval):
        doc_ids, query_ids = list(data.corpus), list(data.queries)
        top = metrics.rank(embed([data.queries[q] for q in query_ids], dim), embed([data.corpus[d] for d in doc_ids], dim),
                           100)
        return metrics.retrieval_metrics([[doc_ids[j] for j in row] for row in top], [data.qrels[q] for q in query_ids])
    if isinstance(data, tasks.STS):
        return metrics.sts_metrics(embed(data.left, dim), embed(data.right, dim), data.scores)
    if isinstance(data, tasks.Classification):
        return metrics.classification_metrics(embed(data.train_texts, dim), data.train_labels,
                                              embed(data.test_texts, dim), data.test_labels)
    return metrics.bitext_metrics(embed(data.source, dim), embed(data.target, dim))


def score_bm25(data: tasks.Retrieval) -> dict:
    """BM25's retrieval metrics on a subset."""
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    index = BM25([data.corpus[d] for d in doc_ids])
    ranked = [[doc_ids[j] for j in index.search(data.queries[q], 100)] for q in query_ids]
    return metrics.retrieval_metrics(ranked, [data.qrels[q] for q in query_ids])


def load_tasks(cfg: EvalConfig) -> dict[str, dict]:
    """{task: {subset: data}} for the configured tasks and BEIR folders."""
    unknown = sorted(set(cfg.tasks) - set(tasks.LOADERS))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; known: {sorted(tasks.LOADERS)}")
    root = Path(cfg.data_root)
    loaded = {name: tasks.LOADERS[name](root, cfg.max_items, cfg.langs) for name in cfg.tasks}
    for folder in cfg.beir:
        loaded[f"beir:{Path(folder).name}"] = tasks.beir(Path(folder), cfg.max_items)
    return {name: subsets for name, subsets in loaded.items() if subsets}


def evaluate(cfg: EvalConfig) -> dict:
    """Score the model (each dim), the baseline (full size) and BM25; write scores.json and the report."""
    from conan.eval.report import write_report

    loaded = load_tasks(cfg)
    evaluated = Encoder(cfg.model_dir, max_length=cfg.max_length, batch_size=cfg.batch_size)
    models = {model_name(cfg.model_dir, cfg.model_name): evaluated}
    # Like for like: every baseline reads the same (truncated) texts as the evaluated model.
    for baseline in cfg.baselines:
        models[model_name(baseline)] = Encoder(baseline, max_length=evaluated.max_length, batch_size=cfg.batch_size)
    main = next(iter(models))
    dims = cfg.dims or models[main].dims
    scores: dict = {}
    for label, encoder in models.items():
        embed = EmbeddingCache(encoder)
        model_dims = dims if label == main else [encoder.dimension]
        for task, subsets in loaded.items():
            for subset, data in subsets.items():
                for dim in model_dims:
                    scores.setdefault(label, {}).setdefault(task, {}).setdefault(subset, {})[str(dim)] = \
                        score_subset(data, embed, dim)
            say(f"[eval] {label} {task}: {summary(scores[label][task], kind_of(next(iter(subsets.values()))))}")
    if cfg.bm25:
        for task, subsets in loaded.items():
            if all(isinstance(d, tasks.Retrieval) for d in subsets.values()):
                scores.setdefault(BM25_NAME, {})[task] = {s: {"lexical": score_bm25(d)} for s, d in subsets.items()}
    if cfg.mteb:
        from conan.eval.mteb_tasks import run_mteb

        named = {f"{task}/{subset}": data for task, subsets in loaded.items() for subset, data in subsets.items()}
        for dim in dims:
            for key, values in run_mteb(cfg.model_dir, named, dim).items():
                task, subset = key.split("/", 1)
                scores.setdefault(f"{main} (mteb)", {}).setdefault(task, {}).setdefault(subset, {})[str(dim)] = values
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": main, "dims": dims, "tasks": {t: kind_of(next(iter(s.values()))) for t, s in loaded.items()},
              "max_length": evaluated.max_length, "scores": scores}
    (out / "scores.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, models[main] if cfg.plots else None, cfg)
    return result


def summary(task_scores: dict, kind: str) -> str:
    """Mean main metric over subsets at the largest dim scored, as text."""
    values = [by_dim[largest_dim(by_dim)][MAIN_METRIC[kind]] for by_dim in task_scores.values()]
    return f"{np.mean(values):.4f} over {len(values)} subset(s)"
