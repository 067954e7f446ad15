"""A stage's input as users give it: parquet and JSON-lines files (.jsonl / .json, gzip'd .jsonl.gz / .json.gz) read in
blocks, every row checked against the stage's RowSpec. A row is kept as given (an alias renamed, a default where it
has no value) or rejected with its reason and where it came from (`path:line`, `path:row` for parquet): none is
dropped or changed without a word, and one bad line costs that line, not its file.

Reasons (curation's where they mean the same): bad_json, bad_utf8, not_an_object, invalid_unicode:<column>,
wrong_type:<column>, missing_field:<column>, empty_text:<column>, not_finite:<column>, unknown_task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conan.data.files import INPUT_SUFFIXES, JSON_SUFFIXES, ShardError, input_suffix, open_input
from conan.data.schemas import RAW_KEEP, SCHEMAS, is_unicode

CHUNK_BYTES = 16 << 20  # JSON lines parsed at once (whole lines); a chunk that fails is parsed line by line
REJECTS_SCHEMA = pa.schema([("origin", pa.string()), ("reject_reason", pa.string()), ("raw", pa.string())])


@dataclass
class Block:
    """Consecutive records of one input file: `table` (a record that did not parse is a row of nulls whose reason is
    in `reasons`), and `describe`, which gives the origin and raw text of the records at given positions."""

    table: pa.Table
    reasons: pa.Array
    describe: Callable[[np.ndarray], tuple[list[str], list[str]]]
    positions: np.ndarray | None = None  # the rows' positions in the block as read (None: all of them, in order)

    def take(self, rows: np.ndarray) -> Block:
        """The block's rows at these positions (a sample)."""
        kept = rows if self.positions is None else self.positions[rows]
        index = pa.array(rows, pa.int64())
        return Block(self.table.take(index), self.reasons.take(index), self.describe, kept)

    def origins(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        """(origins, raw texts) of the rows at these positions of this block."""
        return self.describe(rows if self.positions is None else self.positions[rows])


def read_blocks(path: Path, batch_rows: int, types: dict[str, pa.DataType]) -> Iterator[Block]:
    """Blocks of a parquet or JSON-lines file, streamed. JSON columns named in `types` take those types (pyarrow would
    infer them from the first block); other JSON fields are not read."""
    suffix = input_suffix(path)
    if suffix == ".parquet":
        yield from _parquet_blocks(path, batch_rows)
    elif suffix in JSON_SUFFIXES:
        yield from _json_blocks(path, types)
    else:
        raise ShardError(f"{path}: expected {', '.join(INPUT_SUFFIXES)}")


def _parquet_blocks(path: Path, batch_rows: int) -> Iterator[Block]:
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: not a readable parquet file ({e})") from None
    start = 0
    for batch in reader.iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([batch])

        def describe(rows, table=table, start=start):
            picked = table.take(pa.array(rows, pa.int64())).to_pylist()
            return ([f"{path}:{start + int(r) + 1}" for r in rows],
                    [json.dumps(row, ensure_ascii=False, default=str)[:RAW_KEEP] for row in picked])
        yield Block(table, pa.nulls(table.num_rows, pa.string()), describe)
        start += table.num_rows


def _json_blocks(path: Path, types: dict[str, pa.DataType]) -> Iterator[Block]:
    """Whole lines a chunk at a time: pyarrow's parser for the chunk, or, when it fails (a line that is not JSON, a
    value of another type), each line parsed on its own."""
    import pyarrow.json as pajson

    schema = pa.schema(list(types.items()))
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    first_line, tail = 1, b""
    with open_input(path) as f:
        while True:
            data = f.read(CHUNK_BYTES)
            chunk = tail + data
            if first_line == 1:
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark before the first line
            cut = chunk.rfind(b"\n") + 1 if data else len(chunk)
            chunk, tail = chunk[:cut], chunk[cut:]
            if chunk.strip():
                yield _json_chunk(path, chunk, first_line, schema, options)
            first_line += chunk.count(b"\n")
            if not data:
                return


def _json_chunk(path: Path, chunk: bytes, first_line: int, schema: pa.Schema, options) -> Block:
    import pyarrow.json as pajson

    lines = [(n, line.rstrip(b"\r")) for n, line in enumerate(chunk.split(b"\n"), first_line) if line.strip()]

    def describe(rows):
        return ([f"{path}:{lines[r][0]}" for r in rows],
                [lines[r][1].decode("utf-8", "replace")[:RAW_KEEP] for r in rows])
    try:
        table = pajson.read_json(pa.BufferReader(chunk), read_options=pajson.ReadOptions(block_size=len(chunk) + 1),
                                 parse_options=options)
        if table.num_rows == len(lines):
            return Block(table, pa.nulls(table.num_rows, pa.string()), describe)
    except pa.ArrowInvalid:
        pass
    records, reasons = zip(*(_parse_line(line, schema) for _, line in lines))
    return Block(pa.Table.from_pylist(list(records), schema), pa.array(reasons, pa.string()), describe)


def _parse_line(line: bytes, schema: pa.Schema) -> tuple[dict, str | None]:
    """One JSON line as the schema's fields ({} and the reason when it is not a record of them)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "bad_utf8"
    except ValueError:
        return {}, "bad_json"
    if not isinstance(row, dict):
        return {}, "not_an_object"
    record = {}
    for f in schema:
        value = row.get(f.name)
        if value is not None:
            if not _holds(f.type, value):
                return {}, f"wrong_type:{f.name}"
            texts = value if isinstance(value, list) else [value]
            if not all(is_unicode(v) for v in texts if isinstance(v, str)):
                return {}, f"invalid_unicode:{f.name}"
        record[f.name] = value
    return record, None


def _holds(kind: pa.DataType, value) -> bool:
    """Whether a JSON value fits an Arrow column of this type."""
    if pa.types.is_string(kind):
        return isinstance(value, str)
    if pa.types.is_integer(kind):
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if pa.types.is_floating(kind):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e308
    if pa.types.is_list(kind):
        return isinstance(value, list) and all(v is None or _holds(kind.value_type, v) for v in value)
    return False


def column_types(columns, defaults: dict) -> dict[str, pa.DataType]:
    """The Arrow type of each column: the record schemas', else its default's (text where neither says)."""
    known = {f.name: f.type for schema in SCHEMAS.values() for f in schema}
    by_default = {str: pa.string(), int: pa.int64(), float: pa.float32(), list: pa.list_(pa.string())}
    return {c: known.get(c) or by_default.get(type(defaults.get(c)), pa.string()) for c in columns}


def neutral_value(kind: pa.DataType):
    """What a row of another kind holds in a column of this type: "", 0, 0.0 or []."""
    if pa.types.is_list(kind):
        return []
    return 0.0 if pa.types.is_floating(kind) else 0 if pa.types.is_integer(kind) else ""


@dataclass(frozen=True)
class RowSpec:
    """The columns a stage reads. A row must hold each column without a default; with `kinds`, the `task` column
    names each row's kind and a row must hold that kind's columns (the others take their defaults); a kind not
    listed is an unknown task. A file may lack a column that has a default, or is needed only by some kinds."""

    columns: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, object] = field(default_factory=dict)
    group_by: tuple[str, ...] = ()
    kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def types(self) -> dict[str, pa.DataType]:
        """Each column's Arrow type in the shards."""
        return column_types(self.columns, self.defaults)

    def read_types(self) -> dict[str, pa.DataType]:
        """The types a JSON input is parsed with, for each column and its alias (floats read as float64 and
        narrowed after, so a value float32 cannot hold is a reject, not a failed read)."""
        types = {}
        for c, kind in self.types.items():
            for name in filter(None, (c, self.aliases.get(c))):
                types[name] = pa.float64() if pa.types.is_floating(kind) else kind
        return types

    def check(self, block: Block, source: str) -> tuple[pa.Table, pa.Table]:
        """(the valid rows with exactly `columns`, defaults filled in; the rejects: origin, reason, raw)."""
        table, reason = block.table, block.reasons
        names, rows = set(table.column_names), table.num_rows
        needed_by_all = [c for c in self.columns if c not in self.defaults and not self._kind_column(c)]
        if missing := [c for c in needed_by_all if c not in names and self.aliases.get(c) not in names]:
            raise ShardError(f"{source} lacks columns {missing} (has {table.column_names})")
        types, columns = self.types, {}
        for c in self.columns:
            given = [table[n] for n in (c, self.aliases.get(c)) if n and n in names]
            typed = [_as_type(column, types[c]) for column in given]
            for _, wrong in typed:
                reason = _first(reason, wrong, f"wrong_type:{c}")
            values = [column for column, _ in typed]
            columns[c] = (pc.coalesce(*values) if len(values) > 1 else values[0]) if values else pa.nulls(rows,
                                                                                                           types[c])
        need = self._needed(columns, rows)
        if self.kinds:
            task = columns["task"]
            reason = _first(reason, pc.is_null(task), "missing_field:task")
            reason = _first(reason, _blank(task), "empty_text:task")
            reason = _first(reason, pc.invert(pc.is_in(task, pa.array(list(self.kinds)))), "unknown_task")
        for c in self.columns:
            column, kind = columns[c], types[c]
            if c in need:
                reason = _first(reason, pc.and_(need[c], pc.is_null(column)), f"missing_field:{c}")
            if pa.types.is_string(kind) and c in need:
                reason = _first(reason, pc.and_(need[c], _blank(column)), f"empty_text:{c}")
            elif pa.types.is_floating(kind):
                reason = _first(reason, pc.invert(pc.is_finite(column)), f"not_finite:{c}")
            elif pa.types.is_list(kind):  # (a blank item may mean something: a blank key is the text's own)
                reason = _first(reason, _null_items(column), f"wrong_type:{c}")
        valid = pc.is_null(reason)
        kept = pa.table({c: _filled(columns[c].filter(valid), self.defaults.get(c), types[c]) for c in self.columns})
        bad = np.flatnonzero(pc.is_valid(reason).to_numpy(zero_copy_only=False))
        origins, raws = block.origins(bad) if len(bad) else ([], [])
        rejects = pa.table([pa.array(origins, pa.string()), reason.take(pa.array(bad, pa.int64())),
                            pa.array(raws, pa.string())], schema=REJECTS_SCHEMA)
        return kept, rejects

    def rows(self, path: Path) -> pa.Table:
        """Every row of a file, checked: an error naming the first row it cannot take (for inputs that must be
        whole, such as a built CLR set)."""
        tables = []
        for block in read_blocks(path, 65_536, self.read_types()):
            kept, rejects = self.check(block, str(path))
            if rejects.num_rows:
                raise ShardError(f"{rejects['origin'][0]}: {rejects['reject_reason'][0]}")
            tables.append(kept)
        return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], t) for c, t in self.types.items()})

    def _kind_column(self, column: str) -> bool:
        """Whether only some kinds need the column (a file of other kinds may lack it)."""
        return any(column in needs for needs in self.kinds.values())

    def _needed(self, columns: dict, rows: int) -> dict[str, pa.Array]:
        """Per column a row must hold: which rows must (every row, or the rows of the kinds that need it)."""
        everyone = pa.array(np.ones(rows, bool))
        need = {c: everyone for c in self.columns if c not in self.defaults and not self._kind_column(c)}
        for c in self.columns:
            if kinds := [k for k, needs in self.kinds.items() if c in needs]:
                need[c] = pc.fill_null(pc.is_in(columns["task"], pa.array(kinds)), False)
        return need


