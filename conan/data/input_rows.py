"""A stage's input as users give it: parquet and JSON-lines files (.jsonl / .json, gzip'd .jsonl.gz / .json.gz) read in
blocks, every row checked against the stage's RowSpec. A row is kept as given (an alias renamed, a default where it
has no value) or rejected with its reason and where it came from (`path:line`, `path:row` for parquet): none is
dropped or changed without a word, and one bad line costs that line, not its file.

Reasons (curation's where they mean the same): bad_json, bad_utf8, not_an_object, invalid_unicode:<column>,
wrong_type:<column>, missing_field:<column>, empty_text:<column>, not_finite:<column>, unknown_task.
"""

from __future__ import annotations

import json
import math
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
    """A parquet file's record batches as blocks, origins `path:row` (1-based)."""
    try:
        reader = pq.ParquetFile(path)
        batches = reader.iter_batches(batch_size=batch_rows)
        start = 0
        for batch in batches:
            table = pa.Table.from_batches([batch])

            def describe(rows, table=table, start=start):
                return ([f"{path}:{start + int(r) + 1}" for r in rows],
                        [json.dumps(_raw_row(table.slice(int(r), 1)), ensure_ascii=False, default=_text)[:RAW_KEEP]
                         for r in rows])
            yield Block(table, pa.nulls(table.num_rows, pa.string()), describe)
            start += table.num_rows
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: not a readable parquet file ({e})") from None


def _raw_row(row: pa.Table) -> dict:
    """A one-row table as a dict; text that is not UTF-8 as its bytes."""
    try:
        return row.to_pylist()[0]
    except UnicodeDecodeError:
        return {name: column.cast(pa.binary())[0].as_py() if _texts(column.type) else column[0].as_py()
                for name, column in zip(row.column_names, row.columns)}


def _text(value) -> str:
    """A raw value JSON cannot hold (bytes of invalid UTF-8, a date), as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# Id columns held as text: an integer id (MS MARCO's query ids) is its decimal text.
TEXT_IDS = ("query_id", "positive_key")
LINE_BY_LINE_BYTES = 64 << 10  # a chunk that fails is halved down to this size; only such a piece goes line by line


def _json_blocks(path: Path, types: dict[str, pa.DataType]) -> Iterator[Block]:
    """Whole lines a chunk at a time: pyarrow's parser for the chunk when it is valid UTF-8 with one object a line and
    parses; else the chunk halved, and a failing piece of at most LINE_BY_LINE_BYTES parsed line by line."""
    import pyarrow.json as pajson

    schema = pa.schema(list(types.items()))
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    for chunk, first_line in line_chunks(path):
        yield from _json_pieces(path, chunk, first_line, schema, options)


def line_chunks(path: Path) -> Iterator[tuple[bytes, int]]:
    """A JSON-lines file as chunks of whole lines (about CHUNK_BYTES, without a byte-order mark, none blank only),
    each with its first line's number; lines end at \n, \r\n or \r (old Macs), as pyarrow's parser has them."""
    first_line, tail = 1, b""
    try:
        with open_input(path) as f:
            while True:
                data = f.read(CHUNK_BYTES)
                chunk = tail + data
                if first_line == 1:
                    chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark before the first line
                cut = _line_end(chunk) if data else len(chunk)
                chunk, tail = chunk[:cut], chunk[cut:]
                if chunk.strip():
                    yield chunk, first_line
                first_line += len(chunk.splitlines())
                if not data:
                    return
    except OSError as e:  # a truncated or corrupt .gz
        raise ShardError(f"{path}: cannot be read ({e})") from None


def count_records(path: Path) -> int:
    """Records of an input file as read_blocks yields them: a parquet file's rows (its footer), a JSON-lines file's
    non-blank lines."""
    if input_suffix(path) == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"{path}: not a readable parquet file ({e})") from None
    return sum(1 for chunk, _ in line_chunks(path) for line in chunk.splitlines() if line.strip())


def _line_end(data: bytes) -> int:
    """Where the last whole line of `data` ends (0: none yet)."""
    end = data.rfind(b"\n")
    return end + 1 if end >= 0 else data.rfind(b"\r") + 1


def _json_pieces(path: Path, chunk: bytes, first_line: int, schema: pa.Schema, options) -> Iterator[Block]:
    """The blocks of a chunk of whole lines: one parsed by pyarrow, or its halves, or its lines one by one."""
    import pyarrow.json as pajson

    def describe(rows):
        lines = [(n, line) for n, line in enumerate(chunk.splitlines(), first_line) if line.strip()]
        return ([f"{path}:{lines[r][0]}" for r in rows],
                [lines[r][1].decode("utf-8", "replace")[:RAW_KEEP] for r in rows])
    try:
        chunk.decode("utf-8")  # pyarrow's parser does not check it
        objects = _object_lines(chunk)
        if objects is not None:
            table = pajson.read_json(pa.BufferReader(chunk), parse_options=options)
            if table.num_rows == objects:
                yield Block(table, pa.nulls(table.num_rows, pa.string()), describe)
                return
    except UnicodeDecodeError:
        pass
    except pa.ArrowInvalid as e:  # integer ids in a text id column: likely every line, so halving would not help
        if any(f"Column(/{c}) changed from string to number" in str(e) for c in TEXT_IDS):
            yield _by_line(chunk, schema, describe)
            return
    if len(chunk) > LINE_BY_LINE_BYTES:  # halve at a line end: the bad lines' piece alone goes line by line
        half = _line_end(chunk[:len(chunk) // 2]) or _line_end(chunk[:-1])
        if 0 < half < len(chunk):
            yield from _json_pieces(path, chunk[:half], first_line, schema, options)
            yield from _json_pieces(path, chunk[half:], first_line + len(chunk[:half].splitlines()), schema, options)
            return
    yield _by_line(chunk, schema, describe)


def _by_line(chunk: bytes, schema: pa.Schema, describe) -> Block:
    """A chunk's non-blank lines parsed one by one: each a record, or nulls and its reason."""
    records, reasons = zip(*(_parse_line(line, schema) for line in chunk.splitlines() if line.strip()))
    return Block(pa.Table.from_pylist(list(records), schema), pa.array(reasons, pa.string()), describe)


