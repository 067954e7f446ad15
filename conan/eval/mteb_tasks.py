"""The local tasks as `mteb` custom tasks: the same data scored by mteb's own evaluators, offline.

Each loaded subset (tasks.Retrieval / STS / Classification / Bitext) becomes an mteb task whose `load_data` hands
mteb the in-memory rows instead of a hub dataset, and a model directory is scored through
`sentence_transformers.SentenceTransformer(path, truncate_dim=dim)`, the way an mteb user would run it.
"""

from __future__ import annotations

from conan.eval import tasks

MTEB_LANG = {"en": "eng-Latn", "de": "deu-Latn", "es": "spa-Latn", "fr": "fra-Latn", "it": "ita-Latn",
             "ja": "jpn-Jpan", "nl": "nld-Latn", "pl": "pol-Latn", "pt": "por-Latn", "ru": "rus-Cyrl",
             "zh": "cmn-Hans", "cmn": "cmn-Hans", "eng": "eng-Latn", "deu": "deu-Latn", "fra": "fra-Latn",
             "spa": "spa-Latn", "rus": "rus-Cyrl", "jpn": "jpn-Jpan", "ara": "arb-Arab", "hin": "hin-Deva"}


def _metadata(name: str, kind: str, main_score: str, langs: list[str]):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(name=name, dataset={"path": f"local/{name}", "revision": "local"},
                        description=f"Conan local task {name} (rows from the real datasets or a user's files)",
                        reference=None, type=kind, category="t2t", modalities=["text"], eval_splits=["test"],
                        eval_langs=langs, main_score=main_score, date=None, domains=None, task_subtypes=None,
                        license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="")


def mteb_task(name: str, data, lang: str = "en"):
    """An mteb task instance serving `data` (a tasks.Retrieval, STS, Classification or Bitext); `lang` is the subset
    ("de", "en-de", "deu-eng") and only labels the task's languages."""
    from datasets import Dataset
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

    langs = [MTEB_LANG.get(x, "eng-Latn") for x in lang.split("-")]
    if isinstance(data, tasks.Retrieval):
        base, kind, main = AbsTaskRetrieval, "Retrieval", "ndcg_at_10"
        splits = {"test": {"corpus": Dataset.from_dict({"id": list(data.corpus), "text": list(data.corpus.values())}),
                           "queries": Dataset.from_dict({"id": list(data.queries),
                                                         "text": list(data.queries.values())}),
                           "relevant_docs": {q: {d: int(g) for d, g in docs.items()} for q, docs in data.qrels.items()},
                           "top_ranked": None}}
    elif isinstance(data, tasks.STS):
        base, kind, main = AbsTaskSTS, "STS", "cosine_spearman"
        splits = {"test": Dataset.from_dict({"sentence1": data.left, "sentence2": data.right, "score": data.scores})}
    elif isinstance(data, tasks.Classification):
        base, kind, main = AbsTaskClassification, "Classification", "accuracy"
        labels = sorted(set(data.train_labels) | set(data.test_labels))
        splits = {split: Dataset.from_dict({"text": texts, "label": [labels.index(x) for x in ys]})
                  for split, texts, ys in (("train", data.train_texts, data.train_labels),
                                           ("test", data.test_texts, data.test_labels))}
    elif isinstance(data, tasks.Bitext):
        base, kind, main = AbsTaskBitextMining, "BitextMining", "accuracy"
        splits = {"test": Dataset.from_dict({"sentence1": data.source, "sentence2": data.target})}
    else:
        raise TypeError(f"no mteb task for {type(data).__name__}")

    def load_data(self, **_):
        self.dataset = {"default": splits}
        self.data_loaded = True

    task_class = type(f"Conan{kind}Task", (base,), {"metadata": _metadata(name, kind, main, langs),
                                                  "load_data": load_data})
    return task_class()


def run_mteb(model_dir: str, named_data: dict[str, object], dim: int | None = None,
             max_length: int | None = None) -> dict[str, dict]:
    """mteb's scores {task name: {metric: value}} of the model (truncated to dim, texts cut at max_length tokens as
    the platform's Encoder cuts them) on each named subset."""
    import mteb
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", truncate_dim=dim)
    if max_length:
        model.max_seq_length = max_length
    built = [mteb_task(name, data, name.rsplit("/", 1)[-1]) for name, data in named_data.items()]
    results = mteb.evaluate(model, tasks=built, cache=None)
    return {r.task_name: r.scores["test"][0] for r in results.task_results}
