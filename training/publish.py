"""Publishing an exported model whole, into a folder nothing overwrites later.

    OUTPUT/models/<sha16>/   the export, named by the sha256 of its files: written complete, never changed
    OUTPUT/model             the current export: locally a link to models/<sha16>, swapped in one rename;
                             on an object store a copy, its config.json written last
    OUTPUT/model.json        which models/<sha16> is current and its sha256, written last (what registration reads)

Locally the folder is first written as `models/.tmp-*`, every file and the folder fsynced, then renamed, so a kill -9
leaves either no folder or a whole one, and a registered model version that points at `models/<sha16>` (or at its
copy in MLflow's artifact store) sees the same bytes forever. On an object store, where a folder cannot be renamed,
its `config.json` (the file `load_model` opens first) is written last: a folder without it is an interrupted copy.
`sweep_temporary` removes what an interrupted export or atomic write left; call it while holding the output's lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from curation.outputs import TMP, OutputDir

log = logging.getLogger("reelforge.train")

MODELS = "models"
CURRENT = "model"
POINTER = "model.json"
COMPLETE = "config.json"  # written last on object stores; load_model needs it


def folder_digest(directory: str | os.PathLike) -> str:
    """sha256 over the names and bytes of a local folder's files."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                file_digest = hashlib.file_digest(f, "sha256").hexdigest()
            digest.update(f"{path.name}\0{file_digest}\n".encode())
    return digest.hexdigest()


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_model(directory: str | os.PathLike, output: str) -> str:
    """Publish the local export `directory` under `output` (see the module doc); returns its sha256."""
    sha = folder_digest(directory)
    out = OutputDir(output)
    name = posixpath.join(MODELS, sha[:16])
    if out.is_local:
        _publish_local(Path(directory), Path(out.root), name)
    else:
        _publish_remote(Path(directory), out, name)
    out.write_bytes_atomic(POINTER, json.dumps({"sha256": sha, "folder": name}).encode())
    return sha


def _publish_local(directory: Path, root: Path, name: str) -> None:
    final = root / name
    if not (final / COMPLETE).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(directory, tmp)
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        if final.exists():  # an older, incomplete copy (written before this layout): replaced whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(final.parent)
    link = root / f"{TMP}{CURRENT}-{uuid.uuid4().hex[:8]}"
    os.symlink(name, link)
    current = root / CURRENT
    if current.is_dir() and not current.is_symlink():  # a folder exported before this layout: set aside first
        os.rename(current, root / MODELS / f"{TMP}old-{uuid.uuid4().hex[:8]}")
    os.replace(link, current)
    _fsync(root)
    sweep_temporary(str(root), folders=(MODELS,))  # the folder set aside above


def _copy(directory: Path, out: OutputDir, folder: str) -> None:
    out.makedirs(folder)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    for path in sorted(files, key=lambda p: p.name == COMPLETE):  # the completion file last
        pafs.copy_files(str(path), out.path(folder, path.name), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=out.fs)


def _publish_remote(directory: Path, out: OutputDir, name: str) -> None:
    if not out.exists(name, COMPLETE):
        _copy(directory, out, name)
    _copy(directory, out, CURRENT)


def current_model(output: str) -> dict | None:
    """{"sha256", "folder"} of the current export, or None when the output has none published this way."""
    out = OutputDir(output)
    if not out.exists(POINTER):
        return None
    return json.loads(out.read_text(POINTER))


def sweep_temporary(output: str, folders: tuple[str, ...] = ("", MODELS)) -> list[str]:
    """Remove what interrupted writes and exports left under `output` and its `models/`. Only safe while holding
    the output's lease (no other writer is mid-write)."""
    removed = OutputDir(output).sweep_temporary(*folders)
    if removed:
        log.info("removed %d temporary files an interrupted run left under %s", len(removed), output)
    return removed
