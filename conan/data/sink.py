"""The end of every data step: kept rows and rejects written as parquet shards by the workers, counts to the driver.

Each batch writes one `part-<input file hash>-<first line>.parquet` per input file it holds rows of (origins are
`path:line` for JSONL, `path:row` for parquet): the same name if a task is retried, so a retry overwrites instead
of duplicating, and names that sort into input order whatever the batch boundaries were, so a step fed its input in
order (Ray Data's preserve_order) writes the same rows in the same order every run. Origins without a number name
the part by the hash of all its origins. Each batch returns one count per outcome; the driver only sums counts, so
its memory does not grow with the data. Outcomes are also counted in the Ray metric conan_data_rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conan.console import LOG_DIR
from conan.metrics import data_rows_counter

KEPT = "kept"
REJECT_COLUMNS = ("origin", "reject_reason", "raw")


def start_step(output_dir: str | Path, step: str, ray_address: str | None, data_root: str) -> tuple[Path, Path]:
    """Make a fresh output dir (never mixing outputs), join Ray, and save the language identifier the step's actors
    load; returns (output dir, identifier path)."""
    from conan.data.langid import LanguageIdentifier
    from conan.runtime import init_ray

    out = Path(output_dir).resolve()
    if out.exists() and any(p.name != LOG_DIR for p in out.iterdir()):
        raise FileExistsError(f"{step}: {out} is not empty; choose a new output_dir (outputs are never mixed)")
    out.mkdir(parents=True, exist_ok=True)
    init_ray(ray_address)
    langid_path = out / "langid.npz"
    LanguageIdentifier.train(data_root).save(langid_path)
    return out, langid_path


def write_split(batch: dict, output_dir: str, kept_schema: pa.Schema, step: str, job: str) -> dict:
    """Ray Data batch function: rows with an empty reject_reason → <output_dir>/data, others → <output_dir>/rejects.

    Returns {"outcome": [...], "count": [...]} for this batch."""
    reasons = np.asarray(batch["reject_reason"], dtype=object)
    kept = reasons == ""
    reject_columns = list(REJECT_COLUMNS) + [f.name for f in kept_schema if f.name in batch
                                            and f.name not in REJECT_COLUMNS and pa.types.is_string(f.type)]
    for name, rows in part_names(list(map(str, batch["origin"]))):
        for folder, mask, columns, schema in (("data", kept & rows, [f.name for f in kept_schema], kept_schema),
                                              ("rejects", ~kept & rows, reject_columns, None)):
            if mask.any():
                table = pa.table({c: _column(batch[c], mask) for c in columns}, schema=schema)
                path = Path(output_dir) / folder
                path.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path / f"{name}.parquet")
    outcomes, counts = np.unique(np.where(kept, KEPT, reasons).astype(str), return_counts=True)
    counter = data_rows_counter()
    for outcome, count in zip(outcomes, counts):
        counter.inc(int(count), tags={"job": job, "step": step, "outcome": str(outcome)})
    return {"outcome": outcomes, "count": counts}


def part_names(origins: list[str]) -> list[tuple[str, np.ndarray]]:
    """A batch's parts: (file name stem, row mask) per input file, in order of first appearance."""
    def digest(text: str) -> str:
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    split = [origin.rpartition(":") for origin in origins]
    files = [path if sep and line.isdigit() else origin for (path, sep, line), origin in zip(split, origins)]
    parts = []
    for file in dict.fromkeys(files):
        rows = np.asarray([f == file for f in files])
        first = int(np.argmax(rows))
        path, sep, line = split[first]
        suffix = f"{int(line):012d}" if sep and line.isdigit() else digest("\n".join(np.asarray(origins)[rows]))
        parts.append((f"part-{digest(file)}-{suffix}", rows))
    return parts


def _column(values, mask: np.ndarray) -> list:
    return [v.tolist() if hasattr(v, "tolist") else v for v in np.asarray(values)[mask]]


def run_and_count(ds, output_dir: str | Path, kept_schema: pa.Schema, step: str, job: str,
                  cpus: float = 1.0) -> dict[str, int]:
    """Execute the dataset into the sink (streaming; writer tasks ask for `cpus`) and return the total per outcome."""
    totals: dict[str, int] = {}
    out = ds.map_batches(write_split, fn_args=(str(output_dir), kept_schema, step, job), batch_format="numpy",
                         num_cpus=cpus)
    for row in out.iter_rows():
        totals[row["outcome"]] = totals.get(row["outcome"], 0) + int(row["count"])
    return totals


def write_stats(output_dir: str | Path, totals: dict[str, int], started: float, extra: dict) -> dict:
    """stats.json: rows in / out, rejects per reason (every input row is one of them), rate, and step details."""
    rejected = {k: v for k, v in sorted(totals.items()) if k != KEPT}
    rows_in = sum(totals.values())
    seconds = time.perf_counter() - started
    stats = {"rows_in": rows_in, "rows_out": totals.get(KEPT, 0), "rejected": rejected,
             "rejected_total": sum(rejected.values()), "seconds": round(seconds, 2),
             "rows_per_s": round(rows_in / seconds, 1) if seconds else None, **extra}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats
