"""Arrow schemas of every record kind, readers for parquet / JSONL (local or any pyarrow/fsspec URI), validation.

Reading never drops a row silently: every input line or parquet row becomes either a valid record (the
kind's columns) or a reject (`reject_reason` set, the raw input kept in `raw`). `origin` says where each row
came from (`path:line` for JSONL, `path` for parquet), so a reject can be found in its file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from conan.config import ConfigError
from conan.data.files import ShardError, input_files

S, TEXTS = pa.string(), pa.list_(pa.string())

SCHEMAS: dict[str, pa.Schema] = {
    "pretrain": pa.schema([("text", S)]),
    "sft": pa.schema([("instruction", S), ("input", S), ("output", S)]),
    "weak_pair": pa.schema([("query", S), ("positive", S), ("source", S), ("lang", S)]),
    "retrieval": pa.schema([("query", S), ("positive", S), ("negatives", TEXTS), ("query_lang", S), ("doc_lang", S),
                            ("task", S), ("query_id", S)]),
    "sts": pa.schema([("s1", S), ("s2", S), ("score", pa.float32())]),
    "classification": pa.schema([("text", S), ("label", S), ("candidate_labels", TEXTS)]),
}
# Fields a record may omit (filled with the default); every other field is required.
OPTIONAL: dict[str, dict[str, object]] = {
    "sft": {"instruction": ""},
    "weak_pair": {"source": "", "lang": ""},
    "retrieval": {"negatives": [], "query_lang": "", "doc_lang": "", "task": "retrieval", "query_id": ""},
    "classification": {"candidate_labels": []},
}
# Columns every reader output carries besides the kind's own.
BOOKKEEPING = pa.schema([("origin", S), ("reject_reason", S), ("raw", S)])
FLOAT32_OVERFLOW = 3.4028235677973366e38  # from here on a value rounds to float32's infinity
RAW_KEEP = 2000  # characters of a rejected input kept for inspection


def output_schema(kind: str) -> pa.Schema:
    """The kind's schema plus the bookkeeping columns readers add."""
    return pa.unify_schemas([schema_of(kind), BOOKKEEPING])


def schema_of(kind: str) -> pa.Schema:
    """The Arrow schema of a record kind (ValueError for an unknown kind)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    return SCHEMAS[kind]


def validate(kind: str, row: dict) -> tuple[dict | None, str | None]:
    """(record with exactly the kind's fields, None) or (None, reason) for a row that is not a valid record."""
    if not isinstance(row, dict):
        return None, "not_an_object"
    record, optional = {}, OPTIONAL.get(kind, {})
    for field in schema_of(kind):
        value = row.get(field.name)
        if value is None:
            if field.name not in optional:
                return None, f"missing_field:{field.name}"
            value = optional[field.name]
        if pa.types.is_string(field.type):
            if not isinstance(value, str):
                return None, f"wrong_type:{field.name}"
            if not value.strip() and field.name not in optional:
                return None, f"empty_text:{field.name}"
            if not is_unicode(value):
                return None, f"invalid_unicode:{field.name}"
        elif pa.types.is_list(field.type):
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                return None, f"wrong_type:{field.name}"
            if not all(map(is_unicode, value)):
                return None, f"invalid_unicode:{field.name}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"wrong_type:{field.name}"
        elif not math.isfinite(value) or (pa.types.is_float32(field.type) and abs(value) >= FLOAT32_OVERFLOW):
            return None, f"not_finite:{field.name}"  # JSON's NaN / Infinity (a NaN target poisons the loss), 1e39
        elif pa.types.is_floating(field.type):
            value = float(value)  # an integer float32 cannot hold exactly (2**24 + 1) failed its whole batch
        record[field.name] = value
    return record, None


def is_unicode(text: str) -> bool:
    """Whether text encodes as UTF-8: JSON's \\ud800 escapes decode to lone surrogates, which no column holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_line(kind: str, line: bytes, convert=None) -> tuple[dict | None, str | None]:
    """Decode and validate one JSONL line (after `convert`, e.g. SFT → weak pair): (record, None) or (None, reason)."""
    try:
        text = line.decode("utf-8-sig")  # a file saved with a byte-order mark holds it before its first line
    except UnicodeDecodeError:
        return None, "bad_utf8"
    try:
        row = json.loads(text)
    except ValueError:
        return None, "bad_json"
    return validate(kind, convert(row) if convert and isinstance(row, dict) else row)


def reject_row(kind: str, origin: str, reason: str, raw: str) -> dict:
    """A reader row that carries a reject: the kind's columns empty, the reason and the raw input."""
    return {**empty_record(kind), "origin": origin, "reject_reason": reason, "raw": raw[:RAW_KEEP]}


def empty_record(kind: str) -> dict:
    """The kind's fields with neutral values (what reject rows carry in the record columns)."""
    return {f.name: [] if pa.types.is_list(f.type) else 0.0 if pa.types.is_floating(f.type) else ""
            for f in schema_of(kind)}


def validate_lines(batch, kind: str, convert=None) -> pa.Table:
    """Ray Data batch function: JSONL lines (`line`, `origin`) → the kind's columns + bookkeeping."""
    rows = []
    for line, origin in zip(batch["line"].to_pylist(), batch["origin"].to_pylist()):
        record, reason = parse_line(kind, line, convert)
        rows.append({**record, "origin": origin, "reject_reason": "", "raw": ""} if record else
                    reject_row(kind, origin, reason, line.decode("utf-8", "replace")))
    return _columns(kind, rows)


def validate_rows(batch: dict, kind: str, convert=None) -> pa.Table:
    """Ray Data batch function: parquet rows (any columns + `origin`) → the kind's columns + bookkeeping."""
    names = [n for n in batch if n != "origin"]
    rows = []
    for i, origin in enumerate(batch["origin"]):
        row = {n: _plain(batch[n][i]) for n in names}
        record, reason = validate(kind, convert(row) if convert else row)
        rows.append({**record, "origin": origin, "reject_reason": "", "raw": ""} if record else
                    reject_row(kind, origin, reason, json.dumps(row, ensure_ascii=False, default=str)))
    return _columns(kind, rows)


def with_columns(table: pa.Table, **columns) -> pa.Table:
    """The table with these columns replaced (same position) or appended: list columns stay Arrow lists untouched."""
    for name, values in columns.items():
        array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else \
            pa.array(values.tolist() if hasattr(values, "tolist") else values)
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, array) if i >= 0 else table.append_column(name, array)
    return table


