"""Language identification per row: multinomial naive Bayes over hashed character 1-3-grams, trained on Tatoeba.

Trained locally in a few seconds from the real Tatoeba sentences in the data root (CC BY 2.0 FR), so nothing is
downloaded. It covers the 26 languages of the paper's Table 7 plus the other XQuAD languages (el, ro).
Featurisation is vectorised over a whole batch in numpy (code points → n-gram hashes → a sparse count matrix),
and scoring is one sparse × dense product, so it costs a few microseconds a row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conan.data.public_sets import Split, tatoeba_lines

# ISO 639-1 → Tatoeba file code.
TATOEBA_CODES = {
    "ar": "ara", "bn": "ben", "da": "dan", "de": "deu", "el": "ell", "es": "spa", "fi": "fin", "fr": "fra",
    "he": "heb", "hi": "hin", "hu": "hun", "it": "ita", "ja": "jpn", "km": "khm", "ko": "kor", "ms": "zsm",
    "nl": "nld", "no": "nob", "pl": "pol", "pt": "por", "ro": "ron", "ru": "rus", "sv": "swe", "th": "tha",
    "tr": "tur", "vi": "vie", "zh": "cmn",
}
N_FEATURES = 1 << 16
MAX_CHARS = 200  # the start of a text says its language; the rest only costs time


def char_ngram_counts(texts: list[str]):
    """(len(texts), N_FEATURES) sparse counts of the hashed 1-, 2- and 3-grams of each lower-cased text (first
    MAX_CHARS characters, padded with a space on both sides so word edges count)."""
    from scipy.sparse import csr_matrix

    from conan.data.dedup import _mix64

    padded = [f" {t[:MAX_CHARS].lower()} " for t in texts]
    codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    lengths = np.array([len(t) for t in padded], dtype=np.int64)
    row_of = np.repeat(np.arange(len(texts)), lengths)
    position = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    # one row of three n-gram hashes per position (n = 1, 2, 3 starting there), flattened position-major so the
    # entries stay grouped by text: the CSR matrix is built directly, without a sort
    remaining = lengths[row_of] - position
    hashes = np.zeros((len(codes), 3), dtype=np.uint64)
    h = np.zeros(len(codes), dtype=np.uint64)
    for n in range(3):
        shifted = np.zeros(len(codes), dtype=np.uint64)
        shifted[:len(codes) - n] = codes[n:]
        h = h * np.uint64(1_000_003) + shifted
        hashes[:, n] = h + np.uint64((n + 1) << 40)
    valid = remaining[:, None] >= np.arange(1, 4)[None, :]
    cols = (_mix64(hashes[valid]) % np.uint64(N_FEATURES)).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of, weights=valid.sum(axis=1), minlength=len(texts)))])
    return csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr.astype(np.int64)),
                      shape=(len(texts), N_FEATURES))


def tatoeba_pairs(root: str | Path, lang: str, split: Split = "all") -> list[tuple[str, str]]:
    """Aligned (sentence in lang, English sentence) pairs of Tatoeba; lines empty on either side are skipped."""
    code = TATOEBA_CODES[lang]
    base = Path(root) / "tatoeba" / f"tatoeba.{code}-eng"
    foreign, english = (tatoeba_lines(Path(f"{base}.{side}"), split) for side in (code, "eng"))
    return [(f.strip(), e.strip()) for f, e in zip(foreign, english) if f.strip() and e.strip()]


def tatoeba_sentences(root: str | Path, lang: str) -> list[str]:
    """Tatoeba sentences of one language (English from the eng side of the German file); the identifier learns
    from every line (it is a data filter, not the model under evaluation)."""
    return [e for _, e in tatoeba_pairs(root, "de")] if lang == "en" else [f for f, _ in tatoeba_pairs(root, lang)]


class LanguageIdentifier:
    """Predicts ISO 639-1 codes; `top_k` gives the k most likely languages of each text."""

    def __init__(self, languages: list[str], log_prob: np.ndarray, log_prior: np.ndarray):
        self.languages, self.log_prob, self.log_prior = list(languages), log_prob, log_prior

    @classmethod
    def train(cls, root: str | Path, languages: list[str] | None = None, smoothing: float = 0.1):
        """Fit on Tatoeba (every language with a uniform prior: the text decides, not the corpus sizes)."""
        languages = sorted(languages or ["en", *TATOEBA_CODES])
        counts = np.zeros((len(languages), N_FEATURES), dtype=np.float64)
        for i, lang in enumerate(languages):
            counts[i] = np.asarray(char_ngram_counts(tatoeba_sentences(root, lang)).sum(axis=0)).ravel()
        counts += smoothing
        log_prob = np.log(counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)
        return cls(languages, log_prob, np.zeros(len(languages), dtype=np.float32))

    def scores(self, texts: list[str]) -> np.ndarray:
        """(len(texts), languages) log-likelihoods."""
        return np.asarray(char_ngram_counts(texts) @ self.log_prob.T) + self.log_prior

    def top_k(self, texts: list[str], k: int = 1) -> list[list[str]]:
        """The k most likely languages of every text, best first."""
        if not texts:
            return []
        best = np.argsort(-self.scores(texts), axis=1)[:, :k]
        return [[self.languages[j] for j in row] for row in best]

    def judge(self, texts: list[str], declared: list[str | None], k: int = 2,
              margin: float = 10.0) -> tuple[list[str], np.ndarray]:
        """Each text's most likely language, and whether its declared one (None: that best one) could be the
        text's: among the top k and within `margin` nats of the best. A language the model does not know is
        always plausible. One scoring pass serves both answers."""
        if not texts:
            return [], np.zeros(0, dtype=bool)
        scores = self.scores(texts)
        best = scores.argmax(axis=1)
        index = {lang: j for j, lang in enumerate(self.languages)}
        claimed = np.array([best[i] if lang is None else index.get(lang, -1) for i, lang in enumerate(declared)])
        known = claimed >= 0
        own = scores[np.arange(len(texts)), np.where(known, claimed, 0)]
        ahead = (scores > own[:, None]).sum(axis=1)  # languages scoring strictly above the declared one
        ok = (ahead < k) & (scores[np.arange(len(texts)), best] - own <= margin)
        return [self.languages[j] for j in best], ~known | ok

    def predict(self, texts: list[str]) -> list[str]:
        """The most likely language of every text."""
        return [row[0] for row in self.top_k(texts, 1)]

    def save(self, path: str | Path) -> None:
        """Write the model as one .npz file."""
        np.savez_compressed(path, languages=np.array(self.languages), log_prob=self.log_prob,
                            log_prior=self.log_prior)

    @classmethod
    def load(cls, path: str | Path):
        """Read a model save() wrote."""
        data = np.load(path)
        return cls([str(x) for x in data["languages"]], data["log_prob"], data["log_prior"])
