"""A folder on any filesystem pyarrow opens (local, s3://, gs://, file://): small files written atomically beside a
run's outputs (checkpoint state, progress, stop requests, reports, config copies)."""

from __future__ import annotations

import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.discover import filesystem_and_path


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem_and_path(uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, final)

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.read_table(f, columns=columns)

    def list(self, rel: str, suffix: str) -> list[str]:
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel)))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))
