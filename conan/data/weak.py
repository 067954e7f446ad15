"""Weak-pair curation on Ray Data (paper §3.1.2 and Table 10): a streaming pipeline with bounded memory.

    read (JSONL lines / parquet rows; SFT records become pairs: input → query, output → positive)
    → PairCleaner actors: normalise (NFKC, whitespace), length bounds, repeated characters, blocklist, language id,
      exact key and MinHash band keys
    → dedup tasks: exact then near duplicates against the sharded DedupShard actors
    → PairScorer actors (optional): cosine of query and positive with an embedding model, keep ≥ min_score (0.4)
    → sink: parquet shards of kept pairs and of rejects (with the reason), counts per outcome → stats.json

Every input row ends as exactly one outcome: kept, or one reject reason (bad_json, bad_utf8, missing_field:*,
empty_text:*, wrong_type:*, invalid_unicode:*, not_finite:*, too_short:*, too_long:*, repeated_chars, blocklist,
wrong_language, language_not_allowed, exact_duplicate, near_duplicate, low_score).
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from conan.config import CurationConfig, from_dict, require_paths
from conan.data.dedup import DedupShard, MinHasher, exact_keys, first_seen
from conan.data.faults import die_once_on
from conan.data.langid import LanguageIdentifier
from conan.data.schemas import read_records
from conan.data.sink import run_and_count, start_step, write_stats

PAIR_SCHEMA = pa.schema([("query", pa.string()), ("positive", pa.string()), ("source", pa.string()),
                         ("lang", pa.string()), ("score", pa.float32())])


def sft_to_weak_pair(row: dict) -> dict:
    """An SFT record (instruction, input, output) as a weak pair (input → output); other rows pass through unchanged.
    The instruction is the generative task's prompt: embedding queries carry none, as the evaluation, the server and
    sentence-transformers encode bare text."""
    if "positive" in row or "query" in row or not ("input" in row or "output" in row):
        return row
    # An SFT record missing its output is `missing_field:positive`, not a pair missing its query.
    return {"query": row.get("input"), "positive": row.get("output"), "source": row.get("source") or "sft",
            "lang": row.get("lang")}


def normalise(text: str) -> str:
    """NFKC, every whitespace run as one space, no leading/trailing space."""
    # str.split() splits on the characters regex \s matches (both use Unicode's whitespace), several times faster
    return " ".join(unicodedata.normalize("NFKC", text).split())


def longest_runs(texts: list[str]) -> np.ndarray:
    """The longest run of one repeated character in each text (0 for an empty one), over the whole batch at once."""
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    longest = np.zeros(len(texts), dtype=np.int64)
    if not len(codes):
        return longest
    text_of = np.repeat(np.arange(len(texts)), lengths)
    # a run starts at each text's first character and wherever a character differs from the one before it
    run_start = np.ones(len(codes), dtype=bool)
    run_start[1:] = (codes[1:] != codes[:-1]) | (text_of[1:] != text_of[:-1])
    first = np.flatnonzero(run_start)
    np.maximum.at(longest, text_of[first], np.diff(np.append(first, len(codes))))
    return longest


def blocklist_pattern(cfg: CurationConfig) -> re.Pattern | None:
    """One case-insensitive regex over the configured phrases (whole words where the phrase starts/ends in one)."""
    phrases = list(cfg.blocklist)
    if cfg.blocklist_file:
        phrases += [p.strip() for p in Path(cfg.blocklist_file).read_text(encoding="utf-8").splitlines() if p.strip()]
    if not phrases:
        return None
    parts = [(r"\b" if p[0].isalnum() else "") + re.escape(p) + (r"\b" if p[-1].isalnum() else "") for p in phrases]
    return re.compile("|".join(parts), re.IGNORECASE)


class PairCleaner:
    """Ray Data actor: normalisation, rule filters and language id per row, then the dedup keys."""

    def __init__(self, cfg: dict, langid_path: str):
        self.cfg = from_dict(CurationConfig, cfg)
        self.langid = LanguageIdentifier.load(langid_path)
        self.blocklist = blocklist_pattern(self.cfg)
        self.minhash = MinHasher(self.cfg.minhash_perms, self.cfg.minhash_bands, self.cfg.shingle_bytes)

    def rule_reasons(self, queries: list[str], positives: list[str]) -> np.ndarray:
        """The first rule each normalised pair breaks, or '' (checked over the whole batch at once)."""
        checks = []
        for name, texts, (low, high) in (("query", queries, self.cfg.query_chars),
                                        ("positive", positives, self.cfg.positive_chars)):
            chars = np.array([len(t) for t in texts], dtype=np.int64)
            checks += [(chars < low, f"too_short:{name}"), (chars > high, f"too_long:{name}")]
        runs = np.maximum(longest_runs(queries), longest_runs(positives))
        checks.append((runs >= self.cfg.max_char_run, "repeated_chars"))
        if self.blocklist:
            checks.append((np.array([bool(self.blocklist.search(q) or self.blocklist.search(p))
                                     for q, p in zip(queries, positives)], dtype=bool), "blocklist"))
        reasons = np.full(len(queries), "", dtype=object)
        for broken, reason in reversed(checks):  # written last to first: the first rule a pair breaks is its reason
            reasons[broken] = reason
        return reasons

    def __call__(self, batch: dict) -> dict:
        """Normalised text, reasons, detected languages, exact keys and band keys for a batch."""
        reasons = np.asarray(batch["reject_reason"], dtype=object).copy()
        query = np.asarray(batch["query"], dtype=object).copy()
        positive = np.asarray(batch["positive"], dtype=object).copy()
        lang = np.asarray(batch["lang"], dtype=object).copy()
        live = np.nonzero(reasons == "")[0]
        for i in live:
            query[i], positive[i] = normalise(query[i]), normalise(positive[i])
        reasons[live] = self.rule_reasons(list(query[live]), list(positive[live]))
        live = live[reasons[live] == ""]
        # A pair's language is its positive's: queries may be in another language (cross-lingual pairs).
        detected, plausible = self.langid.judge([positive[i] for i in live], [lang[i] or None for i in live],
                                                self.cfg.lang_top_k, self.cfg.lang_margin)
        for i, best, ok in zip(live, detected, plausible):
            if not ok:
                reasons[i] = "wrong_language"
                continue
            lang[i] = lang[i] or best
            if self.cfg.languages and lang[i] not in self.cfg.languages:
                reasons[i] = "language_not_allowed"
        live = live[reasons[live] == ""]
        exact = np.zeros(len(reasons), dtype=np.uint64)
        bands = np.zeros((len(reasons), self.cfg.minhash_bands), dtype=np.uint64)
        exact[live] = exact_keys([f"{query[i]}\n{positive[i]}" for i in live])
        if self.cfg.near_dedup and len(live):
            # a band collides only when query and positive both agree on it: many questions about one paragraph
            # are different pairs, not near duplicates
            bands[live] = self.minhash.band_keys([query[i] for i in live], [positive[i] for i in live])
        return {**batch, "query": query, "positive": positive, "lang": lang, "reject_reason": reasons,
                "exact_key": exact, "band_keys": bands}


def drop_duplicates(batch: dict, shards: list, near: bool, failure: tuple[str | None, str] = (None, "")) -> dict:
    """Ray Data batch function: exact then near duplicates (against every earlier batch, via the shard actors).
    failure: the chaos option (inject_failure_at, output_dir), applied once the batch's keys reached the shards."""
    reasons = np.asarray(batch["reject_reason"], dtype=object).copy()
    live = np.nonzero(reasons == "")[0]
    rows = exact_keys(list(map(str, batch["origin"])))  # a retried batch's rows find their own keys: not duplicates
    new = first_seen(shards, "exact", batch["exact_key"][live], rows[live])
    reasons[live[~new]] = "exact_duplicate"
    live = live[new]
    if near and len(live):
        bands = batch["band_keys"][live]
        owners = np.repeat(rows[live], bands.shape[1])
        fresh = first_seen(shards, "near", bands.ravel(), owners).reshape(bands.shape)
        reasons[live[~fresh.all(axis=1)]] = "near_duplicate"
    die_once_on(failure[0], batch["origin"], failure[1])  # the worst moment: its keys are claimed, its rows unwritten
    out = {k: v for k, v in batch.items() if k not in ("exact_key", "band_keys")}
    return {**out, "reject_reason": reasons}


