"""Training records for each stage, built from the real datasets (the bundled copies or $CONAN_DATA_ROOT).

pretrain: documents {text} · sft / weak: {instruction, input, output} · supervised: task rows
{task, query, positive, negatives, s1, s2, score} where retrieval/clr/classification use
(query, positive, negatives) and sts uses (s1, s2, score).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Iterator

from conan.data.corpus import iter_corpus

XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")


def xquad_rows(root: Path, lang: str) -> list[dict]:
    """XQuAD questions with their paragraph and article index; ids are shared across languages."""
    rows = []
    data = json.loads((root / "xquad" / f"xquad.{lang}.json").read_text(encoding="utf-8"))["data"]
    for a, article in enumerate(data):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "question": qa["question"], "context": paragraph["context"],
                             "article": a})
    return rows


def xquad_corpus(root: str | Path) -> list[str]:
    """The 240 English XQuAD paragraphs; a paragraph's passage id is its index here."""
    return sorted({r["context"] for r in xquad_rows(Path(root), "en")})


def pretrain_records(root: str | Path, max_rows: int | None = None) -> list[dict]:
    """Documents of the multilingual corpus."""
    return [{"text": t} for t, _, _ in _take(iter_corpus(root), max_rows)]


def pair_records(root: str | Path, max_rows: int | None = None, seed: int = 0) -> list[dict]:
    """(instruction, input, output) pairs: XQuAD question→paragraph, CSL abstract→title, zh query→positive."""
    root = Path(root)
    rows = []
    for lang in XQUAD_LANGS:
        rows += [{"instruction": "Given a question, retrieve the passage that answers it.",
                  "input": r["question"], "output": r["context"]} for r in xquad_rows(root, lang)]
    with (root / "csl_zh" / "benchmark" / "ts" / "dev.tsv").open(encoding="utf-8", newline="") as f:
        rows += [{"instruction": "Write the title of this scientific abstract.", "input": r[1], "output": r[2]}
                 for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) == 3]
    for line in (root / "text2vec_zh" / "examples" / "data" / "bge_finetune_data.jsonl").open(encoding="utf-8"):
        r = json.loads(line)
        rows.append({"instruction": "Find a sentence with the same meaning.", "input": r["query"], "output": r["pos"][0]})
    random.Random(seed).shuffle(rows)
    return list(_take(iter(rows), max_rows))


def supervised_records(root: str | Path, num_negatives: int = 7, max_per_task: int | None = None,
                       seed: int = 0) -> list[dict]:
    """Task rows for the supervised stage: retrieval, clr, classification and sts."""
    root, rng = Path(root), random.Random(seed)
    rows: list[dict] = []

    def add(task, query="", positive="", negatives=(), s1="", s2="", score=0.0, query_id="", positive_id=-1):
        rows.append({"task": task, "query": query, "positive": positive, "negatives": list(negatives),
                     "s1": s1, "s2": s2, "score": float(score), "query_id": query_id, "positive_id": positive_id})

    # Retrieval: English XQuAD question → paragraph, negatives = other paragraphs (same article first).
    # These rows carry query and passage ids into xquad_corpus, so DHNM can manage their negatives.
    english = xquad_rows(root, "en")
    corpus = xquad_corpus(root)
    passage_id = {text: i for i, text in enumerate(corpus)}
    article_of = {r["context"]: r["article"] for r in english}
    by_id = {r["id"]: r for r in english}

    def negatives_for(row):
        same = [c for c in corpus if article_of[c] == row["article"] and c != row["context"]]
        other = [c for c in corpus if article_of[c] != row["article"]]
        rng.shuffle(same)
        return (same + rng.sample(other, num_negatives))[:num_negatives]

    for r in _take(iter(english), max_per_task):
        add("retrieval", r["question"], r["context"], negatives_for(r), query_id=f"en:{r['id']}",
            positive_id=passage_id[r["context"]])
    # zh retrieval with the dataset's own hard negatives.
    for line in _take((root / "text2vec_zh" / "examples" / "data" / "bge_finetune_data.jsonl").open(encoding="utf-8"),
                      max_per_task):
        r = json.loads(line)
        if len(r["neg"]) >= num_negatives:
            add("retrieval", r["query"], r["pos"][0], r["neg"][:num_negatives])
    # Cross-lingual retrieval from human translations: question in language X → English paragraph.
    clr = [(lang, q) for lang in XQUAD_LANGS if lang != "en" for q in xquad_rows(root, lang)]
    rng.shuffle(clr)
    for lang, q in _take(iter(clr), max_per_task):
        english_row = by_id[q["id"]]
        add("clr", q["question"], english_row["context"], negatives_for(english_row), query_id=f"{lang}:{q['id']}",
            positive_id=passage_id[english_row["context"]])
    # Classification: utterance → its intent's name, other intents as negatives.
    with (root / "banking77" / "banking_data" / "train.csv").open(encoding="utf-8", newline="") as f:
        labelled = [(r["text"], r["category"].replace("_", " ")) for r in csv.DictReader(f)]
    labels = sorted({label for _, label in labelled})
    rng.shuffle(labelled)
    for text, label in _take(iter(labelled), max_per_task):
        add("classification", text, label, rng.sample([x for x in labels if x != label], num_negatives))
    # STS: English STS-B train pairs with 0-5 scores.
    with (root / "stsb_multi_mt" / "data" / "stsb-en-train.csv").open(encoding="utf-8", newline="") as f:
        for r in _take((r for r in csv.reader(f) if len(r) == 3), max_per_task):
            add("sts", s1=r[0], s2=r[1], score=float(r[2]))
    return rows


def with_passage_ids(rows: list[dict], root: str | Path) -> list[dict]:
    """Rows whose positive is an XQuAD paragraph get its passage id (so DHNM mining can drop it), task kept."""
    passage_id = {text: i for i, text in enumerate(xquad_corpus(root))}
    return [{**r, "positive_id": passage_id.get(r["positive"], r["positive_id"])} for r in rows]


def _take(it: Iterator, n: int | None) -> Iterator:
    for i, x in enumerate(it):
        if n is not None and i >= n:
            return
        yield x
