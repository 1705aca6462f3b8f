"""Encoded training inputs kept between runs: a Lance dataset of latents keyed by (clip, window, stage, codec, text
encoder), so a latent-space run encodes each clip once and every later run, resume or epoch reads it back.

A row holds what one training item needs besides its caption: the codec's latent of one window of one clip at one
curriculum stage's frames, fps and size, and optionally the text encoder's embedding of its caption. Keys include
the codec's and the text encoder's ids (their weights' identity), so a changed codec or text encoder misses the
cache rather than reading stale latents. Writes are `merge_insert`s keyed by those columns: concurrent writers
(every rank fills its own items) and reruns never duplicate a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa

from curation.dataset import lance_location, sql_list

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
])


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
           "latent": latent.tobytes(), "text_shape": None, "text": None}
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
        if not items:
            return
        data = pa.Table.from_pylist([_row(k, latent, text) for k, latent, text in items], schema=SCHEMA)
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