def _object_lines(chunk: bytes) -> int | None:
    """How many lines the chunk has when each non-blank line starts with "{" and ends with "}" (so pyarrow's rows are
    its lines, one to one), else None (an object over several lines, two on one line make other counts). Lines end at
    \n, \r\n or \r, as pyarrow's parser and bytes.splitlines() have them."""
    data = np.frombuffer(chunk, np.uint8)
    ends = np.flatnonzero((data == 10) | (data == 13))
    first, last = np.concatenate(([0], ends + 1)), np.concatenate((ends - 1, [len(data) - 1]))
    filled = first <= last
    if (data[first[filled]] == ord("{")).all() and (data[last[filled]] == ord("}")).all():
        return int(filled.sum())
    lines = [line for line in (raw.strip() for raw in chunk.splitlines()) if line]  # spaces around an object
    return len(lines) if all(line[:1] == b"{" and line[-1:] == b"}" for line in lines) else None


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
        if f.name in TEXT_IDS and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is not None:
            if not _holds(f.type, value):
                return {}, f"wrong_type:{f.name}"
            texts = value if isinstance(value, list) else [value]
            if not all(is_unicode(v) for v in texts if isinstance(v, str)):
                return {}, f"invalid_unicode:{f.name}"
            if pa.types.is_floating(f.type):  # NaN, ±∞ and 1e400 are not_finite, as the chunk's check has them
                value = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        record[f.name] = value
    return record, None


def _holds(kind: pa.DataType, value) -> bool:
    """Whether a JSON value fits an Arrow column of this type."""
    if pa.types.is_string(kind):
        return isinstance(value, str)
    if pa.types.is_integer(kind):
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if pa.types.is_floating(kind):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
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
            typed = [_as_type(column, types[c], c) for column in given]
            for _, problems in typed:
                for rows_with, why in problems:
                    reason = _first(reason, rows_with, why)
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


def _as_type(column, kind: pa.DataType, name: str):
    """(the column as `kind`, [(rows, reason)] of the values it cannot hold): a text column of numbers, a number
    column of text are `wrong_type` for every row with a value; an id of 3.5 or beyond int64 for its row (3.0, as
    pandas writes a nullable int, is 3); parquet text that is not UTF-8 is `bad_utf8` for its row."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    have = column.type
    if name in TEXT_IDS and pa.types.is_integer(have):
        return pc.cast(column, pa.string()), []
    fits = (pa.types.is_null(have)
            or (pa.types.is_string(kind) and _texts(have))
            or (pa.types.is_integer(kind) and (pa.types.is_integer(have) or pa.types.is_floating(have)))
            or (pa.types.is_floating(kind) and (pa.types.is_integer(have) or pa.types.is_floating(have)))
            or (pa.types.is_list(kind) and (pa.types.is_list(have) or pa.types.is_large_list(have))
                and (_texts(have.value_type) or pa.types.is_null(have.value_type))))
    if not fits:
        return pa.nulls(len(column), kind), [(pc.is_valid(column), f"wrong_type:{name}")]
    problems = []
    if pa.types.is_integer(kind) and (pa.types.is_floating(have) or have == pa.uint64()):
        if pa.types.is_floating(have):
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, have), column)  # pandas' missing int
            bad = pc.or_(pc.not_equal(pc.floor(column), column), pc.greater(pc.abs(column), 2.0**62))
        else:
            bad = pc.greater(column, pa.scalar(2**63 - 1, have))
        problems.append((bad, f"wrong_type:{name}"))
        column = pc.if_else(pc.fill_null(bad, False), pa.scalar(None, have), column)
        return pc.cast(column, kind, safe=False), problems
    if pa.types.is_floating(kind):  # through float64: an integer float32 cannot hold exactly is rounded, not refused
        return pc.cast(pc.cast(column, pa.float64()), kind, safe=False), problems
    if (pa.types.is_string(kind) or pa.types.is_list(kind)) and not pa.types.is_null(have):
        column, bad = _utf8_only(column)
        if bad is not None:
            problems.append((bad, f"bad_utf8:{name}"))
    return pc.cast(column, kind), problems


def _utf8_only(column) -> tuple[pa.Array, pa.Array | None]:
    """(the column with its values that are not UTF-8 made null, which rows those were; None when all are): parquet
    does not check the bytes of a string column, and text kernels fail on the whole column."""
    try:
        column.validate(full=True)
        return column, None
    except pa.ArrowInvalid:
        pass
    as_bytes = pc.cast(column, pa.list_(pa.binary()) if pa.types.is_list(column.type) else pa.binary())

    def decodes(value) -> bool:
        try:
            [v.decode("utf-8") for v in (value if isinstance(value, list) else [value]) if v is not None]
            return True
        except UnicodeDecodeError:
            return False
    bad = pa.array([value is not None and not decodes(value) for value in as_bytes.to_pylist()])
    return pc.cast(pc.if_else(bad, pa.scalar(None, as_bytes.type), as_bytes), column.type), bad


def _texts(kind: pa.DataType) -> bool:
    """Whether an Arrow type holds text (string, large_string, string_view)."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _filled(column, default, kind: pa.DataType):
    """The column with its default where a row has no value."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if default is None or not column.null_count:
        return column
    return pc.fill_null(column, pa.scalar(default, kind))