def _plain(value):
    """numpy scalars / arrays from a batch → Python values (what validation expects)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _columns(kind: str, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=output_schema(kind))


def read_records(paths: list[str] | str, kind: str, filesystem=None, lines_per_block: int = 20_000, convert=None,
                 cpus: float = 1.0):
    """A Ray dataset of `kind` records (+ origin / reject_reason / raw) from parquet and JSONL files or directories.

    `convert` (a picklable function of a row dict) maps another record kind onto this one before validation.
    Read and validation tasks ask for `cpus` each (fractional on small machines, beside actor pools).
    Paths may be local or any URI pyarrow understands (s3://, gs://, hdfs://, or an fsspec filesystem passed as
    `filesystem`). JSONL is read line by line in bounded blocks, so a bad line is one reject, not a failed read.
    """
    import ray.data

    schema_of(kind)
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("no input paths")
    try:  # a local directory's files, each to its reader (its parquet files went to the JSON reader and were lost)
        paths = [str(f) for p in paths for f in (input_files([p]) if Path(p).is_dir() else [p])]
    except ShardError as e:
        raise ConfigError(f"inputs: {e}") from None
    parquet = [p for p in paths if p.lower().endswith(".parquet")]
    jsonl = [p for p in paths if not p.lower().endswith(".parquet")]
    parts = []
    if jsonl:
        lines = ray.data.read_datasource(JsonLinesDatasource(jsonl, filesystem=filesystem,
                                                             lines_per_block=lines_per_block), num_cpus=cpus)
        parts.append(lines.map_batches(validate_lines, fn_args=(kind, convert), batch_format="pyarrow",
                                       num_cpus=cpus))
    if parquet:
        rows = ray.data.read_datasource(ParquetRowsDatasource(parquet, filesystem=filesystem,
                                                              rows_per_block=lines_per_block), num_cpus=cpus)
        parts.append(rows.map_batches(validate_rows, fn_args=(kind, convert), batch_format="numpy", num_cpus=cpus))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


class ParquetRowsDatasource(FileBasedDatasource):
    """Ray datasource yielding parquet rows with `path:row` origins (1-based, as JSONL lines are numbered), a block
    at a time: an origin names one row, so outputs keep input order and dedup tells a retried row from a copy."""

    def __init__(self, paths, rows_per_block: int = 20_000, **kwargs):
        super().__init__(paths, file_extensions=["parquet"], **kwargs)
        self.rows_per_block = rows_per_block

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # parquet's footer needs random access

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=self.rows_per_block):
            origins = [f"{path}:{number + i}" for i in range(1, batch.num_rows + 1)]
            number += batch.num_rows
            table = pa.Table.from_batches([batch])  # a user's own `origin` column is no field of any kind
            table = table.drop_columns(["origin"]) if "origin" in table.column_names else table
            yield table.append_column("origin", pa.array(origins, S))


class JsonLinesDatasource(FileBasedDatasource):
    """Ray datasource yielding raw JSONL lines (bytes, undecoded) with `path:line` origins, a block at a time."""

    CHUNK = 1 << 20

    def __init__(self, paths, lines_per_block: int = 20_000, **kwargs):
        super().__init__(paths, file_extensions=["jsonl", "json", "jsonl.gz", "json.gz"], **kwargs)
        self.lines_per_block = lines_per_block

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        if path.lower().endswith(".gz"):  # Ray infers gzip from a lower-case suffix only (.JSON.GZ was read raw)
            open_args["compression"] = "gzip"
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        lines, origins, number, tail = [], [], 0, b""
        while True:
            chunk = f.read(self.CHUNK)
            data = tail + chunk
            parts = data.splitlines(keepends=True)  # lines end at \n, \r\n or \r (old Macs), as the stages read them
            tail = parts.pop() if chunk and parts and not parts[-1].endswith(b"\n") else b""  # may go on next chunk
            for line in parts:
                number += 1
                line = line.rstrip(b"\r\n")
                if line.strip():  # blank lines are layout, not rows
                    lines.append(line)
                    origins.append(f"{path}:{number}")
                if len(lines) >= self.lines_per_block:
                    yield pa.table({"line": pa.array(lines, pa.binary()), "origin": pa.array(origins, S)})
                    lines, origins = [], []
            if not chunk:
                break
        if lines:
            yield pa.table({"line": pa.array(lines, pa.binary()), "origin": pa.array(origins, S)})
