"""Evaluation tasks read from local files: the real datasets (bundled or $CONAN_DATA_ROOT), or a user's BEIR folders.

Each loader returns {subset: data} (subset = language or language pair), capped at `limit` items per subset.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from conan.config import ConfigError
from conan.data.public_sets import (TATOEBA_DEV_LINES, XQUAD_LANGS, stsb_aligned, stsb_langs, stsb_rows, tatoeba_lines,
                                    xquad_rows)


@dataclass
class Retrieval:
    """Queries, a corpus and graded relevance (qrels[query_id][doc_id] = gain)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, float]]


@dataclass
class STS:
    """Sentence pairs with gold similarity scores."""

    left: list[str]
    right: list[str]
    scores: list[float]


@dataclass
class Classification:
    """Labelled train and test texts."""

    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]


@dataclass
class Bitext:
    """Aligned sentences: target[i] translates source[i]."""

    source: list[str]
    target: list[str]


def _keep(lang: str, langs: list[str] | None) -> bool:
    return langs is None or lang in langs


def _xquad_retrieval(root: Path, query_lang: str, doc_lang: str, limit: int | None) -> Retrieval:
    """Dev-split questions in query_lang → the dev paragraphs in doc_lang (XQuAD ids and paragraph order match
    across languages)."""
    queries, docs = xquad_rows(root, query_lang, "dev"), xquad_rows(root, doc_lang, "dev")
    paragraphs = list(dict.fromkeys(r["context"] for r in docs))  # first-seen order = paragraph order
    doc_of = {r["id"]: f"p{paragraphs.index(r['context'])}" for r in docs}
    chosen = queries[:limit]
    return Retrieval({q["id"]: q["question"] for q in chosen}, {f"p{i}": p for i, p in enumerate(paragraphs)},
                     {q["id"]: {doc_of[q["id"]]: 1.0} for q in chosen})


def xquad_retrieval(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, Retrieval]:
    """Monolingual XQuAD: question → paragraph in the same language."""
    return {lang: _xquad_retrieval(root, lang, lang, limit) for lang in XQUAD_LANGS if _keep(lang, langs)}


def xquad_clr(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, Retrieval]:
    """MKQA-style cross-lingual retrieval: question in language X → the English paragraphs."""
    return {f"{lang}-en": _xquad_retrieval(root, lang, "en", limit) for lang in XQUAD_LANGS
            if lang != "en" and _keep(lang, langs)}


