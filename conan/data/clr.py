"""The cross-lingual retrieval (CLR) set (paper §3.3, Appendix A.1, Table 7) on Ray Data.

Retrieval triples come in (query, positive, negatives, query_lang, doc_lang); each query gets a target
language drawn with Table 7's proportions (renormalised over the languages allowed, never its own language),
the query alone is translated, positives and negatives stay in the source language, and the rows go out as
task "clr" with query_lang = target and doc_lang = the documents' language. The draw is a hash of
(seed, query) mapped through the proportions' cumulative distribution, so a query's language does not depend on
batching, ordering or the number of workers.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from conan.config import CLRConfig, ConfigError, require_paths
from conan.data.langid import LanguageIdentifier
from conan.data.schemas import SCHEMAS, read_records, with_columns
from conan.data.sink import run_and_count, start_step, write_stats
from conan.data.translate import TranslationActor

# Table 7 of the paper (percent of translation pairs); they sum to 106 as printed, so they are renormalised.
TABLE7 = {"en": 25, "zh": 12, "es": 8, "fr": 6, "ja": 6, "de": 5, "ru": 5, "it": 4, "pt": 4, "ar": 3, "ko": 3,
          "bn": 2, "da": 2, "sv": 2, "th": 2, "ms": 2, "tr": 2, "vi": 2, "nl": 2, "pl": 2, "hi": 2, "km": 1,
          "fi": 1, "he": 1, "hu": 1, "no": 1}
CLR_SCHEMA = pa.schema([*SCHEMAS["retrieval"], ("source_query", pa.string()), ("attempts", pa.int32())])


def target_proportions(languages: list[str] | None = None) -> dict[str, float]:
    """Table 7's proportions over `languages` (default: all 26), summing to 1."""
    chosen = {lang: TABLE7[lang] for lang in (languages or TABLE7) if lang in TABLE7}
    if not chosen:
        raise ValueError(f"no Table 7 language among {languages}")
    total = sum(chosen.values())
    return {lang: w / total for lang, w in chosen.items()}


def draw_targets(keys: list[str], sources: list[str], proportions: dict[str, float], seed: int) -> list[str]:
    """A target language per query from a hash of (seed, key); the source language is excluded and the rest
    renormalised, so the draw never asks for a translation into the query's own language ("" where the proportions
    allow no other)."""
    langs = list(proportions)
    cdfs: dict[str, np.ndarray] = {}
    out = []
    for key, source in zip(keys, sources):
        if source not in cdfs:
            w = np.array([0.0 if lang == source else proportions[lang] for lang in langs])
            cdfs[source] = np.cumsum(w / w.sum()) if w.sum() > 0 else np.zeros(0)
        if not len(cdfs[source]):  # the only language allowed is the query's own
            out.append("")
            continue
        digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2.0 ** 64
        out.append(langs[min(int(np.searchsorted(cdfs[source], u, side="right")), len(langs) - 1)])
    return out


