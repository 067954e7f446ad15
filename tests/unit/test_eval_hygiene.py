"""Evaluation hygiene: no text the dev evaluation scores reaches any training input the demo source writes (the
pretraining corpus, SFT / weak pairs, supervised rows, DHNM's passages), whichever dataset a copy of it comes from."""

from __future__ import annotations

import pytest

from conan.data.public_sets import held_out_texts, stsb_rows
from conan.data.stage_data import PARAPHRASE_SCORE, pair_records, pretrain_records, supervised_records, xquad_corpus


def _texts(rows: list[dict], columns: tuple[str, ...]) -> set[str]:
    out = set()
    for row in rows:
        for column in columns:
            value = row.get(column)
            out |= {v.strip() for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)}
    return out


@pytest.fixture(scope="module")
def held_out(data_root):
    return held_out_texts(data_root)


def test_held_out_texts_cover_every_dev_split(held_out, data_root):
    from conan.eval.tasks import csl_categories, tatoeba, xquad_retrieval

    xquad = xquad_retrieval(data_root, None, None)
    assert {t.strip() for r in xquad.values() for t in [*r.queries.values(), *r.corpus.values()]} <= held_out
    bitext = tatoeba(data_root, None, None)
    assert {t.strip() for b in bitext.values() for t in [*b.source, *b.target]} <= held_out
    assert {t.strip() for t in csl_categories(data_root, None, None)["zh"].test_texts} <= held_out


def test_no_training_input_holds_a_held_out_text(held_out, data_root):
    """Tatoeba's English sides repeat across pairs: a dev line of one pair is a train line of another (215 such
    sentences reached the pretraining corpus before it dropped every copy)."""
    inputs = {"documents": _texts(pretrain_records(data_root), ("text",)),
              "pairs": _texts(pair_records(data_root), ("instruction", "input", "output")),
              "tasks": _texts(supervised_records(data_root), ("query", "positive", "negatives", "s1", "s2")),
              "passages": {t.strip() for t in xquad_corpus(data_root)}}
    assert all(texts for texts in inputs.values())
    assert {kind: sorted(texts & held_out)[:3] for kind, texts in inputs.items()} == {kind: [] for kind in inputs}


def test_weak_pairs_take_sts_b_train_paraphrases_only(data_root):
    """STS-B pairs join the weak pairs when scored ≥ 4 of 5 (same meaning), from the train files only; no pair the
    test files score (the MT set repeats 131 of them in train) is a weak pair or a supervised STS row."""
    pairs = {(r["input"], r["output"], r["lang"]) for r in pair_records(data_root) if r["source"] == "stsb"}
    train = stsb_rows(data_root, "train")
    test = {(s1, s2) for s1, s2, *_ in stsb_rows(data_root, "test")}
    assert pairs == {(s1, s2, lang) for s1, s2, score, lang in train if score >= PARAPHRASE_SCORE
                     and (s1, s2) not in test}
    assert len({lang for *_, lang in pairs}) == 11 and len(pairs) > 10_000
    sts = {(r["s1"], r["s2"]) for r in supervised_records(data_root) if r["task"] == "sts"}
    assert len(sts) > 50_000 and not sts & test and not {(s1, s2) for s1, s2, _ in pairs} & test


def test_cross_lingual_weak_pairs_join_english_to_a_translated_paraphrase(data_root):
    """Each STS-B train paraphrase (≥ 4 of 5) also pairs its English sentence with the other sentence's translation
    and back, in the 10 translated languages; a pair scored < 4 does not, and no pair the cross-lingual evaluation
    scores (English test sentence1 × translated sentence2) is trained on."""
    from conan.eval.tasks import stsb_cross

    rows = [r for r in pair_records(data_root) if r["source"] == "stsb-cross"]
    pairs = {(r["input"], r["output"], r["lang"]) for r in rows}
    assert 27_000 < len(pairs) <= len(rows) < 28_200  # a few rows repeat (curation drops the copies)
    assert ("A plane is taking off.", "Ein Flugzeug hebt gerade ab.", "de") in pairs  # 5.0
    assert ("Ein Flugzeug hebt gerade ab.", "An air plane is taking off.", "en") in pairs
    assert not any(p[0] == "A man is playing a large flute." for p in pairs)  # 3.8
    langs = [r["lang"] for r in rows]
    assert len(set(langs)) == 11 and langs.count("en") == len(rows) // 2
    scored = {(a, b) for sts in stsb_cross(data_root, None, None).values() for a, b in zip(sts.left, sts.right)}
    assert len(scored) > 10_000 and not {(a, b) for a, b, _ in pairs} & scored


def test_every_configurable_task_has_a_loader():
    """The config checks task names when it loads (EvalConfig.tasks); the runner loads by the same names."""
    from conan.config import EVAL_TASKS
    from conan.eval.tasks import LOADERS

    assert sorted(EVAL_TASKS) == sorted(LOADERS)
