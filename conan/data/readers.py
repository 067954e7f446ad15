"""Ray Data readers that turn text files, JSONL or parquet into a dataset with a `text` column."""

from __future__ import annotations

from pathlib import Path

import ray.data

from conan.data.files import input_suffix

TEXT_SUFFIXES = {".txt", ".text"}


def _expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"input path {p} does not exist")
    return files


def read_text_dataset(paths: list[str], column: str = "text") -> ray.data.Dataset:
    """One Ray dataset with a single `text` column from parquet/JSONL files (`column`) or plain-text lines."""
    files = _expand(paths)
    if not files:
        raise FileNotFoundError(f"no input files under {paths}")
    parts = []
    for kind, group in _group_by_kind(files).items():
        if kind == "text":
            parts.append(ray.data.read_text(group))  # one row a line, column "text"
            continue
        ds = ray.data.read_parquet(group, columns=[column]) if kind == "parquet" else \
            ray.data.read_json(group, lines=True).select_columns([column])
        parts.append(ds.rename_columns({column: "text"}) if column != "text" else ds)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _group_by_kind(files: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for f in files:  # .jsonl.gz / .JSONL are JSON lines too (they were read as text, a JSON line a text)
        suffix = input_suffix(f)
        kind = "text" if suffix is None else "parquet" if suffix == ".parquet" else "jsonl"
        groups.setdefault(kind, []).append(f)
    return groups
