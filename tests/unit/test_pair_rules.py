"""The weak-pair cleaner's per-row rules, computed over whole batches (no Ray): each equals its row-by-row
definition."""

from __future__ import annotations

import re
from dataclasses import asdict

import numpy as np
import pytest

from conan.config import CurationConfig
from conan.data.langid import LanguageIdentifier
from conan.data.weak import PairCleaner, longest_runs, normalise


def test_longest_runs_counts_characters_within_each_text():
    texts = ["", "abc", "aab", "ééé x", "x" + "🙂" * 5, "aa", "aa", "", "ab" * 40 + "c" * 16]
    assert longest_runs(texts).tolist() == [0, 1, 2, 3, 5, 2, 2, 0, 16]  # runs never join across texts
    assert longest_runs([]).tolist() == [] and longest_runs(["", ""]).tolist() == [0, 0]


def test_normalise_is_nfkc_with_every_unicode_whitespace_run_as_one_space():
    assert normalise("  ﬁne\u00a0\u2003tab\there\n\x1c end ") == "fine tab here end"
    spaces = [chr(c) for c in range(0x3000 + 1) if re.match(r"\s", chr(c))]
    assert normalise("a" + "".join(spaces) + "b") == "a b"


@pytest.fixture(scope="module")
def cleaner(tmp_path_factory):
    """A cleaner with a blocklist and an (untrained) identifier: the rules under test do not read it."""
    path = tmp_path_factory.mktemp("langid") / "langid.npz"
    LanguageIdentifier(["en", "de"], np.zeros((2, 1 << 16), dtype=np.float32), np.zeros(2, np.float32)).save(path)
    cfg = CurationConfig(inputs=[], output_dir="unused", blocklist=["lorem ipsum"], query_chars=[2, 20],
                         positive_chars=[5, 60])
    return PairCleaner(asdict(cfg), str(path))


def test_rule_reasons_give_the_first_rule_each_pair_breaks(cleaner):
    pairs = [("ok query", "a fine passage"),                # kept
             ("q", "x" * 100),                              # both lengths broken: the query's comes first
             ("ok query", "abc"),                           # positive too short
             ("ok query", "y" * 61),                        # positive too long (and a run: length comes first)
             ("a" * 16, "a fine passage"),                  # a run of max_char_run in the query
             ("ok query", "fine " + "!" * 15 + " text"),    # a run one short: kept
             ("what is lorem ipsum", "a fine passage"),     # blocklisted
             ("what is lorem ipsum", "zzzzzzzzzzzzzzzz")]   # a run and a blocked phrase: the run comes first
    reasons = cleaner.rule_reasons([q for q, _ in pairs], [p for _, p in pairs]).tolist()
    assert reasons == ["", "too_short:query", "too_short:positive", "too_long:positive", "repeated_chars", "",
                       "blocklist", "repeated_chars"]


def test_judge_equals_the_top_k_and_margin_definition(data_root):
    """One scoring pass answers both questions as the definition does, with ranks from a full sort."""
    from conan.data.langid import tatoeba_sentences

    langid = LanguageIdentifier.train(data_root)
    texts = [t for lang in ("en", "de", "fr", "zh", "ar", "ru") for t in tatoeba_sentences(data_root, lang)[:150]]
    rng = np.random.default_rng(0)
    declared = [None if r < 0.2 else "xx" if r < 0.3 else str(rng.choice(langid.languages))
                for r in rng.random(len(texts))]
    for k, margin in ((1, 10.0), (2, 10.0), (3, 2.0)):
        best, plausible = langid.judge(texts, declared, k, margin)
        scores = langid.scores(texts)
        assert best == langid.predict(texts)
        for i, lang in enumerate(declared):
            j = langid.languages.index(lang or best[i]) if (lang or best[i]) in langid.languages else None
            expected = j is None or (j in np.argsort(-scores[i])[:k] and scores[i].max() - scores[i, j] <= margin)
            assert plausible[i] == expected, (texts[i], lang, k, margin)
        assert 0 < plausible.mean() < 1


def test_an_sft_record_without_its_output_is_named_by_what_it_lacks():
    """Curation reads SFT records as pairs (input → query, output → positive): one without its output lacks the
    positive (it was reported as missing its query)."""
    from conan.data.schemas import validate
    from conan.data.weak import sft_to_weak_pair

    assert validate("weak_pair", sft_to_weak_pair({"input": "a question"})) == (None, "missing_field:positive")
    assert validate("weak_pair", sft_to_weak_pair({"input": "q", "output": "p", "lang": "en"}))[0] == {
        "query": "q", "positive": "p", "source": "sft", "lang": "en"}
