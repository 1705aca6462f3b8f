"""Discover: list the video files under an input URI, each with a content-derived `video_id`."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.fs as pafs

from curation.config import DiscoverConfig


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """Any URI pyarrow.fs understands (s3://, gs://, file://) or a plain local path."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join_uri(base: str, path: str) -> str:
    """The URI of `path` (as listed by base's filesystem) in the same scheme as `base`."""
    if "://" in base:
        return f"{base.split('://', 1)[0]}://{path}"
    return path


def list_videos(uri: str, config: DiscoverConfig) -> list[dict]:
    """Every file under `uri` whose extension marks it as a video, sorted by path, with its size."""
    filesystem, root = filesystem_and_path(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        entries = [info]
    else:
        entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    extensions = {e.lower() for e in config.extensions}
    out = []
    for entry in entries:
        if entry.type != pafs.FileType.File:
            continue
        name = entry.base_name
        if name.startswith(".") or not any(name.lower().endswith(ext) for ext in extensions):
            continue
        out.append({"uri": join_uri(uri, entry.path), "size_bytes": int(entry.size or 0)})
    return sorted(out, key=lambda r: r["uri"])


def content_id(uri: str, size: int, sample_bytes: int) -> str:
    """blake2b of the size and samples from the start, middle and end: a renamed copy keeps its id."""
    filesystem, path = filesystem_and_path(uri)
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(size).encode())
    with filesystem.open_input_file(path) as f:
        offsets = [0] if size <= 3 * sample_bytes else [0, size // 2 - sample_bytes // 2, size - sample_bytes]
        for offset in offsets:
            f.seek(offset)
            digest.update(f.read(min(sample_bytes * 3 if len(offsets) == 1 else sample_bytes, size - offset)))
    return digest.hexdigest()


class DiscoverStage:
    """Adds `video_id` to a batch of listed files (a Ray Data stage: hashing reads a few MiB per file)."""

    def __init__(self, config: DiscoverConfig):
        self.config = config

    def setup(self) -> None:
        pass

    def __call__(self, batch: dict) -> pa.Table:
        batch = pa.table(batch) if isinstance(batch, dict) else batch
        uris = batch["uri"].to_pylist()
        sizes = batch["size_bytes"].to_pylist()
        ids = [content_id(u, s, self.config.id_sample_bytes) for u, s in zip(uris, sizes, strict=True)]
        return pa.table({"video_id": ids, "uri": uris, "size_bytes": pa.array(sizes, pa.int64())})
