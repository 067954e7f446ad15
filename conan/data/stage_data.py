"""The demo data source: every stage's input built from the real datasets (the bundled copies or $CONAN_DATA_ROOT).

documents {text} (pretrain) · instructions / pairs {instruction, input, output, lang, source} (sft / weak) · tasks
{task, query, positive, negatives, s1, s2, score, ...} (supervised), where retrieval/clr/classification use
(query, positive, negatives) and sts uses (s1, s2, score) · passages {text}: the corpus the tasks' passage ids index.

`write_demo` writes one kind as a parquet file that a stage reads like any user's input (`conan demo`, or `conan
train` with data.paths empty); nothing under conan/train names a dataset. Every reader takes the train split of
conan.data.public_sets.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from conan.data.corpus import iter_corpus
from conan.data.public_sets import (XQUAD_LANGS, csl_keyword_pairs, csl_title_pairs, stsb_cross_train_rows,
                                    stsb_train_rows, xquad_rows)


DEMO_RECORDS, DEMO_PASSAGES = "records.parquet", "passages.parquet"
PARAPHRASE_SCORE = 4.0  # STS-B pairs scored at least this (of 5) are weak pairs: same meaning, other words
SAME_MEANING = "Find a sentence with the same meaning."  # the SFT instruction of every paraphrase pair


def demo_records(kind: str, cfg, clr: list[dict] | None = None) -> list[dict]:
    """The demo rows of one input kind (documents, instructions, pairs, tasks) for a stage config (JobConfig); `clr`:
    a built CLR set's rows, which replace the built-in CLR task rows (given their XQuAD passage ids)."""
    root, max_rows, seed = cfg.data.root, cfg.data.max_rows, cfg.train.seed
    if kind == "documents":
        return pretrain_records(root, max_rows)
    if kind in ("instructions", "pairs"):
        return pair_records(root, max_rows, seed)
    if kind != "tasks":
        raise ValueError(f"the demo source has no input of kind {kind!r}")
    sup = cfg.supervised
    rows = supervised_records(root, sup.num_negatives, sup.max_per_task, seed, sup.retrieval_langs)
    if clr is not None:
        rows = [r for r in rows if r["task"] != "clr"] + with_passage_ids(clr[:sup.max_per_task], root)
    return rows


def write_demo(kind: str, cfg, out: str | Path, clr: list[dict] | None = None) -> dict[str, str]:
    """Write the demo input of `kind` to out/records.parquet (rows in a seeded order: readers stream a file at a time)
    and, for tasks, the passage corpus their ids index to out/passages.parquet; return {"records", "passages"}."""
    rows = demo_records(kind, cfg, clr)
    if not rows:
        raise ValueError(f"the demo source has no {kind} rows under {cfg.data.root}")
    random.Random(cfg.train.seed).shuffle(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / DEMO_RECORDS)
    paths = {"records": str(out / DEMO_RECORDS)}
    if kind == "tasks":
        pq.write_table(pa.table({"text": xquad_corpus(cfg.data.root)}), out / DEMO_PASSAGES)
        paths["passages"] = str(out / DEMO_PASSAGES)
    return paths


def xquad_corpus(root: str | Path) -> list[str]:
    """The English XQuAD paragraphs of the train split; a paragraph's passage id is its index here."""
    return sorted({r["context"] for r in xquad_rows(Path(root), "en", "train")})


def pretrain_records(root: str | Path, max_rows: int | None = None) -> list[dict]:
    """Documents of the multilingual corpus."""
    return [{"text": t} for t, _, _ in _take(iter_corpus(root), max_rows)]


def pair_records(root: str | Path, max_rows: int | None = None, seed: int = 0) -> list[dict]:
    """(instruction, input, output, lang, source) pairs of the train split: XQuAD question→paragraph (12 languages),
    CSL abstract→title and abstract→keywords, zh query→positive (bge), STS-B train paraphrases (score ≥ 4 of 5, in
    each of its 11 languages) and the same paraphrases across languages (English ↔ each of the 10 translations, both
    ways: what aligns the languages; without them the weak stage ends below the random init on cross-lingual STS).
    `lang` is the output's language (the candidates a query is told apart from). (Tatoeba translation pairs were
    tried as another source: at the tiny preset they cost more monolingual retrieval and STS than they gave bitext
    mining; see README.)"""
    root = Path(root)
    rows = []
    for lang in XQUAD_LANGS:
        rows += [{"instruction": "Given a question, retrieve the passage that answers it.",
                  "input": r["question"], "output": r["context"], "lang": lang, "source": "xquad"}
                 for r in xquad_rows(root, lang, "train")]
    rows += [{"instruction": "Write the title of this scientific abstract.", "input": abstract, "output": title,
              "lang": "zh", "source": "csl"} for abstract, title in csl_title_pairs(root, ("dev", "test"))]
    rows += [{"instruction": "Write the keywords of this scientific abstract.", "input": abstract, "output": keywords,
              "lang": "zh", "source": "csl"} for abstract, keywords in csl_keyword_pairs(root)]
    for line in (root / "text2vec_zh" / "examples" / "data" / "bge_finetune_data.jsonl").open(encoding="utf-8"):
        r = json.loads(line)
        rows.append({"instruction": SAME_MEANING, "input": r["query"], "output": r["pos"][0],
                     "lang": "zh", "source": "bge"})
    rows += [{"instruction": SAME_MEANING, "input": s1, "output": s2, "lang": lang,
              "source": "stsb"} for s1, s2, score, lang in stsb_train_rows(root) if score >= PARAPHRASE_SCORE]
    rows += [{"instruction": SAME_MEANING, "input": s1, "output": s2, "lang": lang, "source": "stsb-cross"}
             for s1, s2, score, lang in stsb_cross_train_rows(root) if score >= PARAPHRASE_SCORE]
    random.Random(seed).shuffle(rows)
    return list(_take(iter(rows), max_rows))


