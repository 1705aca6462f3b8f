"""What a workflow step's outputs depend on, as short digests: its resolved config (config_hash), a video dump's
listing, a curated dataset's or latent cache's version, a model's bytes and a codec's weights. A rerun compares them
with the recorded ones to skip a step that is up to date."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from models.codec import CodecConfig
from pipelines.config import flatten


def config_hash(section, upstream: list[str], extra: dict | None = None) -> str:
    """sha256 of a step's resolved config (where MLflow logs to is left out: it changes no output), the hashes of
    the steps it reads from and `extra` facts about its inputs."""
    params = {k: v for k, v in flatten(section).items() if not k.startswith("tracking.")}
    blob = json.dumps({"config": params, "upstream": upstream, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def input_fingerprint(root: str) -> dict:
    """Names, sizes and modification times of a dump's files: a grown dump changes the curate step's hash. A remote
    dump is listed through pyarrow.fs with the URI's endpoint and credentials; no URI is kept, so no secret."""
    if not root:
        return {}
    if "://" in root and not root.startswith("file://"):
        return _remote_fingerprint(root)
    path = Path(root.removeprefix("file://"))
    if not path.is_dir():
        return {"missing": str(path)}
    digest = hashlib.sha256()
    count = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):  # os.fsencode: names need not be UTF-8
        stat = file.stat()
        digest.update(os.fsencode(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"))
        count += 1
    return {"files": count, "listing_sha256": digest.hexdigest()}


def _remote_fingerprint(root: str) -> dict:
    import pyarrow.fs as pafs

    from curation.discover import filesystem_and_path

    fs, base = filesystem_and_path(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    digest = hashlib.sha256()
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    for info in files:
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        digest.update(f"{info.path[len(base):]}\0{info.size}\0{mtime}\n".encode())
    return {"files": len(files), "listing_sha256": digest.hexdigest()}


def data_fingerprint(data: str) -> str:
    """The rows a training step would read: the curated dataset version and its content (ClipTable's version,
    v<N>-lance<L>-<hash of its data files>), or a latent cache's (latents-v<N>-lance<L>-<hash>), not the dump's file
    times, so touching a video retrains nothing."""
    from curation.dataset import DatasetError
    from training.latent_dataset import open_training_data

    try:
        return open_training_data(data).version
    except (DatasetError, FileNotFoundError, OSError, ValueError) as err:
        return f"unreadable ({type(err).__name__})"


def model_fingerprint(path: str) -> str:
    """The sha256 of a model's files: from the output's model.json for a published `OUTPUT/model` (or `OUTPUT`
    itself), else computed (a model exported before models/<sha16> existed, or a folder the user named)."""
    from training.publish import CURRENT, current_model, folder_digest

    folder = Path(path.removeprefix("file://"))
    published = current_model(str(folder.parent)) if folder.name == CURRENT else current_model(str(folder))
    if published:
        return published["sha256"]
    return folder_digest(folder) if folder.is_dir() else "missing"


def codec_fingerprint(codec: CodecConfig) -> str:
    """What the codec's weights are: a local VAE folder's file digest (a retrained VAE at the same path differs)."""
    from training.publish import folder_digest

    if codec.kind == "pixels" or "://" in codec.model or not Path(codec.model).is_dir():
        return f"{codec.kind}:{codec.model}:{codec.revision}"
    return folder_digest(Path(codec.model))
