"""Encoded training inputs kept between runs: a Lance dataset of latents keyed by (clip, window, stage, codec, text
encoder), so a latent-space run encodes each clip once and every later run, resume or epoch reads it back.

A row holds what one training item needs: the codec's latent distribution (`latent` is its mean, `logvar` its
log-variance, absent for a deterministic codec such as pixels) of one window of one clip at one curriculum stage's
frames, fps and size, and the text encoder's tokens, embedding and mask of its caption, with the curated dataset
version the clip came from. Keys include the codec's and the text encoder's ids (their weights' identity), so a
changed codec or text encoder misses the cache rather than reading stale latents. Writes are `merge_insert`s keyed
by those columns: concurrent writers (every rank fills its own items) and reruns never duplicate a row.

`reelforge encode` (pipelines/encode.py) fills one cache with one codec and one text encoder: their ids, configs and
the stages' shapes are the cache's identity, kept in the dataset's config, and a run with another is refused. Each
finished encode of curated version N tags the cache `v000N` (the same numbers as the curated dataset's versions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa

from curation.dataset import RECORD_KEY, lance_location, sql_list, version_tag

KEY_COLUMNS = ["clip_id", "window", "stage", "codec", "text_encoder"]
SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("window", pa.int32()),
    ("stage", pa.string()),  # the curriculum stage's name: its frames, fps and size decide the latent
    ("codec", pa.string()),  # the codec's id, e.g. "pixels" or a VAE's hub id and revision
    ("text_encoder", pa.string()),  # the text encoder's id; "" when the row holds no text embedding
    ("dtype", pa.string()),
    ("latent_shape", pa.list_(pa.int32())),
    ("latent", pa.large_binary()),
    ("text_shape", pa.list_(pa.int32())),
    ("text", pa.large_binary()),
    ("logvar", pa.large_binary()),  # the latent distribution's log-variance, latent_shape; null: deterministic
    ("text_mask", pa.large_binary()),  # bool (L,): the tokens attended to
    ("text_tokens", pa.large_binary()),  # int32 (L,): the tokenizer's ids
    ("caption", pa.string()),
    ("dataset_version", pa.int32()),  # the curated dataset version the clip was added in
])
IDENTITY_KEY = "reelforge.latents.identity"  # the codec, text encoder and stages of a cache `reelforge encode` fills


class CacheMismatch(ValueError):
    """A run would mix another codec, text encoder or stage shape into a cache: one line, for the user."""


@dataclass(frozen=True)
class CacheKey:
    clip_id: str
    window: int
    stage: str
    codec: str
    text_encoder: str = ""


def _row(key: CacheKey, latent: np.ndarray, text: np.ndarray | None) -> dict:
    latent = np.ascontiguousarray(latent)
    row = {"clip_id": key.clip_id, "window": key.window, "stage": key.stage, "codec": key.codec,
           "text_encoder": key.text_encoder, "dtype": latent.dtype.str, "latent_shape": list(latent.shape),
           "latent": latent.tobytes(), "text_shape": None, "text": None, "logvar": None, "text_mask": None,
           "text_tokens": None, "caption": None, "dataset_version": None}
    if text is not None:
        text = np.ascontiguousarray(text, dtype=latent.dtype)
        row.update(text_shape=list(text.shape), text=text.tobytes())
    return row


class LatentCache:
    """The cache at `uri` (a local path or an object-store URI as reelforge writes them)."""

    def __init__(self, uri: str):
        self.location, self.storage_options = lance_location(uri)

    def _open(self) -> lance.LanceDataset | None:
        try:
            return lance.dataset(self.location, storage_options=self.storage_options or None)
        except (ValueError, FileNotFoundError, OSError):
            return None

    def __len__(self) -> int:
        table = self._open()
        return 0 if table is None else table.count_rows()

    def put(self, items: list[tuple[CacheKey, np.ndarray, np.ndarray | None]]) -> None:
        """Store (key, latent, text embedding or None) items; an existing key is overwritten, never doubled."""
        self.put_rows([_row(k, latent, text) for k, latent, text in items])

    def put_rows(self, rows: list[dict]) -> None:
        """Store full rows (SCHEMA's columns; missing ones null) in one commit; existing keys are overwritten."""
        if not rows:
            return
        data = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
        table = self._open()
        if table is None:
            try:
                lance.write_dataset(data, self.location, mode="create", storage_options=self.storage_options or None)
                return
            except (OSError, ValueError):
                table = self._open()  # created by another writer meanwhile
        table.merge_insert(KEY_COLUMNS).when_matched_update_all().when_not_matched_insert_all().execute(data)

    def get(self, keys: list[CacheKey]) -> dict[CacheKey, tuple[np.ndarray, np.ndarray | None]]:
        """The cached (latent, text embedding) of each key found; missing keys are absent from the result."""
        table = self._open()
        if table is None or not keys:
            return {}
        found: dict[CacheKey, tuple[np.ndarray, np.ndarray | None]] = {}
        clip_ids = sql_list(sorted({k.clip_id for k in keys}))
        wanted = set(keys)
        for row in table.to_table(filter=f"clip_id IN ({clip_ids})").to_pylist():
            key = CacheKey(row["clip_id"], row["window"], row["stage"], row["codec"], row["text_encoder"])
            if key not in wanted:
                continue
            latent = np.frombuffer(row["latent"], dtype=row["dtype"]).reshape(row["latent_shape"])
            text = None
            if row["text"] is not None:
                text = np.frombuffer(row["text"], dtype=row["dtype"]).reshape(row["text_shape"])
            found[key] = (latent, text)
        return found

    def missing(self, keys: list[CacheKey]) -> list[CacheKey]:
        """The keys not cached yet, in the order given."""
        have = self.get(keys)
        return [k for k in keys if k not in have]

    def dataset(self, version: int | None = None) -> lance.LanceDataset | None:
        """The Lance dataset at reelforge version `version` (its tag), or at its newest commit when None."""
        if version is None:
            return self._open()
        return lance.dataset(self.location, version=version_tag(version),
                             storage_options=self.storage_options or None)

    def identity(self) -> dict | None:
        """The codec, text encoder and stages this cache holds (None: an empty or hand-filled cache)."""
        table = self._open()
        raw = None if table is None else table.config().get(IDENTITY_KEY)
        return None if raw is None else json.loads(raw)

    def claim(self, identity: dict, shown: str) -> None:
        """Make `identity` this cache's, or refuse one that differs from what the cache already holds. A stage
        new to the cache is added; a stage whose shape changed is refused (its rows would mix two shapes)."""
        table = self._open()
        if table is None:  # an empty dataset: the identity lives in its config
            lance.write_dataset(SCHEMA.empty_table(), self.location, mode="create",
                                storage_options=self.storage_options or None)
            table = self._open()
        held = self.identity()
        if held is not None:
            for key, what in (("codec", "codec"), ("text_encoder", "text encoder")):
                if held[key] != identity[key]:
                    raise CacheMismatch(f"{shown} holds latents of {what} {held[key]!r}, not {identity[key]!r}: "
                                        f"one cache holds one {what}; encode into another --output")
            for name, shape in identity["stages"].items():
                if name in held["stages"] and held["stages"][name] != shape:
                    raise CacheMismatch(f"{shown}: stage {name!r} was encoded as {held['stages'][name]}, not {shape}:"
                                        " give the new shape another stage name, or encode into another --output")
            identity = {**identity, "stages": {**held["stages"], **identity["stages"]}}
        table.update_config({IDENTITY_KEY: json.dumps(identity, sort_keys=True)})

    def done(self) -> set[tuple[str, str]]:
        """(clip_id, stage) pairs that have rows: `reelforge encode` commits all windows of a clip's stage at once."""
        table = self._open()
        if table is None:
            return set()
        rows = table.to_table(columns=["clip_id", "stage"])
        return set(zip(rows["clip_id"].to_pylist(), rows["stage"].to_pylist(), strict=True))

    def tag(self, number: int, record: dict) -> None:
        """Tag the newest commit `v000N` with its record: curated version N is encoded (a rerun moves the tag)."""
        table = self._open()
        tag = version_tag(number)
        if tag in table.tags.list():
            table.tags.update(tag, table.version)
        else:
            table.tags.create(tag, table.version)
        table.tags.replace_metadata(tag, {RECORD_KEY: json.dumps(record, default=str, sort_keys=True)})

    def versions(self) -> dict[int, dict]:
        """Encoded curated versions -> their records."""
        table = self._open()
        found = {}
        for name, tag in ({} if table is None else table.tags.list()).items():
            metadata = tag.get("metadata") or {}
            if name.startswith("v") and name[1:].isdigit() and RECORD_KEY in metadata:
                found[int(name[1:])] = json.loads(metadata[RECORD_KEY])
        return dict(sorted(found.items()))
