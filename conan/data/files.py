"""Which files are a stage's or a data job's input: parquet and JSON lines (.jsonl / .json, gzip'd .jsonl.gz /
.json.gz), named one by one or found under directories."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
INPUT_SUFFIXES = (".parquet", *JSON_SUFFIXES)


class ShardError(ValueError):
    """What cannot be read as input at all (an input file or directory, a shard directory or its manifest), as
    opposed to one of its rows: a clear line naming it."""


def input_suffix(path: str | Path) -> str | None:
    """The input format suffix a file's name ends with (case aside), None for any other file."""
    name = Path(path).name.lower()
    return next((s for s in INPUT_SUFFIXES if name.endswith(s)), None)


def open_input(path: Path) -> pa.NativeFile:
    """A file's bytes as a stream, decompressed when its name ends in .gz."""
    return pa.input_stream(str(path), compression="gzip" if path.name.lower().endswith(".gz") else None)


def input_files(paths: Iterable[str | Path]) -> list[Path]:
    """The parquet / JSON-lines files under the given files and directories, sorted within a directory. In a
    directory, names starting with "." or "_" (_SUCCESS, .crc, _temporary/) and a dataset's documentation (README,
    LICENSE, *.md: a Hugging Face dataset folder holds them) are not data; any other file that is neither is an
    error naming it, never a file left out without a word."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not _documentation(f)
                           and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
            if other := [str(f) for f in found if input_suffix(f) is None]:
                raise ShardError(f"{p}: {len(other)} file(s) neither parquet nor JSON lines ({', '.join(other[:3])}"
                                 f"{', …' if len(other) > 3 else ''}); accepted: {', '.join(INPUT_SUFFIXES)}")
            if not found:
                raise ShardError(f"{p}: no {', '.join(INPUT_SUFFIXES)} files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ShardError(f"{p} does not exist")
    return out


def _documentation(path: Path) -> bool:
    """A README, LICENSE or markdown file beside the data."""
    name = path.name.upper()
    return name.startswith(("README", "LICENSE", "LICENCE")) or name.endswith(".MD")