def supervised_records(root: str | Path, num_negatives: int = 7, max_per_task: int | None = None,
                       seed: int = 0, retrieval_langs: list[str] | None = None) -> list[dict]:
    """Task rows for the supervised stage (train split): retrieval (in `retrieval_langs`, default all), clr,
    classification and sts.

    A row may name what its positive and negatives *are* (`positive_key`, `negative_keys`: a class label); the
    stage then masks in-batch copies of the positive by that key instead of by text."""
    root, rng = Path(root), random.Random(seed)
    rows: list[dict] = []

    def add(task, query="", positive="", negatives=(), s1="", s2="", score=0.0, query_id="", positive_id=-1,
            positive_key="", negative_keys=(), lang=""):
        rows.append({"task": task, "query": query, "positive": positive, "negatives": list(negatives),
                     "s1": s1, "s2": s2, "score": float(score), "query_id": query_id, "positive_id": positive_id,
                     "positive_key": positive_key, "negative_keys": list(negative_keys), "lang": lang})

    # Retrieval: XQuAD question → its paragraph in each of the 12 languages, negatives = other paragraphs of that
    # language (same article first). English rows carry query and passage ids into xquad_corpus, so DHNM can manage
    # their negatives.
    corpus = xquad_corpus(root)
    passage_id = {text: i for i, text in enumerate(corpus)}
    by_lang = {lang: xquad_rows(root, lang, "train") for lang in XQUAD_LANGS}
    english = {r["id"]: r for r in by_lang["en"]}

    def negatives_for(row, paragraphs):
        same = [c for c, a in paragraphs.items() if a == row["article"] and c != row["context"]]
        other = [c for c, a in paragraphs.items() if a != row["article"]]
        rng.shuffle(same)
        return (same + rng.sample(other, num_negatives))[:num_negatives]

    questions = []
    for lang, lang_rows in by_lang.items():
        if retrieval_langs and lang not in retrieval_langs:
            continue
        paragraphs = {r["context"]: r["article"] for r in lang_rows}
        questions += [(lang, r, paragraphs) for r in lang_rows]
    rng.shuffle(questions)
    for lang, r, paragraphs in _take(iter(questions), max_per_task):
        ids = {"query_id": f"en:{r['id']}", "positive_id": passage_id[r["context"]]} if lang == "en" else {}
        add("retrieval", r["question"], r["context"], negatives_for(r, paragraphs), lang=lang, **ids)
    # zh retrieval with the dataset's own hard negatives.
    zh_pairs = (root / "text2vec_zh" / "examples" / "data" / "bge_finetune_data.jsonl").open(encoding="utf-8")
    for line in _take(zh_pairs if not retrieval_langs or "zh" in retrieval_langs else iter(()), max_per_task):
        r = json.loads(line)
        if len(r["neg"]) >= num_negatives:
            add("retrieval", r["query"], r["pos"][0], r["neg"][:num_negatives], lang="zh")
    # Cross-lingual retrieval from human translations: question in language X → English paragraph.
    english_paragraphs = {r["context"]: r["article"] for r in english.values()}
    clr = [(lang, q) for lang in XQUAD_LANGS if lang != "en" for q in by_lang[lang]]
    rng.shuffle(clr)
    for lang, q in _take(iter(clr), max_per_task):
        english_row = english[q["id"]]
        add("clr", q["question"], english_row["context"], negatives_for(english_row, english_paragraphs),
            query_id=f"{lang}:{q['id']}", positive_id=passage_id[english_row["context"]], lang="en")
    # Classification: utterance → another utterance of its intent, negatives = utterances of other intents; copies
    # are the intent (App. A scores label names instead: at small scale same-class texts form the clusters a
    # classifier reads better, see README).
    with (root / "banking77" / "banking_data" / "train.csv").open(encoding="utf-8", newline="") as f:
        labelled = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    by_label: dict[str, list[str]] = {}
    for text, label in labelled:
        by_label.setdefault(label, []).append(text)
    rng.shuffle(labelled)
    for text, label in _take(iter(labelled), max_per_task):
        others = rng.sample([x for x in sorted(by_label) if x != label], num_negatives)
        add("classification", text, rng.choice([t for t in by_label[label] if t != text]),
            [rng.choice(by_label[o]) for o in others], positive_key=label, negative_keys=others, lang="en")
    # STS: the STS-B multi-MT train pairs with 0-5 scores in each of its languages (monolingual pairs: cross-lingual
    # ones cost monolingual STS at small scale, see README).
    pairs = stsb_train_rows(root)
    rng.shuffle(pairs)
    for s1, s2, score, lang in _take(iter(pairs), max_per_task):
        add("sts", s1=s1, s2=s2, score=score, lang=lang)
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
