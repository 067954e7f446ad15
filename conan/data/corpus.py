"""Multilingual plain-text corpus drawn from the real datasets (the bundled copies or $CONAN_DATA_ROOT).

Used to train the tokenizer and to pretrain the tiny LLM. Each row is (text, lang, source). Only the train split
of each set (conan.data.stage_data: no dev XQuAD article, Tatoeba dev line or CSL dev title).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from conan.config import ConfigError
from conan.data.public_sets import (XQUAD_LANGS, csl_title_pairs, held_out_texts, stsb_rows, tatoeba_lines,
                                   xquad_rows)

CORPUS_SCHEMA = pa.schema([("text", pa.string()), ("lang", pa.string()), ("source", pa.string())])


def _tatoeba(root: Path) -> Iterator[tuple[str, str, str]]:
    for path in sorted((root / "tatoeba").glob("tatoeba.*-eng.*")):
        lang = path.suffix.lstrip(".")
        if lang == "eng" and not path.name.startswith("tatoeba.deu-eng"):
            continue  # the English side repeats across pairs; keep one copy
        for line in tatoeba_lines(path, "train"):
            yield line.strip(), lang, "tatoeba"


def _xquad(root: Path) -> Iterator[tuple[str, str, str]]:
    for lang in XQUAD_LANGS:
        rows = xquad_rows(root, lang, "train")
        for paragraph in dict.fromkeys(r["context"] for r in rows):
            yield paragraph, lang, "xquad"
        for r in rows:
            yield r["question"], lang, "xquad"


def _stsb(root: Path) -> Iterator[tuple[str, str, str]]:
    for s1, s2, _, lang in stsb_rows(root, "train"):
        yield s1, lang, "stsb_multi_mt"
        yield s2, lang, "stsb_multi_mt"


def _csl(root: Path) -> Iterator[tuple[str, str, str]]:
    for abstract, title in csl_title_pairs(root, ("dev", "test")):
        yield abstract, "zh", "csl"
        yield title, "zh", "csl"


def _banking77(root: Path) -> Iterator[tuple[str, str, str]]:
    with (root / "banking77" / "banking_data" / "train.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["text"], "en", "banking77"


SOURCES = {"tatoeba": _tatoeba, "xquad": _xquad, "stsb_multi_mt": _stsb, "csl": _csl, "banking77": _banking77}


def iter_corpus(root: str | Path, sources: list[str] | None = None,
                max_per_source: int | None = None) -> Iterator[tuple[str, str, str]]:
    """Yield (text, lang, source) from the named datasets under `root`, skipping empty lines and every copy of a
    held-out text (conan.data.public_sets.held_out_texts)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (set data.root or $CONAN_DATA_ROOT)")
    if unknown := sorted(set(sources or []) - set(SOURCES)):
        raise ConfigError(f"unknown corpus source {unknown[0]!r}; known: {sorted(SOURCES)}")
    if max_per_source is not None and max_per_source < 1:
        raise ConfigError(f"the cap on texts per source must be at least 1, got {max_per_source}")
    held_out = held_out_texts(root)
    for name in sources or list(SOURCES):
        count = 0
        for text, lang, source in SOURCES[name](root):
            if text and text.strip() not in held_out:
                yield text, lang, source
                count += 1
                if max_per_source is not None and count >= max_per_source:
                    break


def write_corpus(root: str | Path, out_path: str | Path, sources: list[str] | None = None,
                 max_per_source: int | None = None, seed: int = 0) -> int:
    """Write the corpus to one parquet file in a seeded random order and return its row count (a reader streams a
    shard at a time, so every shard must mix the sources)."""
    rows = list(iter_corpus(root, sources, max_per_source))
    random.Random(seed).shuffle(rows)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    texts, langs, srcs = zip(*rows) if rows else ((), (), ())
    partial = out_path.with_name(out_path.name + ".partial")  # whole or absent: the pipeline skips a corpus that is
    pq.write_table(pa.table({"text": list(texts), "lang": list(langs), "source": list(srcs)},
                            schema=CORPUS_SCHEMA), partial)
    partial.rename(out_path)
    return len(rows)