def stsb(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, STS]:
    """STS-B test pairs in each language (0-5 scores)."""
    out = {}
    for lang in stsb_langs(root, "test"):
        if _keep(lang, langs):
            rows = stsb_rows(root, "test", lang)[:limit]
            out[lang] = STS([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return out


def stsb_cross(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, STS]:
    """Cross-lingual STS: the English first sentence against the translated second one (rows are aligned)."""
    out = {}
    for lang, english, rows in stsb_aligned(root, "test"):
        if not _keep(lang, langs):
            continue
        n = min(len(rows), limit or len(rows))
        out[f"en-{lang}"] = STS([r[0] for r in english[:n]], [r[1] for r in rows[:n]], [r[2] for r in english[:n]])
    return out


def banking77(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, Classification]:
    """Banking77 intents (English); train thinned to every (rows // (4 × limit))-th row: about 4 × limit rows, all
    10,003 from a limit of 1,251 up."""
    def read(split):
        with (root / "banking77" / "banking_data" / f"{split}.csv").open(encoding="utf-8", newline="") as f:
            return [(r["text"], r["category"]) for r in csv.DictReader(f)]
    train, test = read("train"), read("test")
    train = train[::max(1, len(train) // (4 * limit))] if limit else train
    test = test[::max(1, len(test) // limit)][:limit] if limit else test
    return {"en": Classification([t for t, _ in train], [c for _, c in train], [t for t, _ in test], [c for _, c in test])}


def csl_categories(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, Classification]:
    """CSL paper titles → discipline (Chinese)."""
    def read(split):
        with (root / "csl_zh" / "benchmark" / "cls_ctg" / f"{split}.tsv").open(encoding="utf-8", newline="") as f:
            return [(r[1], r[2]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) == 3]
    train, test = read("train"), read("test")
    train = train[:4 * limit] if limit else train
    test = test[:limit] if limit else test
    return {"zh": Classification([t for t, _ in train], [c for _, c in train], [t for t, _ in test], [c for _, c in test])}


def tatoeba(root: Path, limit: int | None, langs: list[str] | None) -> dict[str, Bitext]:
    """Tatoeba bitext mining xx → English on the dev lines of every language pair in the folder."""
    out = {}
    for src in sorted((root / "tatoeba").glob("tatoeba.*-eng.*")):
        lang = src.name.split(".")[-1]
        if lang == "eng" or not _keep(lang, langs):
            continue
        source, target = tatoeba_lines(src, "dev"), tatoeba_lines(src.with_suffix(".eng"), "dev")
        pairs = [(s, t) for s, t in zip(source, target) if s.strip() and t.strip()][:limit]
        if pairs:
            out[f"{lang}-eng"] = Bitext([s for s, _ in pairs], [t for _, t in pairs])
    return out


def _beir_rows(path: Path):
    """(_id as text, row) of a BEIR JSON-lines file; a line that is not such a row is an error naming it (a benchmark
    scored without some of its rows would not be the benchmark). A byte-order mark and blank lines are layout."""
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"beir: {path}:{number}: not JSON ({e})") from None
            if not (isinstance(row, dict) and "_id" in row and isinstance(row.get("text"), str)):
                raise ConfigError(f"beir: {path}:{number}: not a JSON object with _id and text")
            yield str(row["_id"]), row


def beir(folder: Path, limit: int | None) -> dict[str, Retrieval]:
    """A BEIR-format folder: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/test.tsv."""
    layout = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/test.tsv"
    if missing := [n for n in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv") if not (folder / n).is_file()]:
        raise ConfigError(f"beir: {folder}: no {missing[0]} ({layout})")
    corpus = {key: f"{row.get('title', '')} {row['text']}".strip() for key, row in _beir_rows(folder / "corpus.jsonl")}
    queries = {key: row["text"] for key, row in _beir_rows(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, float]] = {}
    with (folder / "qrels" / "test.tsv").open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if float(r["score"]) > 0 and r["query-id"] in queries:
                qrels.setdefault(r["query-id"], {})[r["corpus-id"]] = float(r["score"])
    if not qrels:
        raise ConfigError(f"beir: {folder}: no query of queries.jsonl has a positive judgement in qrels/test.tsv "
                          f"({len(queries)} queries read)")
    kept = list(qrels)[:limit]
    return {"default": Retrieval({q: queries[q] for q in kept}, corpus, {q: qrels[q] for q in kept})}


# Where each task's items come from; none of them is in any training input (conan.data.public_sets).
DATA_SOURCES = {
    "xquad-retrieval": "XQuAD dev split: the 12 held-out articles (60 paragraphs, questions in 12 languages)",
    "xquad-clr": "XQuAD dev split: held-out questions in 11 languages → the 60 held-out English paragraphs",
    "stsb": "STS-B multi-MT test files (training reads the train files)",
    "stsb-cross": "STS-B multi-MT test files: English first sentence × translated second sentence",
    "banking77": "Banking77: the probe fits on train.csv, scores test.csv (the supervised stage trains on train.csv)",
    "csl-categories": "CSL cls_ctg: probe on train.tsv, scored on test.tsv (its titles are removed from every "
                      "training input)",
    "tatoeba": f"Tatoeba dev lines (the first {TATOEBA_DEV_LINES} of each pair; pretraining reads the rest)",
}

LOADERS = {"xquad-retrieval": xquad_retrieval, "xquad-clr": xquad_clr, "stsb": stsb, "stsb-cross": stsb_cross,
           "banking77": banking77, "csl-categories": csl_categories, "tatoeba": tatoeba}