class PairScorer:
    """Ray Data actor: cosine of query and positive under an embedding model; below min_score → low_score."""

    def __init__(self, model_dir: str, min_score: float, batch_size: int):
        import torch

        from conan.encoder import open_encoder

        torch.set_num_threads(1)
        self.encoder = open_encoder(model_dir, batch_size=batch_size)
        self.min_score = min_score

    def __call__(self, batch: dict) -> dict:
        """Adds `score`; rejects the pairs below the threshold."""
        reasons = np.asarray(batch["reject_reason"], dtype=object).copy()
        scores = np.full(len(reasons), np.nan, dtype=np.float32)
        live = np.nonzero(reasons == "")[0]
        if len(live):
            q = self.encoder.encode([batch["query"][i] for i in live])
            p = self.encoder.encode([batch["positive"][i] for i in live])
            scores[live] = (q * p).sum(axis=1)
            reasons[live[scores[live] < self.min_score]] = "low_score"
        return {**batch, "score": scores, "reject_reason": reasons}


def cleaned_pairs(inputs: list[str], cfg: CurationConfig, langid_path: Path):
    """A Ray dataset of the inputs' weak pairs, validated, cleaned and keyed for dedup by cfg.cleaners' actor pool."""
    import ray.data

    c = cfg.cleaners
    ds = read_records(inputs, "weak_pair", lines_per_block=cfg.lines_per_block, convert=sft_to_weak_pair, cpus=c.cpus)
    return ds.map_batches(PairCleaner, fn_constructor_args=(asdict(cfg), str(langid_path)), batch_format="numpy",
                          batch_size=c.batch_size, num_cpus=c.cpus, num_gpus=c.gpus,
                          compute=ray.data.ActorPoolStrategy(size=c.size))


