"""Scores every configured task for the model, an optional baseline model and BM25, at each Matryoshka dim.

Texts are embedded once per model at full size; a dim's vectors are the first `dim` coordinates
renormalised, which is exactly what the model (and the server's `dimensions`) returns for that dim.
Output: <output_dir>/scores.json {model: {task: {subset: {dim: {metric: value}}}}} with, per baseline model and
task, the evaluated model's main metric minus the baseline's and its paired-bootstrap 95 % interval; and the report.
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


def score_subset(data, embed, dim: int) -> tuple[dict, np.ndarray]:
    """Metrics of one task subset with embeddings at `dim`, and the per-item values its main metric is computed
    from (per-query nDCG@10, per-item hits, or each pair's cosine and gold score), for paired comparisons."""
    if isinstance(data, tasks.Retrieval):
        doc_ids, query_ids = list(data.corpus), list(data.queries)
        top = metrics.rank(embed([data.queries[q] for q in query_ids], dim), embed([data.corpus[d] for d in doc_ids], dim),
                           100)
        per_query = metrics.per_query_retrieval([[doc_ids[j] for j in row] for row in top],
                                                [data.qrels[q] for q in query_ids])
        return metrics.query_means(per_query), per_query["ndcg@10"]
    if isinstance(data, tasks.STS):
        cosine = (embed(data.left, dim) * embed(data.right, dim)).sum(1)
        return metrics.sts_metrics(cosine, data.scores), np.stack([cosine, np.asarray(data.scores)], axis=1)
    if isinstance(data, tasks.Classification):
        predicted = metrics.classification_predictions(embed(data.train_texts, dim), data.train_labels,
                                                       embed(data.test_texts, dim))
        return metrics.classification_metrics(data.test_labels, predicted), predicted == np.asarray(data.test_labels)
    hits = metrics.bitext_hits(embed(data.source, dim), embed(data.target, dim))
    return {"accuracy": float(hits.mean())}, hits


def score_bm25(data: tasks.Retrieval) -> dict:
    """BM25's retrieval metrics on a subset."""
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    index = BM25([data.corpus[d] for d in doc_ids])
    ranked = [[doc_ids[j] for j in index.search(data.queries[q], 100)] for q in query_ids]
    return metrics.retrieval_metrics(ranked, [data.qrels[q] for q in query_ids])


def load_tasks(cfg: EvalConfig) -> dict[str, dict]:
    """{task: {subset: data}} for the configured tasks and BEIR folders."""
    root = Path(cfg.data_root)
    loaded = {name: tasks.LOADERS[name](root, cfg.max_items, cfg.langs) for name in cfg.tasks}
    for folder in cfg.beir:
        loaded[f"beir:{Path(folder).name}"] = tasks.beir(Path(folder), cfg.max_items)
    return {name: subsets for name, subsets in loaded.items() if subsets}


def unique_label(name: str, model_dir: str | Path, taken: dict) -> str:
    """A baseline's label: its name, or, when a model evaluated beside it has that name (two runs' `supervised`),
    its run's folder before it ("run-b/supervised"), then a count."""
    if name not in taken:
        return name
    path = Path(model_dir).resolve()
    label = base = f"{(path.parent.parent if path.name == 'model' else path.parent).name}/{name}"
    count = 1
    while label in taken:
        count += 1
        label = f"{base}-{count}"
    return label


def evaluate(cfg: EvalConfig) -> dict:
    """Score the model (each dim), the baseline (full size) and BM25; write scores.json and the report."""
    from conan.eval.report import write_report

    loaded = load_tasks(cfg)
    evaluated = Encoder(cfg.model_dir, max_length=cfg.max_length, batch_size=cfg.batch_size)
    models = {model_name(cfg.model_dir, cfg.model_name): evaluated}
    # Like for like: every baseline reads the same (truncated) texts as the evaluated model.
    for baseline in cfg.baselines:
        models[unique_label(model_name(baseline), baseline, models)] = Encoder(
            baseline, max_length=evaluated.max_length, batch_size=cfg.batch_size)
    main = next(iter(models))
    dims = sorted(cfg.dims or models[main].dims)  # the report's full size is the last
    scores: dict = {}
    items: dict = {}  # {label: {task: [per-item values of each subset at the model's full size]}}
    kinds = {task: kind_of(next(iter(subsets.values()))) for task, subsets in loaded.items()}
    for label, encoder in models.items():
        embed = EmbeddingCache(encoder)
        model_dims = dims if label == main else [encoder.dimension]
        for task, subsets in loaded.items():
            for subset, data in subsets.items():
                for dim in sorted(model_dims):
                    values, per_item = score_subset(data, embed, dim)
                    scores.setdefault(label, {}).setdefault(task, {}).setdefault(subset, {})[str(dim)] = values
                items.setdefault(label, {}).setdefault(task, []).append(per_item)  # the largest dim's
            say(f"[eval] {label} {task}: {summary(scores[label][task], kinds[task])}")
    differences = {label: {task: metrics.paired_bootstrap(kinds[task], items[main][task], items[label][task])
                           for task in loaded} for label in models if label != main}
    for label, by_task in differences.items():
        verdicts = [verdict(d) for d in by_task.values()]
        say(f"[eval] {main} vs {label}: " + ", ".join(f"{v} on {verdicts.count(v)}" for v in VERDICTS)
            + f" of {len(verdicts)} tasks (paired bootstrap, 95 %)")
    if cfg.bm25:
        for task, subsets in loaded.items():
            if all(isinstance(d, tasks.Retrieval) for d in subsets.values()):
                scores.setdefault(BM25_NAME, {})[task] = {s: {"lexical": score_bm25(d)} for s, d in subsets.items()}
    if cfg.mteb:
        from conan.eval.mteb_tasks import run_mteb

        named = {f"{task}/{subset}": data for task, subsets in loaded.items() for subset, data in subsets.items()}
        for dim in dims:
            for key, values in run_mteb(cfg.model_dir, named, dim, evaluated.max_length).items():
                task, subset = key.split("/", 1)
                scores.setdefault(f"{main} (mteb)", {}).setdefault(task, {}).setdefault(subset, {})[str(dim)] = values
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": main, "dims": dims, "tasks": kinds, "max_length": evaluated.max_length, "scores": scores,
              "differences": differences}
    (out / "scores.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, models[main] if cfg.plots else None, cfg)
    return result


VERDICTS = ("better", "worse", "within noise")


def verdict(difference: dict) -> str:
    """"better" or "worse" when a difference's interval excludes 0, else "within noise"."""
    return "better" if difference["low"] > 0 else "worse" if difference["high"] < 0 else "within noise"


def summary(task_scores: dict, kind: str) -> str:
    """Mean main metric over subsets at the largest dim scored, as text."""
    values = [by_dim[largest_dim(by_dim)][MAIN_METRIC[kind]] for by_dim in task_scores.values()]
    return f"{np.mean(values):.4f} over {len(values)} subset(s)"