def _first(reason, mask, text: str):
    """The reasons so far, with `text` for the rows that have none yet and where mask is true."""
    return pc.if_else(pc.and_(pc.is_null(reason), pc.fill_null(mask, False)), pa.scalar(text), reason)


def _blank(column):
    """Whether each text is empty or whitespace only (null stays null)."""
    return pc.equal(pc.utf8_trim_whitespace(column), "")


def _null_items(column) -> pa.Array:
    """Whether each list holds a null item."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    mask = np.zeros(len(column), bool)
    items = pc.list_flatten(column)
    if items.null_count:
        mask[pc.list_parent_indices(column).to_numpy()[pc.is_null(items).to_numpy(zero_copy_only=False)]] = True
    return pa.array(mask)


def _as_type(column, kind: pa.DataType):
    """(the column as `kind`, where it held a value of another type): a text column of numbers, a number column of
    text, are wrong types for every row that has a value."""
    have = column.type
    fits = (pa.types.is_null(have)
            or (pa.types.is_string(kind) and (pa.types.is_string(have) or pa.types.is_large_string(have)
                                              or (pa.types.is_dictionary(have) and _texts(have.value_type))))
            or (pa.types.is_integer(kind) and pa.types.is_integer(have))
            or (pa.types.is_floating(kind) and (pa.types.is_integer(have) or pa.types.is_floating(have)))
            or (pa.types.is_list(kind) and (pa.types.is_list(have) or pa.types.is_large_list(have))
                and (_texts(have.value_type) or pa.types.is_null(have.value_type))))
    if not fits:
        return pa.nulls(len(column), kind), pc.is_valid(column)
    if pa.types.is_floating(kind):  # through float64: an integer float32 cannot hold exactly is rounded, not refused
        column = pc.cast(pc.cast(column, pa.float64()), kind, safe=False)
    return pc.cast(column, kind), pa.nulls(len(column), pa.bool_())


def _texts(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _filled(column, default, kind: pa.DataType):
    """The column with its default where a row has no value."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if default is None or not column.null_count:
        return column
    return pc.fill_null(column, pa.scalar(default, kind))