class TargetSampler:
    """Ray Data batch function state: detect missing source languages, then draw each row's target."""

    def __init__(self, proportions: dict[str, float], seed: int, langid_path: str):
        self.proportions, self.seed = proportions, seed
        self.langid = LanguageIdentifier.load(langid_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Adds target_lang; fills query_lang / doc_lang by language id where the row left them empty."""
        query, positive = batch["query"].to_pylist(), batch["positive"].to_pylist()
        langs = {}
        for column, texts in (("query_lang", query), ("doc_lang", positive)):
            values = batch[column].to_pylist()
            missing = [i for i, v in enumerate(values) if not v]
            for i, lang in zip(missing, self.langid.predict([texts[i] for i in missing])):
                values[i] = lang
            langs[column] = values
        keys = [qid or q for qid, q in zip(batch["query_id"].to_pylist(), query)]
        targets = draw_targets(keys, langs["query_lang"], self.proportions, self.seed)
        reasons = [r or ("" if t else "no_target_language") for r, t in zip(batch["reject_reason"].to_pylist(),
                                                                            targets)]
        return with_columns(batch, **langs, target_lang=targets, reject_reason=reasons)


def finish_rows(batch: pa.Table) -> pa.Table:
    """Translated rows become CLR rows: query_lang = the target, task = clr, query_id = "<target>:<source id>",
    the source id without its "<source language>:" prefix where it has one ("en:q7" → "de:q7", "nq:7" →
    "de:nq:7"), so a query and its translations are different queries to DHNM and two sources' ids stay apart."""
    done = [r == "" for r in batch["reject_reason"].to_pylist()]
    targets, sources = batch["target_lang"].to_pylist(), batch["query_lang"].to_pylist()
    query_lang = [t if d else q for d, t, q in zip(done, targets, sources)]
    query_id = [f"{t}:{q.removeprefix(f'{src}:')}" if d and q else q
                for d, t, src, q in zip(done, targets, sources, batch["query_id"].to_pylist())]
    return with_columns(batch.drop_columns(["target_lang"]), query_lang=query_lang, query_id=query_id,
                        task=["clr"] * len(done))


def xquad_triples(data_root: str, num_negatives: int, path: Path) -> Path:
    """The English XQuAD retrieval triples (question → paragraph, same-article negatives) as parquet."""
    from conan.data.stage_data import supervised_records

    rows = [r for r in supervised_records(data_root, num_negatives) if r["task"] == "retrieval" and r["query_id"]]
    table = pa.Table.from_pylist([{"query": r["query"], "positive": r["positive"], "negatives": r["negatives"],
                                   "query_lang": "en", "doc_lang": "en", "task": "retrieval",
                                   "query_id": r["query_id"]} for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq
    pq.write_table(table, path)
    return path


def build_clr(cfg: CLRConfig, job: str = "build_clr") -> dict:
    """Translate the queries of cfg.inputs (default: English XQuAD triples) into cfg.output_dir; returns the stats."""
    import ray.data

    from conan.data.translate import LookupBackend

    started = time.perf_counter()
    require_paths(cfg.inputs, "inputs")
    if cfg.backend != "lookup" and not cfg.model:
        raise ConfigError(f"model: backend {cfg.backend} translates with a model; name its directory")
    out, langid_path = start_step(cfg.output_dir, "build_clr", cfg.ray_address, cfg.data_root)
    inputs = cfg.inputs or [str(xquad_triples(cfg.data_root, cfg.num_negatives, out / "source" / "xquad_en.parquet"))]
    languages = cfg.languages
    if cfg.backend == "lookup" and not languages:  # XQuAD's languages: the questions it holds in parallel
        languages = [lang for lang in TABLE7 if lang in LookupBackend.QUESTION_LANGUAGES]
    proportions = target_proportions(languages)
    t = cfg.translators
    ds = read_records(inputs, "retrieval", cpus=t.cpus)
    if cfg.max_rows is not None:
        ds = ds.limit(cfg.max_rows)
    ds = ds.map_batches(TargetSampler, fn_constructor_args=(proportions, cfg.seed, str(langid_path)),
                        batch_format="pyarrow", num_cpus=t.cpus, compute=ray.data.ActorPoolStrategy(size=1))
    backend_args = {"backend": cfg.backend, "data_root": cfg.data_root, "model": cfg.model,
                    "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                    "retry_temperature": cfg.retry_temperature, "engine_kwargs": cfg.engine_kwargs}
    ds = ds.map_batches(TranslationActor, fn_constructor_args=(backend_args, str(langid_path), cfg.max_retries,
                                                               cfg.inject_failure_at, str(out.resolve())),
                        batch_format="pyarrow", batch_size=t.batch_size, num_cpus=t.cpus, num_gpus=t.gpus,
                        compute=ray.data.ActorPoolStrategy(size=t.size),
                        **({"runtime_env": translator_env(cfg.translator_python)} if cfg.translator_python else {}))
    ds = ds.map_batches(finish_rows, batch_format="pyarrow", num_cpus=t.cpus)
    totals = run_and_count(ds, out, CLR_SCHEMA, "build_clr", job, t.cpus)
    return write_stats(out, totals, started, {"proportions": proportions, "languages": kept_languages(out),
                                              "config": asdict(cfg)})


def translator_env(python: str) -> dict:
    """The Ray runtime_env of translation actors in another Python environment: its interpreter, this checkout on
    its path (the actor runs conan.data.translate), and vLLM's engine in the actor's process (it would otherwise
    spawn its engine core as a child process, which a Ray worker's entry point does not allow)."""
    if not Path(python).is_file():
        raise ConfigError(f"translator_python: {python} does not exist (`make vllm-env` builds .venv-vllm/bin/python)")
    return {"py_executable": str(Path(python).absolute()),
            "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


def kept_languages(out: Path) -> dict[str, int]:
    """CLR rows written per query language (read back from the parquet shards, one column)."""
    import pyarrow.parquet as pq

    if not (out / "data").is_dir():
        return {}
    langs, counts = np.unique(pq.read_table(out / "data", columns=["query_lang"])["query_lang"].to_numpy(
        zero_copy_only=False).astype(str), return_counts=True)
    return {str(lang): int(n) for lang, n in sorted(zip(langs, counts), key=lambda x: -x[1])}
