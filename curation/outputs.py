"""A folder on any filesystem pyarrow opens (local, s3://, gs://, file://): small files written atomically beside a
run's outputs (checkpoint state, progress, stop requests, reports, config copies)."""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.discover import filesystem_and_path

TMP = ".tmp-"  # in the name of everything written under a temporary name before its rename


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
        """Whole or not at all: a temporary name, then a rename (on a local disk the data and the rename are
        fsynced, so a power cut leaves the old file or the new one; an object store's put is atomic by itself)."""
        final = self.path(rel)
        tmp = f"{final}{TMP}{uuid.uuid4().hex[:8]}"
        if self.is_local:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
            _fsync_dir(posixpath.dirname(final))
            return
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, final)

    def sweep_temporary(self, *folders: str, recursive: bool = False) -> list[str]:
        """Remove what interrupted writes left in these folders (default: the root): the `NAME.tmp-*` files of
        `write_bytes_atomic` and `.tmp-*` folders and links. Only safe while holding the output's lease (no other
        writer is mid-write)."""
        removed = []
        for folder in folders or ("",):
            if not self.exists(folder):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(self.path(folder), recursive=recursive)):
                gone = self.fs.get_file_info(info.path).type == pafs.FileType.NotFound  # inside one removed
                if TMP in info.base_name and not gone:
                    self._remove(info)
                    removed.append(info.path)
        return removed

    def _remove(self, info: pafs.FileInfo) -> None:
        if self.is_local and os.path.islink(info.path):
            os.unlink(info.path)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        else:
            self.fs.delete_file(info.path)

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


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
