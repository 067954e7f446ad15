"""BM25 (Robertson & Zaragoza 2009) as the lexical baseline for retrieval tasks, scored by `bm25s` (Lucene variant):

    score(q, d) = Σ_{t ∈ q} idf(t) · tf(t, d) / (tf(t, d) + k1 · (1 − b + b · |d| / avgdl))
    idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

Okapi's (k1 + 1) factor is left out as Lucene does: a constant that changes no ranking.
Tokens are ours, not bm25s's English tokenizer: lower-cased words, and single characters for CJK / Thai scripts
(no spaces between words), so every language of the evaluation is split into terms. A word keeps its combining marks
(Hindi's vowel signs and virama, Arabic's diacritics), which `re`'s \\w does not match: split there, Hindi words
fell apart into consonants.
"""

from __future__ import annotations

import numpy as np
import regex

TOKEN = regex.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[\w\p{M}]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; CJK and Thai characters one by one."""
    return TOKEN.findall(text.lower())


class BM25:
    """A `bm25s` index over a list of documents."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.index, self.num_documents = bm25s.BM25(k1=k1, b=b, method="lucene"), len(documents)
        self.index.index([tokenize(d) for d in documents], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for the query (all 0 for a query without a word: punctuation, emoji)."""
        terms = tokenize(query)
        return self.index.get_scores(terms) if terms else np.zeros(self.num_documents, dtype=np.float32)

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the k best documents, best first (ties by index)."""
        return np.argsort(-self.scores(query), kind="stable")[:k].tolist()