def curate(cfg: CurationConfig, job: str = "curate") -> dict:
    """Run the curation pipeline over cfg.inputs into cfg.output_dir; returns the stats it writes."""
    import ray
    import ray.data

    started = time.perf_counter()
    require_paths(cfg.inputs, "inputs")
    require_paths([cfg.score_model] if cfg.score_model else [], "score_model")
    out, langid_path = start_step(cfg.output_dir, "curation", cfg.ray_address, cfg.data_root)
    inputs = cfg.inputs or [str(sft_records_file(cfg.data_root, out / "source" / "sft.jsonl"))]
    shards = [ray.remote(DedupShard).options(num_cpus=0).remote() for _ in range(cfg.dedup_shards)]
    c, s = cfg.cleaners, cfg.scorers
    options = ray.data.DataContext.get_current().execution_options  # datasets copy the context when created
    preserve_order, options.preserve_order = options.preserve_order, cfg.deterministic
    try:
        ds = cleaned_pairs(inputs, cfg, langid_path)
        ds = ds.map_batches(drop_duplicates, fn_args=(shards, cfg.near_dedup, (cfg.inject_failure_at,
                                                                             str(out.resolve()))), batch_format="numpy",
                            batch_size=c.batch_size, num_cpus=c.cpus,
                            compute=ray.data.TaskPoolStrategy(size=1) if cfg.deterministic else None)
        if cfg.score_model:
            ds = ds.map_batches(PairScorer, fn_constructor_args=(str(Path(cfg.score_model).resolve()), cfg.min_score,
                                                                 s.batch_size),
                                batch_format="numpy", batch_size=s.batch_size * 4, num_cpus=s.cpus, num_gpus=s.gpus,
                                compute=ray.data.ActorPoolStrategy(size=s.size))
        else:
            ds = ds.map_batches(_no_score, batch_format="numpy", num_cpus=c.cpus)
        totals = run_and_count(ds, out, PAIR_SCHEMA, "curate", job, c.cpus)
    finally:
        options.preserve_order = preserve_order
    dedup = ray.get([shard.stats.remote() for shard in shards])
    return write_stats(out, totals, started, {"dedup_shards": dedup, "config": asdict(cfg)})


def sft_records_file(data_root: str, path: Path) -> Path:
    """The SFT records of the real datasets (the bundled weak-pair source) as JSONL."""
    import json

    from conan.data.stage_data import pair_records

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in pair_records(data_root):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _no_score(batch: dict) -> dict:
    return {**batch, "score": np.full(len(batch["reject_reason"]), np.nan, dtype=np.float32)}
