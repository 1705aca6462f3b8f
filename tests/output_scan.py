"""Everything an output holds, for the tests that no secret reaches one: the bytes of each file, and the values in each
Lance dataset under it. Lance compresses strings in its data files (FSST), so a string written once into a table is
not found by scanning the files' bytes; here every version of every table is read back, with its config and tags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lance


def _values(value) -> Iterator[bytes]:
    """Every string and binary inside a Python value from Arrow (lists, structs, maps), as bytes."""
    if isinstance(value, str):
        yield value.encode()
    elif isinstance(value, bytes):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _values(key)
            yield from _values(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _values(item)


def lance_contents(table: Path) -> Iterator[tuple[str, bytes]]:
    """(where, value) for every string and binary value of every version of the Lance dataset at `table` (rows a
    later version replaced or deleted included), each version's config, and every tag with its metadata."""
    for entry in lance.dataset(str(table)).versions():
        number = entry["version"]
        ds = lance.dataset(str(table), version=number)
        for key, value in ds.config().items():
            yield f"@{number} config", f"{key}={value}".encode()
        for column in ds.schema.names:
            for batch in ds.to_batches(columns=[column]):
                for value in _values(batch.column(0).to_pylist()):
                    yield f"@{number} {column}", value
    for name, tag in lance.dataset(str(table)).tags.list().items():
        yield f"tag {name}", json.dumps(tag, default=str).encode()
        for value in _values(tag.get("metadata") or {}):
            yield f"tag {name} metadata", value


def output_contents(root: Path) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) for every regular file under root and every value inside its Lance datasets."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield str(path.relative_to(root)), path.read_bytes()
    for versions in sorted(root.rglob("_versions")):
        if versions.is_dir():
            table = versions.parent
            for where, value in lance_contents(table):
                yield f"{table.relative_to(root)} {where}", value
