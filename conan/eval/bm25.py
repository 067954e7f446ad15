"""BM25 (Robertson & Zaragoza 2009, Okapi weighting) as the lexical baseline for retrieval tasks.

    score(q, d) = Σ_{t ∈ q} idf(t) · tf(t, d) · (k1 + 1) / (tf(t, d) + k1 · (1 − b + b · |d| / avgdl))
    idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

Tokens: lower-cased words, and single characters for CJK / Thai scripts (no spaces between words).
"""

from __future__ import annotations

import math
import re
from collections import Counter

TOKEN = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; CJK and Thai characters one by one."""
    return TOKEN.findall(text.lower())


class BM25:
    """An in-memory BM25 index over a list of documents."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avgdl = sum(self.lengths) / max(len(self.docs), 1)
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        """BM25 score of every document for the query."""
        terms = tokenize(query)
        out = []
        for counts, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            out.append(sum(self.idf.get(t, 0.0) * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                           for t in terms if t in counts))
        return out

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the k best documents, best first (ties by index)."""
        scores = self.scores(query)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
