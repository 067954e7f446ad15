"""Synthetic weak pairs at any scale, from the real English vocabulary of XQuAD, for scale tests and benchmarks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from conan.data.public_sets import xquad_rows


def vocabulary(data_root: str | Path) -> list[str]:
    """The words of the English XQuAD paragraphs (letters only, lower-cased, distinct, sorted)."""
    words = {w.lower() for r in xquad_rows(Path(data_root), "en", "all") for w in re.findall(r"[A-Za-z]+", r["context"])}
    return sorted(words)


def write_pairs(data_root: str | Path, out_dir: str | Path, rows: int, files: int = 8, seed: int = 0,
                query_words: int = 8, positive_words: int = 40) -> list[Path]:
    """JSONL shards of random word sequences as (query, positive, source, lang) rows; returns the files."""
    words, rng = vocabulary(data_root), random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"pairs-{i:03d}.jsonl" for i in range(files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    try:
        for n in range(rows):
            row = {"query": " ".join(rng.choices(words, k=query_words)),
                   "positive": " ".join(rng.choices(words, k=positive_words)), "source": "synthetic", "lang": "en"}
            handles[n % files].write(json.dumps(row) + "\n")
    finally:
        for h in handles:
            h.close()
    return paths
