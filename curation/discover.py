"""Discover: list the video files under an input URI, each with a content-derived `video_id`."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from curation.config import DiscoverConfig
from curation.redact import redact_uri

log = logging.getLogger(__name__)


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """Any URI pyarrow.fs understands (s3://, gs://, file://) or a plain local path."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join_uri(base: str, path: str) -> str:
    """The URI of `path` (a path on `base`'s filesystem, as listed under it or derived from its path) that opens on
    the same filesystem: only the path component changes, so credentials and the query string (endpoint_override,
    scheme, region) travel with every per-video URI across process boundaries. A local `base` gives the path itself."""
    if "://" not in base:
        return path
    parts = urlsplit(base)
    prefix = _fs_prefix(base)
    if not (path + "/").startswith(prefix):
        raise ValueError(f"{path} is not on the filesystem of {redact_uri(base)}")
    return urlunsplit(parts._replace(path="/" + quote(path[len(prefix):], safe="/")))


@functools.lru_cache(maxsize=256)
def _fs_prefix(base: str) -> str:
    """What `base`'s filesystem puts before its URI's path component in its paths: "bucket/" for object stores
    (the bucket is the URI's host), "/" for file:// and hdfs://."""
    _, fs_path = filesystem_and_path(base)
    fs_path = fs_path.rstrip("/")
    uri_path = unquote(urlsplit(base).path).strip("/")
    if not uri_path:
        return fs_path + "/"
    if not fs_path.endswith(uri_path):
        raise ValueError(f"cannot relate the paths of {redact_uri(base)} to its filesystem's")
    return fs_path[: len(fs_path) - len(uri_path)] or "/"


@dataclass
class Listing:
    """What discovery found under an input: the video files, and the paths it left out with why."""

    videos: list[dict] = field(default_factory=list)  # {"uri", "size_bytes"}, sorted by uri
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (printable path, reason)


def printable(path: str) -> str:
    """A path as valid UTF-8: bytes that are not UTF-8 (surrogate-escaped by os) are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_local(root: str, max_depth: int, is_video) -> Listing:
    """The regular files physically under `root`, without following symbolic links.

    A link is never followed, so nothing outside the root is read through one and no loop can repeat or stall the
    walk; a file inside the root that a link points to is listed once, by its own path. Iterative, so a deep tree
    cannot exhaust the interpreter's recursion limit; directories below `max_depth` are reported, not entered."""
    listing = Listing()
    real_root = os.path.realpath(root)
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as err:
            listing.skipped.append((printable(directory), f"unreadable directory ({err.strerror})"))
            continue
        for entry in entries:
            try:
                if entry.is_symlink():
                    # A target inside the root is listed by its own path; one outside it is never read.
                    outside = not _is_within(os.path.realpath(entry.path), real_root)
                    if outside and (is_video(entry.name) or os.path.isdir(entry.path)):  # target metadata only
                        listing.skipped.append((printable(entry.path), "symbolic link out of the input, not followed"))
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 > max_depth:
                        listing.skipped.append((printable(entry.path),
                                                f"directory deeper than discover.max_depth={max_depth}"))
                    else:
                        stack.append((entry.path, depth + 1))
                    continue
                if not is_video(entry.name):
                    continue
                if not _is_utf8(entry.path):
                    listing.skipped.append((printable(entry.path), "name is not valid UTF-8"))
                elif not entry.is_file(follow_symlinks=False):
                    listing.skipped.append((printable(entry.path), "not a regular file"))
                else:
                    listing.videos.append({"uri": entry.path, "size_bytes": entry.stat(follow_symlinks=False).st_size})
            except OSError as err:  # vanished or unreadable while listing
                listing.skipped.append((printable(entry.path), f"unreadable ({err.strerror})"))
    return listing


def discover(uri: str, config: DiscoverConfig) -> Listing:
    """Every file under `uri` whose extension marks it as a video (hidden files aside), sorted by URI, with its size,
    and the paths left out: links (never followed), names that are not UTF-8, directories too deep to enter."""
    extensions = tuple(e.lower() for e in config.extensions)

    def is_video(name: str) -> bool:
        return not name.startswith(".") and name.lower().endswith(extensions)

    filesystem, root = filesystem_and_path(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:  # one file named on the command line
        videos = [{"uri": root, "size_bytes": int(info.size or 0)}] if is_video(info.base_name) else []
        listing = Listing(videos=videos)
    elif isinstance(filesystem, pafs.LocalFileSystem):
        listing = _walk_local(root, config.max_depth, is_video)
    else:  # object stores have no links and only UTF-8 keys
        entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        listing = Listing(videos=[{"uri": e.path, "size_bytes": int(e.size or 0)} for e in entries
                                  if e.type == pafs.FileType.File and is_video(e.base_name)])
    for video in listing.videos:
        video["uri"] = join_uri(uri, video["uri"])
    listing.videos.sort(key=lambda r: r["uri"])
    listing.skipped.sort()
    return listing


def list_videos(uri: str, config: DiscoverConfig) -> list[dict]:
    """The videos `discover` finds under `uri`; what it leaves out is logged, one warning line per reason."""
    listing = discover(uri, config)
    by_reason: dict[str, list[str]] = {}
    for path, reason in listing.skipped:
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in sorted(by_reason.items()):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        log.warning("discovery skipped %d path(s) under %s: %s: %s", len(paths), redact_uri(uri), reason, shown)
    return listing.videos


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
        ids = [self._id(u, s) for u, s in zip(uris, sizes, strict=True)]
        return pa.table({"video_id": ids, "uri": uris, "size_bytes": pa.array(sizes, pa.int64())})

    def _id(self, uri: str, size: int) -> str:
        """The content id; for a file gone or unreadable since it was listed, an id from its path, so that the
        decode stage quarantines it (not_found, unreadable) instead of the whole run failing here."""
        try:
            return content_id(uri, size, self.config.id_sample_bytes)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            log.warning("cannot read %s to hash it (%s); the decode stage will quarantine it", redact_uri(uri), err)
            return "path-" + hashlib.blake2b(uri.encode(), digest_size=12).hexdigest()
