"""Our language identifier and MinHash against the maintained libraries that do the same job, on real text.

  language id   every XQuAD question (train and dev articles) in its 12 languages, labelled by its file:
                conan.data.langid (char n-gram naive Bayes trained on Tatoeba, every language it knows) vs py3langid
                (langid.py's model, its 97 languages), accuracy and µs per text (ours in batches of 2048, as the
                curation actors call it; py3langid one text a call, its only API)
  near dedup    STS-B multi-MT sentences and XQuAD paragraphs; each gets a near copy (about 1 word in 12 replaced;
                the bench prints the copies' shingle Jaccard) and must be found, while 1,000 unrelated texts must not:
                conan.data.dedup.MinHasher (one-permutation hashing, 64 hashes in 8 bands, vectorised over a batch)
                vs datasketch (MinHash of 64 permutations + MinHashLSH at the same bands and rows, one text a call),
                both over the same 8-byte shingles; recall, false positives and µs per text

Needs `pip install py3langid datasketch` (not dependencies of the platform). Last line:
`libraries langid_acc=<ours> py3langid_acc=<…> langid_speedup=<their µs ÷ ours> minhash_recall=<ours>
datasketch_recall=<…> minhash_speedup=<…>`.

    python bench/libraries.py [--texts 3000]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from conan.config import default_data_root
from conan.data.dedup import MinHasher
from conan.data.langid import LanguageIdentifier
from conan.data.public_sets import XQUAD_LANGS, stsb_rows, xquad_rows


def timed(fn, *args) -> tuple[object, float]:
    """(fn's result, seconds)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def language_id(root) -> dict:
    """Accuracy and µs a text of both identifiers on the XQuAD questions."""
    import py3langid

    texts, labels = [], []
    for lang in XQUAD_LANGS:
        for split in ("train", "dev"):
            rows = xquad_rows(root, lang, split)
            texts += [r["question"] for r in rows]
            labels += [lang] * len(rows)
    ours = LanguageIdentifier.train(root)
    predicted, ours_s = timed(lambda: [p for i in range(0, len(texts), 2048) for p in ours.predict(texts[i:i + 2048])])
    theirs, theirs_s = timed(lambda: [py3langid.classify(t)[0] for t in texts])
    normalise = {"zh-cn": "zh", "zh-tw": "zh"}
    per_lang = {lang: (np.mean([p == lang for p, y in zip(predicted, labels) if y == lang]),
                       np.mean([normalise.get(p, p) == lang for p, y in zip(theirs, labels) if y == lang]))
                for lang in XQUAD_LANGS}
    return {"texts": len(texts), "ours_acc": float(np.mean([p == y for p, y in zip(predicted, labels)])),
            "theirs_acc": float(np.mean([normalise.get(p, p) == y for p, y in zip(theirs, labels)])),
            "ours_us": 1e6 * ours_s / len(texts), "theirs_us": 1e6 * theirs_s / len(texts), "per_lang": per_lang}


def near_copy(text: str, rng: random.Random, rate: float = 1 / 12) -> str:
    """The text with about `rate` of its words replaced by another of its words (a light edit, as a re-crawl or a
    template makes)."""
    words = text.split()
    return " ".join(rng.choice(words) if rng.random() < rate else w for w in words)


def shingles(text: str, k: int = 8) -> list[bytes]:
    """Overlapping k-byte shingles of the UTF-8 text, as MinHasher takes them (short texts: one padded shingle)."""
    data = text.encode("utf-8")
    data = data if len(data) >= k else data.ljust(k, b"\0")
    return [data[i:i + k] for i in range(len(data) - k + 1)]


def near_dedup(root, n: int, seed: int = 0) -> dict:
    """Recall on near copies, false positives on unrelated texts and µs a text, ours vs datasketch."""
    from datasketch import MinHash, MinHashLSH

    rng = random.Random(seed)
    pool = sorted({s for s1, s2, _, _ in stsb_rows(root, "train") for s in (s1, s2) if len(s.split()) >= 12} |
                  {r["context"] for lang in ("en", "de", "zh") for r in xquad_rows(root, lang, "train")})
    rng.shuffle(pool)
    originals, unrelated = pool[:n], pool[n:n + 1000]
    copies = [near_copy(t, rng) for t in originals]
    everything = originals + unrelated + copies  # originals and unrelated texts first, then the copies that must hit

    hasher = MinHasher()
    keys, ours_s = timed(lambda: np.concatenate([hasher.band_keys(everything[i:i + 2048])
                                                 for i in range(0, len(everything), 2048)]))
    seen: set[int] = set()
    hit = []
    for row in keys:
        hit.append(any(int(k) in seen for k in row))
        seen.update(int(k) for k in row)
    ours = np.array(hit)

    def datasketch_hits():
        lsh = MinHashLSH(num_perm=64, params=(8, 8))
        found = []
        for i, text in enumerate(everything):
            m = MinHash(num_perm=64, seed=1)
            m.update_batch(shingles(text))
            found.append(bool(lsh.query(m)))
            lsh.insert(str(i), m)
        return np.array(found)
    theirs, theirs_s = timed(datasketch_hits)
    m = len(originals) + len(unrelated)
    jaccard = [len(set(shingles(a)) & set(shingles(b))) / len(set(shingles(a)) | set(shingles(b)))
               for a, b in zip(originals, copies)]
    return {"texts": len(everything), "jaccard": (float(np.median(jaccard)), float(np.mean(np.array(jaccard) >= 0.77))), "ours_recall": float(ours[m:].mean()), "theirs_recall": float(theirs[m:].mean()),
            "ours_fp": int(ours[:m].sum()), "theirs_fp": int(theirs[:m].sum()),
            "ours_us": 1e6 * ours_s / len(everything), "theirs_us": 1e6 * theirs_s / len(everything)}


def main() -> None:
    """Run both comparisons and print the table and the last line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=3000, help="originals with a near copy each")
    parser.add_argument("--data-root", default=default_data_root())
    args = parser.parse_args()
    root = Path(args.data_root)
    lid = language_id(root)
    print(f"language id on {lid['texts']} XQuAD questions: ours {lid['ours_acc']:.4f} at {lid['ours_us']:.1f} µs, "
          f"py3langid {lid['theirs_acc']:.4f} at {lid['theirs_us']:.1f} µs")
    for lang, (o, t) in lid["per_lang"].items():
        print(f"  {lang}: ours {o:.3f} py3langid {t:.3f}")
    dd = near_dedup(root, args.texts)
    print(f"near copies: median shingle Jaccard {dd['jaccard'][0]:.3f}, {100 * dd['jaccard'][1]:.1f}% at or above 0.77 "
          "(the bands' threshold)")
    print(f"near dedup over {dd['texts']} texts: ours recall {dd['ours_recall']:.4f}, {dd['ours_fp']} hits among the "
          f"originals and unrelated texts, {dd['ours_us']:.1f} µs; datasketch recall {dd['theirs_recall']:.4f}, "
          f"{dd['theirs_fp']} hits, {dd['theirs_us']:.1f} µs (some STS-B sentences are near copies of another)")
    print(f"libraries langid_acc={lid['ours_acc']:.4f} py3langid_acc={lid['theirs_acc']:.4f} "
          f"langid_speedup={lid['theirs_us'] / lid['ours_us']:.1f} minhash_recall={dd['ours_recall']:.4f} "
          f"datasketch_recall={dd['theirs_recall']:.4f} minhash_speedup={dd['theirs_us'] / dd['ours_us']:.1f}")


if __name__ == "__main__":
    main()
