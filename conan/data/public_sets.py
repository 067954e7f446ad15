"""Readers of the public datasets Conan trains and evaluates on, each with its train / dev split.

The dev split (what the dev evaluation scores) never enters a training input: XQuAD's articles with index % 4 == 3
(12 of 48, 60 paragraphs, each question in 12 languages), the first TATOEBA_DEV_LINES lines of every Tatoeba pair,
and the CSL titles of cls_ctg's test split (every one of them is also a title in CSL's abstract → title task).
STS-B and Banking77 are split by their files (train for training, test for evaluation).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Literal

XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
Split = Literal["train", "dev", "all"]
XQUAD_DEV_EVERY = 4  # article a is dev when a % 4 == 3
TATOEBA_DEV_LINES = 300


def is_dev_article(article: int) -> bool:
    """Whether an XQuAD article (its index in the file) belongs to the held-out dev split."""
    return article % XQUAD_DEV_EVERY == XQUAD_DEV_EVERY - 1


def in_split(dev: bool, split: Split) -> bool:
    """Whether an item that is (or is not) dev belongs to `split`."""
    return split == "all" or dev == (split == "dev")


def xquad_rows(root: Path, lang: str, split: Split) -> list[dict]:
    """XQuAD questions of a split with their paragraph and article index; ids are shared across languages."""
    rows = []
    data = json.loads((root / "xquad" / f"xquad.{lang}.json").read_text(encoding="utf-8"))["data"]
    for a, article in enumerate(data):
        if not in_split(is_dev_article(a), split):
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "question": qa["question"], "context": paragraph["context"],
                             "article": a})
    return rows


def tatoeba_lines(path: Path, split: Split) -> list[str]:
    """Lines of one side of a Tatoeba pair in a split (line numbers align the two sides)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for i, line in enumerate(lines) if in_split(i < TATOEBA_DEV_LINES, split)]


def stsb_rows(root: Path, split: str, lang: str | None = None) -> list[tuple[str, str, float, str]]:
    """(sentence1, sentence2, score 0-5, lang) of the STS-B multi-MT file(s) of a split (its files: train, dev, test),
    every language in file-name order or only `lang`; rows are aligned across languages."""
    rows = []
    for path in sorted((root / "stsb_multi_mt" / "data").glob(f"stsb-{lang or '*'}-{split}.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            rows += [(r[0], r[1], float(r[2]), path.name.split("-")[1]) for r in csv.reader(f) if len(r) == 3]
    return rows


def stsb_langs(root: Path, split: str) -> list[str]:
    """The languages of the STS-B multi-MT files of a split, sorted."""
    return sorted(p.name.split("-")[1] for p in (root / "stsb_multi_mt" / "data").glob(f"stsb-*-{split}.csv"))


def stsb_train_rows(root: Path) -> list[tuple[str, str, float, str]]:
    """The STS-B train rows of every language, without the sentence pairs its test files repeat (131 of 63,239 in
    stsb_multi_mt): a pair the evaluation scores is never trained on."""
    scored = {(s1, s2) for s1, s2, _, _ in stsb_rows(root, "test")}
    return [row for row in stsb_rows(root, "train") if row[:2] not in scored]


def csl_rows(root: Path, task: str, split: str) -> list[tuple[str, str]]:
    """(input, target) rows of a CSL benchmark task file (ts, cls_ctg, …; split = its file: train, dev, test)."""
    with (root / "csl_zh" / "benchmark" / task / f"{split}.tsv").open(encoding="utf-8", newline="") as f:
        return [(r[1], r[2]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) == 3]


def csl_dev_titles(root: Path) -> set[str]:
    """The titles the dev evaluation classifies (cls_ctg test): training inputs drop every text equal to one."""
    return {title for title, _ in csl_rows(root, "cls_ctg", "test")}


def csl_title_pairs(root: Path, splits: tuple[str, ...] = ("dev",)) -> list[tuple[str, str]]:
    """CSL (abstract, title) pairs of the given files whose title is not a dev title."""
    dev = csl_dev_titles(root)
    return [(a, t) for split in splits for a, t in csl_rows(root, "ts", split) if t not in dev]


def csl_keyword_pairs(root: Path) -> list[tuple[str, str]]:
    """CSL (abstract, keywords) pairs of the kg dev file, without the papers whose title is a dev title."""
    dev = csl_dev_titles(root)
    dev_abstracts = {a for split in ("dev", "test") for a, t in csl_rows(root, "ts", split) if t in dev}
    return [(a, k) for a, k in csl_rows(root, "kg", "dev") if a not in dev_abstracts]


def held_out_texts(root: Path) -> set[str]:
    """Every text of the dev split that is ours to keep out (stripped): XQuAD's dev questions and paragraphs in every
    language, both sides of every Tatoeba pair's dev lines and CSL's dev titles. A sentence can recur elsewhere (an
    English Tatoeba line in another pair's train lines, a title in another file): inputs drop every copy."""
    texts = {t for lang in XQUAD_LANGS for r in xquad_rows(root, lang, "dev") for t in (r["question"], r["context"])}
    texts |= {line for path in (root / "tatoeba").glob("tatoeba.*-eng.*") for line in tatoeba_lines(path, "dev")}
    return {t.strip() for t in texts | csl_dev_titles(root)}


def stsb_aligned(root: Path, split: str) -> Iterator[tuple[str, list, list]]:
    """(language, English rows, that language's rows) for each translated STS-B file of a split that aligns row for
    row with the English one."""
    english = stsb_rows(root, split, "en")
    for lang in (lang for lang in stsb_langs(root, split) if lang != "en"):  # English is read once, above
        translated = stsb_rows(root, split, lang)
        if len(translated) == len(english):
            yield lang, english, translated


def stsb_cross_train_rows(root: Path) -> list[tuple[str, str, float, str]]:
    """Cross-lingual STS-B train rows, for each translated language X: (English sentence1, sentence2 in X, score, X)
    and (sentence1 in X, English sentence2, score, "en"). A row whose pair the test files score, in either language,
    is left out."""
    scored = {(s1, s2) for s1, s2, _, _ in stsb_rows(root, "test")}
    rows = []
    for lang, english, translated in stsb_aligned(root, "train"):
        for (e1, e2, score, _), (t1, t2, _, _) in zip(english, translated):
            if (e1, e2) not in scored and (t1, t2) not in scored:
                rows += [(e1, t2, score, lang), (t1, e2, score, "en")]
    return rows
