"""The one row schema of every split, its validation, and the hash split.

Columns: ``id`` (str), ``domain``, ``source``, ``prompt``, ``response`` (str),
``choices`` (list<str>, nullable), ``answer`` (str, nullable), ``meta`` (JSON str).
Row numbers in errors are 0-based, as in ``table.slice(row, 1)`` or ``df.iloc[row]``.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from ..errors import DataValidationError

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("choices", pa.list_(pa.string()), nullable=True),
    pa.field("answer", pa.string(), nullable=True),
    pa.field("meta", pa.string(), nullable=False),
])
COLUMNS = SCHEMA.names
SPLITS = ("train", "val", "test")
NOT_EMPTY = ("id", "domain", "source", "prompt", "response")


def normalise_prompt(text: str) -> str:
    """Unicode NFKC, lower case, whitespace collapsed: two prompts that differ only so are one."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def row_meta(row: dict) -> dict:
    """A row's ``meta`` as a dict (stored as a JSON string; rows built in memory may hold the dict)."""
    return json.loads(row["meta"]) if isinstance(row.get("meta"), str) else (row.get("meta") or {})


def row_kind(row: dict) -> str:
    """What produced a row: its generator (reasoning-gym), task (e-commerce) or subject (MMLU), else its source."""
    meta = row_meta(row)
    return str(meta.get("generator") or meta.get("task") or meta.get("subject") or row.get("source", ""))


def split_of(key: str, val_percent: int = 10, test_percent: int = 10) -> str:
    """Deterministic split from a hash of the normalised key: same key, same split, always."""
    bucket = int(stable_hash(normalise_prompt(key))[:8], 16) % 100
    if bucket < test_percent:
        return "test"
    return "val" if bucket < test_percent + val_percent else "train"


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in rows], schema=SCHEMA)


def _column_problems(table: pa.Table, path) -> Iterator[DataValidationError]:
    for field in SCHEMA:
        if field.name not in table.column_names:
            yield DataValidationError(path, None, field.name, "missing column")
        elif not table.schema.field(field.name).type.equals(field.type):
            yield DataValidationError(path, None, field.name, f"wrong type {table.schema.field(field.name).type},"
                                                              f" expected {field.type}")


def iter_problems(table: pa.Table, path="<table>") -> Iterator[DataValidationError]:
    """Every schema violation, columns first, then row by row (0-based rows)."""
    column_errors = list(_column_problems(table, path))
    yield from column_errors
    if column_errors:
        return
    seen_ids: dict[str, int] = {}
    for row, record in enumerate(table.select(COLUMNS).to_pylist()):
        for name in NOT_EMPTY:
            value = record[name]
            if value is None:
                yield DataValidationError(path, row, name, "is null")
            elif not value.strip():
                yield DataValidationError(path, row, name, "is empty")
        try:
            json.loads(record["meta"]) if record["meta"] is not None else None
        except json.JSONDecodeError as exc:
            yield DataValidationError(path, row, "meta", f"not valid JSON ({exc.msg})")
        if record["meta"] is None:
            yield DataValidationError(path, row, "meta", "is null")
        choices, answer = record["choices"], record["answer"]
        if choices is not None:
            if len(choices) < 2 or any(c is None or not c.strip() for c in choices):
                yield DataValidationError(path, row, "choices", "needs two or more non-empty choices")
            elif answer is None or answer not in choices:
                yield DataValidationError(path, row, "answer", f"{answer!r} is not among the choices {choices}")
        rid = record["id"]
        if rid is not None:
            if rid in seen_ids:
                yield DataValidationError(path, row, "id", f"duplicate id {rid!r} (first at row {seen_ids[rid]})")
            else:
                seen_ids[rid] = row


def validate_table(table: pa.Table, path="<table>") -> pa.Table:
    """Raise the first ``DataValidationError``; return the table (columns in schema order) if clean."""
    for problem in iter_problems(table, path):
        raise problem
    return table.select(COLUMNS)


def read_split(path) -> pa.Table:
    """Read one Parquet split through pyarrow and validate it (what every loader uses)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataValidationError(path, None, None, "file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(path, None, None, f"not a readable Parquet file ({exc})") from None
    return validate_table(table, path)
